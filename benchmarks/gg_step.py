"""GG training step of the reduced ResNet-18 and ResNet-50: masked (top-k supermask at an ER density,
scores trained, per-task BN) against dense (same shapes, weights trained), timed in the same run.

    from benchmarks.gg_step import run; run("cuda", quick=False)
    .venv/bin/python benchmarks/gg_step.py --device cpu --quick

A step = forward + backward + Adam step in training mode, run by the library's ``learners.TrainingStep``
for both sides: eagerly, and on CUDA also captured as a CUDA graph (``TrainConfig.cuda_graph``). On CUDA
both sides use bf16 autocast and channels_last (masks, scores and BN statistics stay fp32). Reference:
15.9 ms per batch of 128 on an H200 for the reduced ResNet-18 in the authors' code (goal ≤ 4 ms);
ResNet-50 224² batch 128, goal ≤ 1.1× dense.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

from supsup import kernels
from supsup.architectures import build_model
from supsup.density import er_density
from supsup.learners import TrainConfig, TrainingStep, make_optimizer
from supsup.masks import topk_keep, topk_keep_many
from supsup.resnets import gem_resnet18, resnet50


def _timer(device: torch.device):
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def _time_steps(step, device, warmup: int, steps: int) -> float:
    now = _timer(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = now()
        step()
        times.append(now() - t)
    return statistics.median(times) * 1e3


def _case(name: str, batch: int, size: int, classes: int, multiplier: float, device: torch.device,
          warmup: int, steps: int) -> list[dict]:
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=device)
    cfg = TrainConfig(optimizer="adam", lr=1e-3, weight_decay=1e-4)

    def amp():  # no cast cache: a CUDA-graph capture must not keep casts across steps
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if cuda else contextlib.nullcontext()

    masked = build_model(name, output_size=classes, num_classes=classes, seed=0, rule="topk",
                         density=er_density(multiplier)).to(device, memory_format=fmt)
    masked.begin_tasks(1)
    masked.train()
    dense = (gem_resnet18 if name == "gem_resnet18" else resnet50)(output_size=classes)
    dense = dense.to(device, memory_format=fmt).train()

    def masked_loss(xb, yb):
        with amp():
            return F.cross_entropy(masked(xb, 0), yb)

    def dense_loss(xb, yb):
        with amp():
            return F.cross_entropy(dense(xb), yb)

    rows = []
    for graphed in ([False, True] if cuda else [False]):
        # interleave the two sides' timing blocks so that a change in load hits both alike
        sides = {"masked": TrainingStep(masked_loss, make_optimizer(masked.score_parameters(), cfg, graphed), graphed),
                 "dense": TrainingStep(dense_loss, make_optimizer(list(dense.parameters()), cfg, graphed), graphed)}
        times = {side: [] for side in sides}
        for _ in range(2):
            for side, step in sides.items():
                times[side].append(_time_steps(lambda s=step: s(x, y), device, warmup, steps))
        masked_ms, dense_ms = min(times["masked"]), min(times["dense"])
        rows.append({"model": name, "batch": batch, "input": [3, size, size], "er_multiplier": multiplier,
                     "cuda_graph": graphed, "masked_ms": round(masked_ms, 3), "dense_ms": round(dense_ms, 3),
                     "ratio": round(masked_ms / dense_ms, 3), "amp": "bf16+channels_last" if cuda else "fp32"})
    return rows


def mask_costs(name: str, multiplier: float, device: torch.device, warmup: int = 3, steps: int = 10) -> dict:
    """ms per step spent selecting every layer's top-k mask: one ``kthvalue`` per layer (the library's
    path before the batched selection) against the library's batched ``topk_keep_many``; same masks?"""
    model = build_model(name, output_size=10, num_classes=10, seed=0, rule="topk", density=er_density(multiplier))
    layers = model.mask_layers()
    scores = [torch.randn(1, *layer.weight.shape, device=device) for layer in layers]
    densities = [layer.density for layer in layers]
    with kernels.use_backend("torch"):
        per_layer = _time_steps(lambda: [topk_keep(s[0], d) for s, d in zip(scores, densities)], device, warmup, steps)
        want = [topk_keep(s[0], d) for s, d in zip(scores, densities)]
    batched = _time_steps(lambda: topk_keep_many(scores, densities), device, warmup, steps)
    same = all(torch.equal(a[0], b) for a, b in zip(topk_keep_many(scores, densities), want))
    return {"model": name, "layers": len(layers), "weights": sum(s.numel() for s in scores),
            "per_layer_kthvalue_ms": round(per_layer, 3), "batched_select_ms": round(batched, 3),
            "backend": kernels.backend_for(device), "same_masks": same}


def run(device: str | torch.device = "cpu", quick: bool = True) -> dict:
    """Times per step (ms, median, best of two interleaved blocks) of masked and dense GG steps and their
    ratio, for both networks; plus the cost of selecting the masks.

    ``quick`` on CPU uses small inputs (reduced ResNet-18: batch 32 at 32²; ResNet-50: batch 4 at 64²)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda or not quick:
        cases = [("gem_resnet18", 128, 32, 5, 8), ("resnet50", 128 if cuda else 16, 224 if cuda else 112, 10, 8)]
        warmup, steps = (10, 30) if cuda else (2, 5)
    else:
        cases = [("gem_resnet18", 32, 32, 5, 8), ("resnet50", 4, 64, 10, 8)]
        warmup, steps = 1, 3
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "results": [row for c in cases for row in _case(*c, device, warmup, steps)],
            "mask_costs": [mask_costs("gem_resnet18", 8, device)] + ([] if quick and not cuda else
                                                                   [mask_costs("resnet50", 8, device)])}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    print(json.dumps(run(a.device, a.quick), indent=1))
