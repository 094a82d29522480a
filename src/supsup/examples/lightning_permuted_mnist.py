"""SupSup in PyTorch Lightning: one Trainer.fit per PermutedMNIST task, a checkpoint, every task restored.

    python -m supsup.examples.lightning_permuted_mnist [--tasks 2] [--batches 200] [--test-samples N] [--out DIR]

Needs ``pip install 'supsup[lightning]'``. Writes ``OUT/supsup.ckpt``, a Lightning checkpoint, then loads it
into a freshly built model and compares the predictions of every task.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from supsup import build_model
from supsup.evaluation import predict
from supsup.examples import example_arguments, permuted_mnist
from supsup.integrations.lightning import SupSupModule, pl


def train_loader(stream, task: int, batches: int) -> DataLoader:
    """``batches`` x 128 of the task's training samples (seeded by the stream), shuffled by Lightning."""
    x, y = stream.batch(task, "train", next(stream.batch_indices(task, batches * 128, 1)))
    return DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)


def main(argv: list[str] | None = None) -> int:
    args = example_arguments(__doc__, tasks=2, out="runs/lightning-example").parse_args(argv)
    stream = permuted_mnist(args)
    pl.seed_everything(1, verbose=False)
    module = SupSupModule(build_model("lenet", output_size=100, seed=1), optimizer="rmsprop", lr=1e-4)
    trainer = None
    for task in range(args.tasks):  # SupSupCallback begins the task before the fit and freezes it after
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train_loader(stream, task, args.batches))
    checkpoint = Path(args.out) / "supsup.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=True)  # the masks; the optimiser state died with the scores
    restored = SupSupModule.load_from_checkpoint(checkpoint, model=build_model("lenet", output_size=100, seed=1),
                                                 weights_only=True)
    print(f"lightning: {stream.name}, {args.tasks} tasks x {args.batches} batches of 128")
    print(f"lenet (s=100), RMSprop 1e-4, test: {args.test_samples or 'all'} samples per task")
    print(f"{'task':>4}  {'accuracy':>8}  {'restored':>8}  {'identical outputs':>17}")
    for task in range(args.tasks):
        n = stream.size(task, "test") if args.test_samples is None else args.test_samples
        x, y = stream.batch(task, "test", torch.arange(n))
        trained, loaded = (predict(m.model.eval(), x, task) for m in (module, restored))
        same = torch.equal(module.model(x, task), restored.model(x, task))
        print(f"{task:>4}  {(trained == y).float().mean():>8.4f}  {(loaded == y).float().mean():>8.4f}  "
              f"{'yes' if same else 'NO':>17}")
    print(f"checkpoint: {checkpoint} ({checkpoint.stat().st_size:,} bytes for {args.tasks} tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
