import torch

from supsup.baselines import batche, lower_bound, psp, separate_heads, upper_bound
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
