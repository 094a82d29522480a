import torch

from supsup.architectures import build_model
from supsup.data.vision import SplitClassStream
from supsup.density import er_density
from supsup.gg import paper_gg_config, run_gg
from synthetic_images import tensor_images


def _stream(tasks=3):
    return SplitClassStream(tensor_images(num_classes=2 * tasks, size=16), tasks, 2, seed=0)


def test_per_task_batchnorm_keeps_every_task_exactly_as_it_was_learned():
    stream = _stream(3)
    model = build_model("gem_resnet18", output_size=2, num_classes=2, seed=0, rule="topk", density=er_density(32),
                        nf=4)
    result = run_gg(model, stream, paper_gg_config(batches_per_task=15, batch_size=16))
    assert result.at_end == result.after_task  # exactly, not approximately
    assert result.average_at_end > 0.75  # and it did learn (chance is 0.5)
    # the per-task statistics really differ: task 0 evaluated with task 2's BN statistics changes its logits
    x, _ = stream.test_set(0)
    model.eval()
    before = model(x, 0)
    for bn in model.norm_layers():
        bn.running_mean[0], bn.running_var[0] = bn.running_mean[2].clone(), bn.running_var[2].clone()
    assert not torch.allclose(before, model(x, 0))


def test_training_two_tasks_at_once_gives_the_same_accuracies():
    cfg = paper_gg_config(batches_per_task=4, batch_size=8)
    one = run_gg(build_model("gem_resnet18", output_size=2, num_classes=2, seed=0, rule="topk",
                             density=er_density(32), nf=4), _stream(2), cfg)
    cfg2 = paper_gg_config(batches_per_task=4, batch_size=8, tasks_at_once=2)
    two = run_gg(build_model("gem_resnet18", output_size=2, num_classes=2, seed=0, rule="topk",
                             density=er_density(32), nf=4), _stream(2), cfg2)
    assert len(two.at_end) == 2 and two.at_end == two.after_task
    assert abs(one.average_at_end - two.average_at_end) <= 0.1
