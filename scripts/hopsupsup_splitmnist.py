"""HopSupSup on SplitMNIST (issue 6): learn 5 × 2-digit tasks as BNNet neuron masks, keep them only in
constant-size Hopfield stores, then recover each task's mask from unlabelled data and score it.

Two protocols per task (both after all 5 tasks are stored, 10 outputs = raw digits):
- ``held-out``: recover on the task's held-out training images (never trained on), score on its test set;
- ``transductive`` (the authors'): recover on the task's test set, score on that same test set.

    nice -n 10 .venv/bin/python scripts/hopsupsup_splitmnist.py --out runs/issue6/hop
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from supsup.data.idx import load_mnist
from supsup.data.streams import SplitMNIST
from supsup.hopfield import (HopSupSup, HopTrainConfig, RecoveryConfig, accuracy, hamming, recover, split_train,
                             steps_to_match, steps_to_recover, train_task)
from supsup.seeding import generator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-batches", type=int, default=None, help="cap on training batches per task")
    p.add_argument("--holdout", type=int, default=2048, help="training images per task kept for recovery")
    p.add_argument("--test-batch", type=int, default=64)
    p.add_argument("--stores", default="storkey,hebbian,joint-storkey",
                   help="store variants: a rule (storkey|hebbian), 'joint-' for one store over all layers; "
                        "the first one is trained with, the others get the same masks written in")
    p.add_argument("--data", default=".data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/issue6/hop"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stream = SplitMNIST(load_mnist(args.data), args.tasks, seed=args.seed)
    rules = args.stores.split(",")

    def make(variant: str) -> HopSupSup:
        return HopSupSup(seed=args.seed, width=args.width, rule=variant.removeprefix("joint-"),
                         joint=variant.startswith("joint-"))

    model = make(rules[0])
    cfg = HopTrainConfig(batch_size=args.batch_size, holdout=args.holdout, max_batches=args.max_batches,
                         seed=args.seed)
    true, memory = [], []
    for task in range(args.tasks):
        true.append(train_task(model, stream, task, cfg))  # kept here for diagnostics only
        memory.append({"tasks": task + 1, "store_bytes": model.nbytes,
                       "packed_mask_bytes": (task + 1) * model.mask_bits_per_task // 8,
                       "float_mask_bytes": (task + 1) * model.mask_bits_per_task * 4})
        print(f"task {task} trained ({time.perf_counter() - start:.0f} s): masks on {[int(m.sum()) for m in true[-1]]}"
              f" of {args.width}; store {model.nbytes} bytes", flush=True)
    models = {rules[0]: model}
    for rule in rules[1:]:  # the same masks written with another rule (same frozen weights, by seed)
        models[rule] = make(rule)
        for masks in true:
            models[rule].store(masks)

    def test_batches(task):
        x, y = stream.test_set(task)
        order = torch.randperm(x.shape[0], generator=generator(args.seed, "hop-test", task)).to(x.device)
        return [(x[order[i : i + args.test_batch]], y[order[i : i + args.test_batch]])
                for i in range(0, x.shape[0], args.test_batch)]

    rows = []
    for task in range(args.tasks):
        test = test_batches(task)
        _, held_out = split_train(stream, task, args.holdout, cfg.seed)
        held = [stream.batch(task, "train", held_out[i : i + args.test_batch])[0]
                for i in range(0, args.holdout, args.test_batch)]
        majority = [s >= 0 for s in model.majority_scores()]  # the recovery's starting mask
        base = {"task": task, "digits": [2 * task, 2 * task + 1], "acc_true_mask": accuracy(model, true[task], test),
                "acc_majority_start": accuracy(model, majority, test)}
        for rule, m in models.items():
            for protocol, data in (("held-out", held), ("transductive", [x for x, _ in test])):
                if rule != rules[0] and protocol == "transductive":
                    continue
                r = recover(m, data, RecoveryConfig())
                distances = [hamming(r.masks, t) for t in true]
                row = {**base, "store": rule, "store_bytes": m.nbytes, "protocol": protocol, "recovery_batches": len(data),
                       "steps_to_nearest": steps_to_recover(r.history, true, task),
                       "steps_to_exact": steps_to_match(r.history, true[task]),
                       "hamming_true": distances[task],
                       "hamming_nearest_other": min(d for j, d in enumerate(distances) if j != task),
                       "hamming_start": hamming(majority, true[task]),
                       "acc_recovered": accuracy(m, r.masks, test)}
                # correct: the exact true mask, reached (and kept) within 30 steps
                row["correct"] = row["steps_to_exact"] is not None and row["steps_to_exact"] < 30
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "memory": memory, "results": rows,
               "seconds": time.perf_counter() - start}
    (args.out / "hopsupsup.json").write_text(json.dumps(summary, indent=1))
    print("\n| store | protocol | exact mask in <30 steps | mean steps to exact | mean steps to nearest | "
          "mean Hamming to true | mean acc recovered | mean acc true mask |")
    print("|---|---|---|---|---|---|---|---|")
    for rule in models:
        for protocol in ("held-out", "transductive"):
            sel = [r for r in rows if r["store"] == rule and r["protocol"] == protocol]
            if not sel:
                continue
            exact = [r["steps_to_exact"] for r in sel if r["correct"]]
            near = [r["steps_to_nearest"] for r in sel if r["steps_to_nearest"] is not None]
            print(f"| {rule} | {protocol} | {sum(r['correct'] for r in sel)}/{len(sel)} | "
                  f"{sum(exact) / max(len(exact), 1):.1f} | {sum(near) / max(len(near), 1):.1f} | "
                  f"{sum(r['hamming_true'] for r in sel) / len(sel):.1f} | "
                  f"{sum(r['acc_recovered'] for r in sel) / len(sel):.4f} | {sum(r['acc_true_mask'] for r in sel) / len(sel):.4f} |")
    print("\n| tasks | Hopfield store bytes | bit-packed masks bytes | float32 masks bytes |")
    print("|---|---|---|---|")
    for m in memory:
        print(f"| {m['tasks']} | {m['store_bytes']:,} | {m['packed_mask_bytes']:,} | {m['float_mask_bytes']:,} |")
    print(f"total {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
