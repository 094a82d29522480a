"""Scenario GG with the reduced ResNet-18: SupSup (and SupSup Transfer) next to Upper Bound and Lower Bound
on the same stream, batches and optimiser. Prints one JSON line per method and a Markdown table.

SplitFashionMNIST (5 × 2 classes, real data available offline; issue 5 acceptance run on the CPU):
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python scripts/gg_convnets.py --nf 8 --batches 250 --batch-size 64
SplitCIFAR100 (20 × 5; needs <root>/cifar-100-python/ — the paper: 250 epochs of 2,500 images, batch 128):
    .venv/bin/python scripts/gg_convnets.py --dataset cifar100 --data-root /data --nf 20 --batches 4883 \
        --batch-size 128 --multiplier 4 --device cuda
On CUDA, SupSup's training step is a captured CUDA graph (``--no-cuda-graph``: eager, same steps).
"""

from __future__ import annotations

import argparse
import json

import torch

from supsup.architectures import build_model
from supsup.baselines import lower_bound, upper_bound
from supsup.data.cifar import SplitCIFAR100, load_cifar100
from supsup.data.fashion import SplitFashionMNIST, load_split_fashion
from supsup.density import er_density
from supsup.gg import paper_gg_config, run_gg
from supsup.learners import TrainConfig
from supsup.resnets import gem_resnet18


def run(nf: int = 8, batches: int = 250, batch_size: int = 64, multiplier: float = 8, seed: int = 0,
        data_root=None, methods=("supsup", "transfer", "upper", "lower"), dataset: str = "fashion",
        device: str = "cpu", cuda_graph: bool = True) -> list[dict]:
    if dataset == "fashion":
        stream, channels, outputs = SplitFashionMNIST(load_split_fashion(data_root, device)), 1, 2
    else:
        stream, channels, outputs = SplitCIFAR100(load_cifar100(data_root, device), seed=seed), 3, 5
    gg = paper_gg_config(batches_per_task=batches, batch_size=batch_size, cuda_graph=cuda_graph)
    dense = TrainConfig(optimizer="adam", lr=1e-3, cosine=True, batch_size=batch_size, batches_per_task=batches)
    build = lambda: gem_resnet18(output_size=outputs, in_channels=channels, nf=nf)  # noqa: E731
    results = []
    for method in methods:
        torch.manual_seed(seed)
        if method in ("supsup", "transfer"):
            model = build_model("gem_resnet18", output_size=outputs, num_classes=outputs, seed=seed, rule="topk",
                                density=er_density(multiplier), nf=nf, in_channels=channels).to(device)
            r = run_gg(model, stream, gg, transfer=method == "transfer")
            assert r.at_end == r.after_task, "per-task masks and BN statistics must not change after training"
        elif method == "upper":
            r = upper_bound(build, stream, dense, seed=seed)
        else:
            r = lower_bound(build, stream, dense, seed=seed)
        results.append(r.as_dict())
        print(json.dumps(results[-1]), flush=True)
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| method | accuracy right after each task | accuracy at the end | avg at end | bytes stored | s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        fmt = lambda xs: " ".join(f"{100 * x:.2f}" for x in xs)  # noqa: E731
        lines.append(f"| {r['method']} | {fmt(r['after_task'])} | {fmt(r['at_end'])} | {100 * r['average_at_end']:.2f} "
                     f"| {r['bytes_stored']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("fashion", "cifar100"), default="fashion")
    p.add_argument("--device", default="cpu")
    p.add_argument("--nf", type=int, default=8)
    p.add_argument("--batches", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--multiplier", type=float, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--methods", default="supsup,transfer,upper,lower")
    p.add_argument("--no-cuda-graph", action="store_true", help="train SupSup eagerly on CUDA (default: CUDA graph)")
    a = p.parse_args()
    res = run(a.nf, a.batches, a.batch_size, a.multiplier, a.seed, a.data_root, tuple(a.methods.split(",")), a.dataset,
              a.device, not a.no_cuda_graph)
    print(markdown(res))
