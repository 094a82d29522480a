"""Masks over pretrained weights: a small dense CNN is trained on MNIST digits 0-4, then supermasks are learned
over its kept weights (``weights="keep"``) for new tasks, beside supermasks over seeded random weights of the
same shape (``weights="seed"``, the paper's, no biases).

    python -m supsup.examples.pretrained [--batches 200] [--pretrain-batches 300] [--test-samples N] [--out DIR]

New tasks: MNIST split into 5 tasks of 2 digits, and into 2 tasks of 5 digits (the labels are the digits; the
head has 10 outputs). Three ways: "kept" (masks over the pretrained weights, biases frozen as pretrained),
"kept+b" (the same with a bias vector per task, starting from the pretrained ones) and "seeded" (the paper's
signed constants, no bias). Over kept weights every task starts from the whole pretrained network (all scores
positive). Prints the conversion reports and, per split and way, accuracy with the task given and bytes per
task; writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from supsup import SupermaskModel
from supsup.data.idx import load_mnist
from supsup.data.streams import TaskStream
from supsup.evaluation import evaluate
from supsup.examples.transformer import limit_test
from supsup.files import write_json
from supsup.learners import TrainConfig, train_task_group


def dense_cnn() -> nn.Sequential:
    """``[B, 784]`` -> two conv blocks (16, 32 channels) -> 64 -> 10 logits; every layer with a bias."""
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


class SplitDigits(TaskStream):
    """Task t: the ``width`` consecutive digits from ``width * t``; labels stay the digits."""

    def __init__(self, data, width: int, seed: int = 1):
        super().__init__(data, 10 // width, seed)
        self.name, self.width = f"split-digits-{width}", width
        self.indices = {s: [torch.nonzero(self.data.split(s)[1] // width == t).squeeze(1) for t in range(self.num_tasks)]
                        for s in ("train", "test")}

    def size(self, task, split):
        self.check_task(task)
        return self.indices[split][task].shape[0]

    def transform(self, task):
        return torch.arange(self.width * task, self.width * (task + 1))

    def batch(self, task, split, idx):
        images, labels = self.data.split(split)
        chosen = self.indices[split][task][idx]
        return self.normalised(images[chosen]), labels[chosen]


def pretrain(data, batches: int) -> tuple[nn.Module, float]:
    """The dense CNN trained with Adam on digits 0-4 (batches of 128); its test accuracy on those digits."""
    torch.manual_seed(0)
    net = dense_cnn()
    stream = SplitDigits(data, 5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for x, y in stream.train_batches(0, 128, batches):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = stream.test_set(0)
    with torch.no_grad():
        return net.eval(), float((net(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="training batches of 128 per task (default 200)")
    parser.add_argument("--test-samples", type=int, default=None,
                        help="MNIST test images the new tasks are tested on (default all 10,000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--data-root", default=None, help="MNIST's folder (default: $SUPSUP_DATA or ~/.cache/supsup)")
    parser.add_argument("--out", default="runs/pretrained-example", help="folder for the results")
    parser.add_argument("--pretrain-batches", type=int, default=300, help="dense training batches (default 300)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam's learning rate on the scores (default 0.01)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_mnist(args.data_root)
    test_data = limit_test(data, args.test_samples)
    dense, dense_accuracy = pretrain(data, args.pretrain_batches)
    print(f"dense CNN trained on digits 0-4 ({args.pretrain_batches} batches of 128): test accuracy "
          f"{dense_accuracy:.4f}")
    builds = {"kept": lambda: SupermaskModel(copy.deepcopy(dense), seed=1, weights="keep", bias="frozen",
                                             num_classes=10),
              "kept+b": lambda: SupermaskModel(copy.deepcopy(dense), seed=1, weights="keep", bias="per-task",
                                               num_classes=10),
              "seeded": lambda: SupermaskModel(copy.deepcopy(dense), seed=1, weights="seed", num_classes=10)}
    for name in ("kept", "seeded"):
        print(f"\n{name}:\n{builds[name]().conversion.table()}")
    cfg = TrainConfig(optimizer="adam", lr=args.lr, batches_per_task=args.batches)
    rows = []
    print(f"\n{'split':>6}  {'weights':>7}  {'accuracy (task given)':>21}  {'per task':<28}  {'B/task':>7}")
    for width in (2, 5):
        stream = SplitDigits(test_data, width)
        for name, build in builds.items():
            model = build()
            for _ in range(stream.num_tasks):
                train_task_group(model, stream, cfg)
            accuracies = [t.accuracy for t in evaluate(model, stream).tasks]
            mean = sum(accuracies) / len(accuracies)
            rows.append({"split": f"{stream.num_tasks}x{width}", "weights": name, "accuracy": mean,
                         "per_task": accuracies, "bytes_per_task": model.bytes_per_task()})
            print(f"{stream.num_tasks}x{width:<4}  {name:>7}  {mean:>21.4f}  "
                  f"{' '.join(f'{a:.3f}' for a in accuracies):<28}  {model.bytes_per_task():>7,}")
    print(f"total {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"args": vars(args), "dense_accuracy_0_4": dense_accuracy, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
