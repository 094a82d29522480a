"""GG training step of the reduced ResNet-18 and ResNet-50: masked (top-k supermask at an ER density,
scores trained, per-task BN) against dense (same shapes, weights trained), timed in the same run.

    from benchmarks.gg_step import run; run("cuda", quick=False)
    .venv/bin/python benchmarks/gg_step.py --device cpu --quick

A step = forward + backward + Adam step, training mode. On CUDA both sides run with bf16 autocast and
channels_last (masks, scores and BN statistics stay fp32). Reference: 15.9 ms per batch of 128 on an
H200 for the reduced ResNet-18 in the authors' code (goal ≤ 4 ms); ResNet-50 224² batch 128, goal ≤ 1.1× dense.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

from supsup.architectures import build_model
from supsup.density import er_density
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


def _case(name: str, kwargs: dict, batch: int, size: int, classes: int, multiplier: float, device: torch.device,
          warmup: int, steps: int) -> dict:
    cuda = device.type == "cuda"
    fmt = torch.channels_last if cuda else torch.contiguous_format
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=device)

    masked = build_model(name, output_size=classes, num_classes=classes, seed=0, rule="topk",
                         density=er_density(multiplier), **kwargs).to(device, memory_format=fmt)
    masked.begin_tasks(1)
    masked.train()
    opt_m = torch.optim.Adam(masked.score_parameters(), lr=1e-3, weight_decay=1e-4)

    def masked_step():
        with amp:
            loss = F.cross_entropy(masked(x, 0), y)
        opt_m.zero_grad(set_to_none=True)
        loss.backward()
        opt_m.step()

    dense = (gem_resnet18 if name == "gem_resnet18" else resnet50)(output_size=classes, **kwargs)
    dense = dense.to(device, memory_format=fmt).train()
    opt_d = torch.optim.Adam(dense.parameters(), lr=1e-3)

    def dense_step():
        with amp:
            loss = F.cross_entropy(dense(x), y)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()

    masked_ms = _time_steps(masked_step, device, warmup, steps)
    dense_ms = _time_steps(dense_step, device, warmup, steps)
    return {"model": name, "batch": batch, "input": [3, size, size], "er_multiplier": multiplier,
            "masked_ms": round(masked_ms, 3), "dense_ms": round(dense_ms, 3), "ratio": round(masked_ms / dense_ms, 3),
            "amp": "bf16+channels_last" if cuda else "fp32"}


def radix_select_keep(magnitudes: torch.Tensor, keep: int) -> torch.Tensor:
    """Candidate faster top-k mask: the ``keep`` largest of non-negative ``magnitudes`` by a 31-step radix
    select on the float bit patterns (ordered like the floats for x >= 0); no sort, no host sync."""
    bits = magnitudes.reshape(-1).view(torch.int32)
    prefix = torch.zeros((), dtype=torch.int32, device=magnitudes.device)
    for bit in range(30, -1, -1):
        candidate = prefix | (1 << bit)
        prefix = torch.where((bits >= candidate).sum() >= keep, candidate, prefix)
    return (bits >= prefix).view(magnitudes.shape)


def batched_radix_select(flat: torch.Tensor, segment: torch.Tensor, ends: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Top-k masks of every layer in one batched op: ``flat`` holds all layers' |scores| back to back
    (``[N]`` fp32 >= 0), ``segment [N]`` the layer of each entry, ``ends [L]`` each layer's end offset,
    ``keep [L]`` how many to keep. 31 passes over ``flat`` (gather, compare, one cumsum), no sort, no sync."""
    bits = flat.view(torch.int32)
    prefix = torch.zeros_like(keep, dtype=torch.int32)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    for bit in range(30, -1, -1):
        candidate = prefix | (1 << bit)
        running = (bits >= candidate[segment]).to(torch.int32).cumsum(0)
        total = torch.cat([running.new_zeros(1), running])
        counts = total[ends] - total[starts]
        prefix = torch.where(counts >= keep, candidate, prefix)
    return bits >= prefix[segment]


def mask_costs(name: str, multiplier: float, device: torch.device, warmup: int = 3, steps: int = 10) -> dict:
    """ms per step spent building every layer's top-k mask: the library's (kthvalue) and radix select."""
    from supsup.masks import kept_count, topk_keep

    model = build_model(name, output_size=10, num_classes=10, seed=0, rule="topk", density=er_density(multiplier))
    layers = model.mask_layers()
    scores = [torch.rand(layer.weight.shape, device=device) for layer in layers]
    keeps = [kept_count(s.numel(), layer.density) for s, layer in zip(scores, layers)]
    library = _time_steps(lambda: [topk_keep(s, layer.density) for s, layer in zip(scores, layers)], device,
                          warmup, steps)
    radix = _time_steps(lambda: [radix_select_keep(s, k) for s, k in zip(scores, keeps)], device, warmup, steps)
    same = all(torch.equal(topk_keep(s, layer.density), radix_select_keep(s, k))
               for s, layer, k in zip(scores, layers, keeps))
    flat = torch.cat([s.reshape(-1) for s in scores])  # in a layout built for it, the scores live here already
    sizes = torch.tensor([s.numel() for s in scores], device=device)
    segment = torch.repeat_interleave(torch.arange(len(scores), device=device), sizes)
    ends, keep_t = sizes.cumsum(0), torch.tensor(keeps, device=device)
    batched = _time_steps(lambda: batched_radix_select(flat, segment, ends, keep_t), device, warmup, steps)
    same_batched = torch.equal(batched_radix_select(flat, segment, ends, keep_t),
                               torch.cat([topk_keep(s, layer.density).reshape(-1) for s, layer in zip(scores, layers)]))
    return {"model": name, "layers": len(layers), "kthvalue_masks_ms": round(library, 3),
            "radix_select_masks_ms": round(radix, 3), "same_masks": same,
            "batched_radix_select_ms": round(batched, 3), "same_masks_batched": same_batched}


def run(device: str | torch.device = "cpu", quick: bool = True) -> dict:
    """Times per step (ms, median) of masked and dense GG steps and their ratio, for both networks.

    ``quick`` on CPU uses small inputs (reduced ResNet-18: batch 32 at 32²; ResNet-50: batch 4 at 64²)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda or not quick:
        cases = [("gem_resnet18", {}, 128, 32, 5, 8), ("resnet50", {}, 128 if cuda else 16, 224 if cuda else 112, 10, 8)]
        warmup, steps = (10, 30) if cuda else (2, 5)
    else:
        cases = [("gem_resnet18", {}, 32, 32, 5, 8), ("resnet50", {}, 4, 64, 10, 8)]
        warmup, steps = 1, 3
    out = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
           "results": [_case(*c, device, warmup, steps) for c in cases],
           "mask_costs": [mask_costs("gem_resnet18", 8, device)] + ([] if quick and not cuda else
                                                                   [mask_costs("resnet50", 8, device)])}
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    print(json.dumps(run(a.device, a.quick), indent=1))
