"""The continual-learning metrics on constructed accuracy matrices, against values worked out by hand."""

import csv
import io

import pytest

from supsup import metrics
from supsup.metrics import AccuracyMatrix

# after 1, 2 and 3 tasks: task 0 drops from 0.9 to 0.8 to 0.7, task 1 from 0.95 to 0.9
FULL = AccuracyMatrix([1, 2, 3], [[0.9], [0.8, 0.95], [0.7, 0.9, 0.85]])


def test_average_accuracy_is_the_mean_of_the_last_row():
    assert metrics.average_accuracy(FULL) == pytest.approx((0.7 + 0.9 + 0.85) / 3)


def test_forgetting_is_the_mean_drop_from_each_tasks_best_earlier_accuracy():
    # task 0: max(0.9, 0.8) - 0.7 = 0.2; task 1: 0.95 - 0.9 = 0.05; the last task is not counted
    assert metrics.forgetting(FULL) == pytest.approx((0.2 + 0.05) / 2)


def test_backward_transfer_compares_the_end_with_right_after_learning():
    # task 0: 0.7 - 0.9; task 1: 0.9 - 0.95
    assert metrics.backward_transfer(FULL) == pytest.approx((-0.2 - 0.05) / 2)


def test_a_sparse_schedule_uses_the_rows_it_has():
    sparse = AccuracyMatrix([2, 3], [[0.8, 0.95], [0.7, 0.9, 0.85]])
    assert metrics.forgetting(sparse) == pytest.approx((0.1 + 0.05) / 2)
    assert metrics.backward_transfer(sparse) == pytest.approx(-0.05)  # only task 1 has a row right after it


def test_partial_rows_of_task_groups_count_as_right_after_learning():
    # tasks 2 and 3 learned together and measured right after them (a partial row), all five at the end
    kept = AccuracyMatrix([2, 4, 5], [[0.9, 0.8], [None, None, 0.9, 0.95], [0.6, 0.7, 0.8, 0.9, 0.9]])
    # right after: task 1 (0.8, last of a full row), tasks 2 and 3 (partial row); a full row's others are not
    assert metrics.backward_transfer(kept) == pytest.approx(((0.7 - 0.8) + (0.8 - 0.9) + (0.9 - 0.95)) / 3)
    assert metrics.forgetting(kept) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.7) + (0.9 - 0.8) + (0.95 - 0.9)) / 4)


def test_one_row_has_no_forgetting_or_transfer_to_measure():
    once = AccuracyMatrix([2], [[0.8, 0.9]])
    assert metrics.summary(once) == {"average_accuracy": pytest.approx(0.85), "forgetting": None,
                                     "backward_transfer": None}


def test_frozen_tasks_forget_nothing():
    frozen = AccuracyMatrix([1, 2], [[0.93], [0.93, 0.94]])
    assert metrics.forgetting(frozen) == 0 and metrics.backward_transfer(frozen) == 0


def test_a_row_for_the_same_task_count_replaces_the_last():
    m = AccuracyMatrix()
    m.add(2, [0.5, 0.6])
    m.add(2, [0.7, 0.8])
    assert m.tasks_learned == [2] and m.values == [[0.7, 0.8]]


def test_confusion_and_task_inference_accuracy():
    rows = [{"task": 0, "inferred": {"0": 90, "1": 10}}, {"task": 1, "inferred": {"1": 100}}, {"task": 2}]
    table = metrics.confusion(rows)
    assert table == {0: {0: 90, 1: 10}, 1: {1: 100}}
    assert metrics.inference_accuracy(table) == pytest.approx(190 / 200)
    assert list(csv.reader(io.StringIO(metrics.confusion_csv(table)))) == [
        ["task", "inferred", "samples"], ["0", "0", "90"], ["0", "1", "10"], ["1", "1", "100"]]


def test_matrix_csv_leaves_tasks_not_learned_empty():
    rows = list(csv.reader(io.StringIO(metrics.matrix_csv(FULL, 3))))
    assert rows[0] == ["tasks_learned", "task_0", "task_1", "task_2"]
    assert rows[1] == ["1", "0.9", "", ""] and rows[3] == ["3", "0.7", "0.9", "0.85"]
    assert AccuracyMatrix.from_dict(FULL.to_dict()) == FULL
