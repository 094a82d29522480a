"""SupSup as an Avalanche strategy on PermutedMNIST, once with task labels and once without.

    python -m supsup.examples.avalanche_permuted_mnist [--tasks 3] [--batches 200] [--test-samples 2000] [--out DIR]

Needs ``pip install 'supsup[avalanche]'``. Avalanche's own evaluation plugin reports accuracy and
forgetting per experience, beside supsup's task-inference accuracy; its TextLogger writes ``OUT/log.txt``
and the final metrics go to ``OUT/metrics.json``. Avalanche's loader reads sample by sample, so the test
stream is the first 2,000 test samples of each task unless ``--test-samples`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.logging import TextLogger
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin

from supsup import build_model
from supsup.examples import example_arguments, permuted_mnist
from supsup.files import write_json
from supsup.integrations.avalanche import SupSup, SupSupModel, stream_benchmark, task_inference_metrics
from supsup.learners import TrainConfig


def run(benchmark, log) -> dict[str, float]:
    """Train on every experience, evaluating the whole test stream after each; the last metrics."""
    RNGManager.set_random_seeds(1)  # the loader's shuffling
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 forgetting_metrics(experience=True, stream=True),
                                 *task_inference_metrics(), loggers=[TextLogger(log)])
    model = SupSupModel(build_model("lenet", output_size=100, seed=1))
    strategy = SupSup(model=model, optimizer="rmsprop", lr=1e-4, train_mb_size=128, eval_mb_size=1000,
                      evaluator=evaluator)
    for experience in benchmark.train_stream:
        strategy.train(experience)
        metrics = strategy.eval(benchmark.test_stream)
    return metrics


def per_experience(metrics: dict[str, float], name: str, experience: int) -> float | None:
    """The value of metric ``name`` (e.g. ``Top1_Acc_Exp``) for one experience, if reported."""
    for key, value in metrics.items():
        if key.startswith(name + "/") and key.endswith(f"/Exp{experience:03d}"):
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    args = example_arguments(__doc__, tasks=3, out="runs/avalanche-example", test_samples=2000).parse_args(argv)
    stream = permuted_mnist(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"avalanche: {stream.name}, {args.tasks} experiences x {args.batches} batches of 128")
    print(f"lenet (s=100), RMSprop 1e-4, test: {args.test_samples or 'all'} samples per task")
    print(f"{'task labels':>11}  {'experience':>10}  {'accuracy':>8}  {'forgetting':>10}  {'task inference':>14}")
    results = {}
    with open(out / "log.txt", "w") as log:
        for labels in ("given", "inferred"):
            benchmark = stream_benchmark(stream, task_labels=labels == "given",
                                         batches=TrainConfig(batches_per_task=args.batches),
                                         test_samples=args.test_samples)
            results[labels] = metrics = run(benchmark, log)
            for e in range(args.tasks):
                forgetting = per_experience(metrics, "ExperienceForgetting", e)
                print(f"{labels:>11}  {e:>10}  {per_experience(metrics, 'Top1_Acc_Exp', e):>8.4f}  "
                      f"{'-' if forgetting is None else f'{forgetting:.4f}':>10}  "
                      f"{per_experience(metrics, 'TaskInference_Exp', e):>14.4f}")
    write_json(out / "metrics.json", results)
    print(f"metrics: {out / 'metrics.json'}, Avalanche's log: {out / 'log.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
