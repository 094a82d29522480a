"""Scenario NNs on PermutedMNIST (issue 6): task-free training over hidden tasks, then shared-label
accuracy with One-Shot H inferred masks. Writes ``result.json`` (decision log + config) and
``evaluation.json`` into ``--out``.

With ``--train-seconds S`` hidden tasks stream one after another (at most ``--tasks``) and the stream
ends at the first hidden-task boundary after S seconds of training, so every streamed task is
complete; the evaluation covers the streamed tasks (an evenly spaced subset of them when
``--eval-seconds`` would not cover all; ``evaluated_tasks`` in evaluation.json lists the tasks the
average is over). evaluation.json is written after training and rewritten after every evaluated task
(``evaluation_complete`` is true once the evaluation ended).

    nice -n 10 .venv/bin/python scripts/nns_permuted_mnist.py --tasks 20 --out runs/issue6/nns-20
    .venv/bin/python scripts/nns_permuted_mnist.py --tasks 2500 --train-seconds 200 --eval-seconds 40 --out runs/nns
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from supsup.architectures import build_model
from supsup.data.idx import load_mnist
from supsup.data.streams import PermutedMNIST
from supsup.nns import (
    NNsConfig,
    NNsEvaluation,
    NNsLearner,
    NNsTaskResult,
    evaluate_nns_within,
    hidden_task_batches,
)


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20, help="hidden tasks (permutations); the most streamed "
                   "when --train-seconds is set")
    p.add_argument("--train-seconds", type=positive, default=None,
                   help="stop the stream at the first hidden-task boundary after this many seconds of training")
    p.add_argument("--eval-seconds", type=positive, default=None,
                   help="evaluate an evenly spaced subset of the streamed tasks that fits this many seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: this torch {torch.__version__} sees no CUDA device; use --device cpu")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    def clock() -> float:
        """Seconds, after the device's queued work has finished (so GPU time is counted where it is spent)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    begin = clock()
    stream = PermutedMNIST(load_mnist(args.data, device), args.tasks, seed=args.seed)
    model = build_model(args.arch, output_size=args.output_size, seed=args.seed).to(device)
    cfg = NNsConfig(check_every=args.check_every, epsilon=args.epsilon, min_slots=args.min_slots,
                    budget=args.budget, when_full=args.when_full)
    learner = NNsLearner(model, cfg)
    start = clock()
    setup_s = start - begin

    def keep_going(done: int) -> bool:
        elapsed = clock() - start
        print(f"hidden task {done - 1:5d} done  masks {learner.num_masks:5d}  {elapsed:7.1f} s", flush=True)
        return args.train_seconds is None or elapsed < args.train_seconds

    for x, y in hidden_task_batches(stream, args.batches_per_task, args.batch_size, keep_going=keep_going):
        learner.step(x, y)
        if learner.stopped:
            break
    result = learner.finish()
    train_s = clock() - start
    result.save(args.out / "result.json")

    streamed = math.ceil(result.batches / args.batches_per_task)  # the last is partial only after a budget stop
    new = [d.batch for d in result.decisions if d.decision == "new"]
    boundaries = [t * args.batches_per_task for t in range(1, streamed)]
    missed = sorted(set(boundaries) - set(new))
    print(f"masks allocated: {result.num_masks} for {streamed} hidden tasks in {train_s:.1f} s "
          f"({1000 * train_s / result.batches:.3f} ms per batch); missed boundaries {len(missed)}", flush=True)
    summary = {
        "hidden_tasks_streamed": streamed, "hidden_tasks_max": args.tasks,
        "time_limited": args.train_seconds is not None and streamed < args.tasks and not result.stopped,
        "budget_stopped": result.stopped, "masks": result.num_masks, "batches": result.batches,
        "setup_s": setup_s, "train_s": train_s, "ms_per_batch": 1000 * train_s / result.batches,
        "allocated_at": new, "missed_boundaries": missed,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
        "eval_s": None, "evaluation_complete": False, "average_accuracy": None, "evaluated_tasks": [],
    }

    def write(**fields) -> None:
        summary.update(fields)
        (args.out / "evaluation.json").write_text(json.dumps(summary, indent=1))

    write()
    eval_start, done = clock(), []

    def on_task(r: NNsTaskResult) -> None:
        """Print the task and rewrite evaluation.json, so a run killed while evaluating keeps what it has."""
        print(f"hidden task {r.task:5d}  acc {r.accuracy:.4f}  masks {r.inferred}", flush=True)
        done.append(r)
        write(**NNsEvaluation(sorted(done, key=lambda t: t.task)).as_dict(), eval_s=time.perf_counter() - eval_start)

    evaluation = evaluate_nns_within(model, stream, streamed, args.eval_seconds, clock=clock, on_task=on_task)
    eval_s = clock() - eval_start
    count = len(evaluation.tasks)
    write(**evaluation.as_dict(), eval_s=eval_s, total_s=clock() - begin, evaluation_complete=True,
          average_over=f"{count} of {streamed} streamed hidden tasks"
                       + ("" if count == streamed else " (evenly spaced subset, see evaluated_tasks)"))
    print(f"average accuracy with inferred masks: {evaluation.average_accuracy:.4f} over {summary['average_over']}  "
          f"(train {train_s:.0f} s, eval {eval_s:.0f} s, total {summary['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
