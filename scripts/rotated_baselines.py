"""PSP and BatchE (scenario GG) on RotatedMNIST with FC 1024-1024 on the same harness as SupSup's
``rotated-mnist`` preset: the paper's claim to check is that SupSup in GNu beats both in GG.

    python scripts/rotated_baselines.py --batches 200 --out runs/rotated-baselines.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from supsup.architectures import fc1024
from supsup.baselines.task_conditioned import batche, psp
from supsup.data.idx import load_mnist
from supsup.data.streams import RotatedMNIST
from supsup.learners import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=36)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/rotated-baselines.json"))
    args = parser.parse_args()
    stream = RotatedMNIST(load_mnist(args.data_root, args.device), args.tasks, seed=args.seed)
    results = {}
    # PSP: shared W trained on every task through its context, RMSprop 1e-4 (spec §2.14); 10 outputs.
    psp_result = psp(lambda: fc1024(output_size=10), stream,
                     TrainConfig(optimizer="rmsprop", lr=1e-4, batches_per_task=args.batches), seed=args.seed)
    # BatchE: rank-one per-task factors on a frozen random W, Adam 1e-2 (the GNu experiments' factor lr).
    batche_result = batche(lambda: fc1024(output_size=10), stream,
                           TrainConfig(optimizer="adam", lr=1e-2, batches_per_task=args.batches), seed=args.seed)
    for r in (psp_result, batche_result):
        results[r.method] = {"after_task": r.after_task, "at_end": r.at_end,
                             "average_at_end": sum(r.at_end) / len(r.at_end), "bytes_stored": r.bytes_stored,
                             "seconds": r.seconds}
        print(f"{r.method}: average GG accuracy at the end {results[r.method]['average_at_end']:.4f} "
              f"(right after each task {sum(r.after_task) / len(r.after_task):.4f}), {r.seconds:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, **results}, indent=2))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
