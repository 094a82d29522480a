"""Scenario NNs on PermutedMNIST (issue 6): task-free training over hidden tasks, then shared-label
accuracy with One-Shot H inferred masks. Writes ``result.json`` (decision log + config) and
``evaluation.json`` into ``--out``.

    nice -n 10 .venv/bin/python scripts/nns_permuted_mnist.py --tasks 20 --out runs/issue6/nns-20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from supsup.architectures import build_model
from supsup.data.idx import load_mnist
from supsup.data.streams import PermutedMNIST
from supsup.nns import NNsConfig, evaluate_nns, hidden_task_batches, train_nns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20, help="hidden tasks (permutations)")
    p.add_argument("--batches-per-task", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--arch", default="lenet")
    p.add_argument("--output-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--check-every", type=int, default=100)
    p.add_argument("--epsilon", type=float, default=2 ** -3)
    p.add_argument("--min-slots", type=int, default=5)
    p.add_argument("--budget", type=int, default=2500)
    p.add_argument("--when-full", default="reuse", choices=["reuse", "stop"])
    p.add_argument("--data", default=".data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/issue6/nns"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    stream = PermutedMNIST(load_mnist(args.data), args.tasks, seed=args.seed)
    model = build_model(args.arch, output_size=args.output_size, seed=args.seed)
    cfg = NNsConfig(check_every=args.check_every, epsilon=args.epsilon, min_slots=args.min_slots,
                    budget=args.budget, when_full=args.when_full)
    start = time.perf_counter()

    def progress(done: int) -> None:
        if done % 1000 == 0:
            print(f"batch {done:6d}  bank rows (masks, at least --min-slots) {model.num_tasks}  {time.perf_counter() - start:7.1f} s", flush=True)

    result = train_nns(model, hidden_task_batches(stream, args.batches_per_task, args.batch_size), cfg,
                       on_batch=progress)
    train_s = time.perf_counter() - start
    result.save(args.out / "result.json")
    new = [d.batch for d in result.decisions if d.decision == "new"]
    boundaries = [t * args.batches_per_task for t in range(1, args.tasks)]
    print(f"masks allocated: {result.num_masks} for {args.tasks} hidden tasks; "
          f"allocations at batches {new}; missed boundaries {sorted(set(boundaries) - set(new))}")

    evaluation = evaluate_nns(model, stream, on_task=lambda r: print(f"hidden task {r.task:3d}  acc {r.accuracy:.4f}  "
                                                                     f"masks {r.inferred}", flush=True))
    summary = {"hidden_tasks": args.tasks, "masks": result.num_masks, "allocated_at": new,
               "train_s": train_s, "total_s": time.perf_counter() - start, "args": {k: str(v) for k, v in vars(args).items()},
               **evaluation.as_dict()}
    (args.out / "evaluation.json").write_text(json.dumps(summary, indent=1))
    print(f"average accuracy with inferred masks: {evaluation.average_accuracy:.4f}  "
          f"(train {train_s:.0f} s, total {summary['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
