import torch

from supsup.baselines import TaskConditioned, batche, lower_bound, psp, separate_heads, upper_bound
from supsup.baselines.task_conditioned import random_orthogonal
from supsup.data.vision import SplitClassStream
from supsup.learners import TrainConfig
from supsup.resnets import gem_resnet18
from synthetic_images import tensor_images

CFG = TrainConfig(optimizer="adam", lr=1e-2, batch_size=16, batches_per_task=8)


def _stream():
    return SplitClassStream(tensor_images(num_classes=4, size=16), 2, 2, seed=0)


def _net():
    return gem_resnet18(output_size=2, nf=4)


def _params(net):
    return sum(p.numel() for p in net.parameters())


def test_upper_bound_stores_a_network_per_task_and_learns():
    r = upper_bound(_net, _stream(), CFG)
    assert r.bytes_stored == 2 * _params(_net()) * 4
    assert r.at_end == r.after_task and r.average_at_end > 0.7


def test_lower_bound_and_separate_heads_share_a_trunk():
    stream = _stream()
    lb, sh = lower_bound(_net, stream, CFG), separate_heads(_net, stream, CFG)
    head = 8 * 4 * 2  # 32 → 2, bias-free
    trunk = _params(_net()) - head
    assert lb.bytes_stored == sh.bytes_stored == (trunk + 2 * head) * 4
    assert sh.at_end[0] == sh.after_task[0]  # the frozen trunk cannot forget task 1


def test_batche_factors_are_per_task_so_old_tasks_are_kept():
    r = batche(_net, _stream(), TrainConfig(optimizer="adam", lr=0.1, weight_decay=1e-4, batch_size=16,
                                           batches_per_task=8))
    assert r.at_end == r.after_task
    per_task = sum(s[0] + s[1] for s in [(4, 3)] + [(4, 4)] * 4 + [(8, 4), (8, 8), (8, 8), (8, 8), (8, 4)]
                   + [(16, 8), (16, 16), (16, 16), (16, 16), (16, 8)] + [(32, 16), (32, 32), (32, 32), (32, 32),
                                                                         (32, 16)] + [(2, 32)])
    assert r.bytes_stored == 2 * per_task * 4


def test_psp_contexts_are_orthogonal_and_weights_stored_once():
    q = random_orthogonal(6, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(6), atol=1e-5)
    r = psp(_net, _stream(), TrainConfig(optimizer="rmsprop", lr=1e-3, batch_size=16, batches_per_task=4))
    masked = sum(p.numel() for n, p in _net().named_parameters() if not n.split(".")[-2].startswith("bn")
                 and p.dim() > 1)
    assert r.bytes_stored == masked * 4 and len(r.at_end) == 2


def test_psp_linear_mixes_the_input_exactly_as_the_weight_would():
    from torch import nn

    from supsup.baselines.task_conditioned import PSPLayer

    layer = PSPLayer(nn.Linear(6, 4, bias=False), seed=3)
    layer.task = 2
    x = torch.randn(5, 6)
    expected = torch.nn.functional.linear(x, layer.layer.weight @ layer.context(2))
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_abatche_superposition_with_one_hot_alpha_is_that_member():
    from supsup.architectures import lenet
    from supsup.layers import Superposition

    stream = SplitClassStream(tensor_images(num_classes=6, size=28, channels=1), 3, 2, seed=0)
    model = TaskConditioned("BatchE", lambda: lenet(output_size=2), stream, CFG, 3, seed=0)
    for _ in range(3):
        model.learn()
    x, _ = stream.test_set(1)
    with torch.no_grad():
        one_hot = torch.tensor([0.0, 1.0, 0.0])
        assert torch.allclose(model(x, Superposition(one_hot)), model(x, 1), atol=1e-5)
        per_sample = torch.eye(3)[torch.arange(x.shape[0]) % 3]
        expected = model(x, torch.arange(x.shape[0]) % 3)
        assert torch.allclose(model(x, Superposition(per_sample)), expected, atol=1e-5)


def test_abatche_one_shot_finds_the_member_trained_on_the_data():
    from supsup.architectures import lenet
    from supsup.evaluation import evaluate
    from supsup.inference import Inference

    # 4 tasks of 2 classes each, every class its own pattern: only task t's member is sure of task t's images
    stream = SplitClassStream(tensor_images(num_classes=8, size=28, channels=1, train_per_class=64), 4, 2, seed=0)
    cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=32, batches_per_task=120)
    model = TaskConditioned("BatchE", lambda: lenet(output_size=2), stream, cfg, 4, seed=0)
    for _ in range(4):
        model.learn()
    for how in (Inference(method="oneshot"), Inference(method="oneshot", granularity="batch"),
                Inference(method="binary", granularity="batch")):
        result = evaluate(model, stream, "GNu", how, seed=0)
        for task in result.tasks:
            assert task.accuracy > 0.9, task  # each member learned its task
            assert task.task_inference_accuracy == 1.0 and task.inferred == {task.task: 16}, (how, task)
