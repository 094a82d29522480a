"""Supermasks on a transformer: an ``nn.TransformerEncoder`` learns PermutedMNIST tasks one after another,
each image read as 28 tokens (its rows) of 28 pixels; the task is given, or inferred by One-Shot.

    python -m supsup.examples.transformer [--tasks 4] [--batches 300] [--test-samples 2000] [--out DIR]

The encoder (2 pre-norm layers, width 64, 4 heads; a positional ``nn.Embedding``) is converted with
``weights="seed"``: only the seed and, per task, the masks (1 bit per weight) plus the per-task biases and
LayerNorm affines are stored. Prints the conversion report and, per task, accuracy with the task given and
with the task inferred by One-Shot (entropy) from a batch of 128 and from each single image; writes
``OUT/results.json``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch import nn

from supsup import Inference, SupermaskModel
from supsup.convert import BIASES
from supsup.inference import OBJECTIVES
from supsup.data.idx import ImageDataset
from supsup.evaluation import evaluate_task
from supsup.examples import example_arguments, permuted_mnist
from supsup.files import write_json
from supsup.learners import TrainConfig, train_task_group


class RowTransformer(nn.Module):
    """``[B, 784]`` images -> 28 row tokens ``[B, 28, 28]`` -> linear embedding + positions -> pre-norm encoder
    -> mean over tokens -> ``[B, classes]``. (Pre-norm: with post-norm layers One-Shot picked the right task far
    less often in our runs.)"""

    def __init__(self, width: int = 64, heads: int = 4, layers: int = 2, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(28, width)
        self.position = nn.Embedding(28, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.view(x.shape[0], 28, 28)
        positions = torch.arange(28, device=x.device).expand(x.shape[0], 28)  # [B, 28]: batch first, as routes need
        return self.head(self.encoder(self.embed(tokens) + self.position(positions)).mean(1))


def limit_test(data: ImageDataset, samples: int | None) -> ImageDataset:
    """``data`` with only its first ``samples`` test images (all when None)."""
    if samples is None:
        return data
    return dataclasses.replace(data, test_images=data.test_images[:samples], test_labels=data.test_labels[:samples])


def main(argv: list[str] | None = None) -> int:
    parser = example_arguments(__doc__, tasks=4, out="runs/transformer-example", test_samples=2000)
    parser.add_argument("--width", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam's learning rate on the scores (default 0.01)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="entropy",
                        help="One-Shot's objective: entropy, or g over superfluous outputs (default entropy)")
    parser.add_argument("--outputs", type=int, default=10,
                        help="outputs of the head; above 10 the rest are superfluous neurons for g (default 10)")
    parser.add_argument("--bias", choices=BIASES, default="per-task", help="bias policy (default per-task)")
    parser.add_argument("--norm-affine", choices=("per-task", "none"), default="per-task",
                        help="LayerNorm affine: per task, or none (default per-task)")
    parser.set_defaults(batches=300)
    args = parser.parse_args(argv)
    stream = permuted_mnist(args)
    stream.data = limit_test(stream.data, args.test_samples)
    torch.manual_seed(0)
    model = SupermaskModel(RowTransformer(args.width, classes=args.outputs), seed=1, bias=args.bias,
                           norm_affine=args.norm_affine if args.norm_affine == "per-task" else False, num_classes=10)
    print(model.conversion.table())
    print(f"\n{args.tasks} PermutedMNIST tasks as 28 row tokens, {args.batches} batches of 128 per task, "
          f"Adam {args.lr}; test: {args.test_samples or 'all'} samples per task; {model.bytes_per_task():,} bytes "
          f"per task ({model.mask_bytes_per_task():,} of masks)")
    start = time.perf_counter()
    cfg = TrainConfig(optimizer="adam", lr=args.lr, batches_per_task=args.batches)
    for _ in range(args.tasks):
        train_task_group(model, stream, cfg)
    trained = time.perf_counter() - start
    per_batch = Inference(objective=args.objective, granularity="batch")
    per_image = Inference(objective=args.objective, granularity="sample")
    rows = []
    print(f"\n{'task':>4}  {'given':>6}  {'inferred per batch':>18}  {'inferred per image':>18}")
    for t in range(args.tasks):
        batch = evaluate_task(model, stream, t, "GNs", per_batch)
        image = evaluate_task(model, stream, t, "GNs", per_image)
        rows.append({"task": t, "accuracy_given": batch.accuracy, "accuracy_inferred_batch": batch.accuracy_inferred,
                     "task_inference_batch": batch.task_inference_accuracy,
                     "accuracy_inferred_image": image.accuracy_inferred,
                     "task_inference_image": image.task_inference_accuracy})
        print(f"{t:>4}  {batch.accuracy:>6.4f}  {batch.accuracy_inferred:>18.4f}  {image.accuracy_inferred:>18.4f}")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "task"}
    print(f"{'mean':>4}  {mean['accuracy_given']:>6.4f}  {mean['accuracy_inferred_batch']:>18.4f}  "
          f"{mean['accuracy_inferred_image']:>18.4f}")
    print(f"task inference accuracy: per batch {mean['task_inference_batch']:.4f}, per image "
          f"{mean['task_inference_image']:.4f}; training {trained:.0f} s, total {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"args": vars(args), "bytes_per_task": model.bytes_per_task(),
                                      "mask_bytes_per_task": model.mask_bytes_per_task(), "tasks": rows,
                                      "mean": mean, "train_seconds": trained})
    return 0


if __name__ == "__main__":
    sys.exit(main())
