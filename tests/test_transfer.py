import torch

from supsup.architectures import build_model
from supsup.data.vision import SplitClassStream
from supsup.density import er_density
from supsup.gg import paper_gg_config, run_gg
from supsup.learners import train_task_group
from supsup.transfer import RunningMeanScores
from synthetic_images import tensor_images


def _model():
    return build_model("gem_resnet18", output_size=2, num_classes=2, seed=0, rule="topk", density=er_density(32), nf=4)


def test_new_task_starts_from_the_mean_of_earlier_scores():
    stream = SplitClassStream(tensor_images(num_classes=6, size=16), 3, 2, seed=0)
    model, running, finals, starts = _model(), RunningMeanScores(), [], []
    cfg = paper_gg_config(batches_per_task=2, batch_size=8)

    def init(k):
        scores = running.init_scores(k)
        starts.append(scores)
        return scores

    def observe(m):
        finals.append([layer.scores.detach().clone() for layer in m.mask_layers()])
        running.observe(m)

    for _ in range(3):
        train_task_group(model, stream, cfg, init_scores=init, before_freeze=observe)
    assert starts[0] is None  # task 0: seeded random init
    assert torch.equal(starts[1][0], finals[0][0])  # task 1 starts where task 0 ended
    assert torch.allclose(starts[2][3], (finals[0][3] + finals[1][3]) / 2)  # task 2: mean of tasks 0 and 1
    # one running sum per layer, not every task's scores
    assert running.nbytes == sum(layer.weight.numel() * 4 for layer in model.mask_layers())


def test_transfer_run_keeps_earlier_tasks_exact():
    stream = SplitClassStream(tensor_images(num_classes=4, size=16), 2, 2, seed=0)
    result = run_gg(_model(), stream, paper_gg_config(batches_per_task=3, batch_size=8), transfer=True)
    assert result.method == "SupSup Transfer" and result.at_end == result.after_task
