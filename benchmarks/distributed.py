"""Task-parallel training and sharded One-Shot inference on 1 vs 2 processes (gloo on 127.0.0.1, one
thread per process), measured in the same run, world sizes interleaved repetition by repetition.

- ``train``: wall-clock seconds (rank 0, between two barriers, after one untimed round) to learn ``--tasks``
  more PermutedMNIST tasks, LeNet 300-100, output 100, ``--batches`` batches of 128 per task,
  ``tasks_at_once`` 1, with ``distributed.train_round`` (the run loop's path: every round's masks
  all-gathered and frozen on every rank); tasks per second and the 2-vs-1 ratio. The control: 2 processes
  side by side that do not communicate, each learning half the tasks alone (what the machine gives two
  processes, without any distributed cost).
- ``oneshot``: One-Shot inference of one image (entropy, α = 1/k) over ``--k`` random LeNet masks
  (output 500: 39,400 bytes per task), the bank whole in 1 process and sharded over 2
  (``bank.ShardedMaskBank``); milliseconds, mask bytes held per rank, and the growth of each process's
  resident memory while its bank is filled.

Besides wall-clock time, both report CPU time (``train``: CPU seconds per task, all ranks together, and the
cores the processes got, CPU / wall seconds; ``oneshot``: CPU ms per rank): on a shared machine the 2-process
speed-up is bounded by the CPU the scheduler gives the session.

    PYTHONPATH=src python benchmarks/distributed.py --data-root $SUPSUP_DATA --json benchmarks/results/cpu-distributed.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from supsup import distributed
from supsup.architectures import build_model
from supsup.bank import MaskBank, ShardedMaskBank
from supsup.data.idx import load_mnist
from supsup.data.streams import PermutedMNIST
from supsup.inference import infer_tasks
from supsup.learners import TrainConfig
from supsup.seeding import generator


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _barrier(world: distributed.World) -> None:
    if world.size > 1:
        dist.barrier()


def train(world: distributed.World, data_root: str, tasks: int, batches: int) -> dict:
    stream = PermutedMNIST(load_mnist(data_root), world.size + tasks, seed=1)
    model = build_model("lenet", output_size=100, seed=1)
    cfg = TrainConfig(batches_per_task=batches)
    distributed.train_round(model, stream, cfg, world)  # one untimed round: first-call costs of every process
    _barrier(world)
    start, cpu = time.perf_counter(), time.process_time()
    while model.num_tasks < world.size + tasks:
        distributed.train_round(model, stream, cfg, world)
    cpu = time.process_time() - cpu
    _barrier(world)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu}


def oneshot(world: distributed.World, k: int, reps: int) -> dict:
    model = build_model("lenet", output_size=500, seed=0).eval()
    before = _rss_bytes()
    chunk = 1000
    for layer_index, layer in enumerate(model.mask_layers()):
        if world.size > 1:
            layer.bank = ShardedMaskBank(layer.bank.shape)
        bank: MaskBank | ShardedMaskBank = layer.bank
        bank.reserve(k)  # exactly k rows (this rank's share), not the doubling growth
        for start in range(0, k, chunk):  # the same random rows on every rank; each keeps its own
            rows = torch.randint(0, 256, (min(chunk, k - start), bank.row_bytes), dtype=torch.uint8,
                                 generator=generator(0, "bench-masks", layer_index, start))
            bank.add_packed(rows)
    grown = _rss_bytes() - before
    held = sum(layer.bank.nbytes if world.size > 1 else layer.bank.packed.numel() for layer in model.mask_layers())
    x = torch.randn(1, 784, generator=generator(0, "bench-image"))
    task = int(infer_tasks(model, x))
    times, cpu = [], []
    for _ in range(reps + 2):
        _barrier(world)
        tick, tock = time.perf_counter(), time.process_time()
        infer_tasks(model, x)
        times.append(1e3 * (time.perf_counter() - tick))
        cpu.append(1e3 * (time.process_time() - tock))
    return {"ms": statistics.median(times[2:]), "cpu_ms": statistics.median(cpu[2:]), "mask_bytes_held": held,
            "rss_growth_bytes": grown, "task": task}


def _entry(rank: int, nprocs: int, port: int, out: str, job: str, args: tuple) -> None:
    alone = job == "alone"  # the control: processes side by side, each its own world of one
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0" if alone else str(rank),
                      LOCAL_RANK="0" if alone else str(rank), WORLD_SIZE="1" if alone else str(nprocs))
    torch.set_num_threads(1)
    world = distributed.init("cpu")
    try:
        result = {"train": train, "alone": train, "oneshot": oneshot}[job](world, *args)
        torch.save(result, Path(out) / f"{rank}.pt")
    finally:
        distributed.close(world)


def launch(nprocs: int, job: str, *args) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(nprocs, port, out, job, args), nprocs=nprocs, start_method="spawn")
        return [torch.load(Path(out) / f"{rank}.pt", weights_only=True) for rank in range(nprocs)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("SUPSUP_DATA"))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--k", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each world size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "processor": _cpu_name(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads_per_process": 1, "load_average_before": os.getloadavg()}
    kinds = {(1, "train"): (1, args.tasks), (2, "train"): (2, args.tasks), (2, "alone"): (2, args.tasks // 2)}
    runs = {kind: [] for kind in kinds}
    for _ in range(args.reps):
        for (n, job), (_, tasks) in kinds.items():
            runs[n, job].append(launch(n, job, args.data_root, tasks, args.batches))
    train_rows = []
    for (n, job), reps in runs.items():
        seconds = statistics.median(max(r["seconds"] for r in ranks) for ranks in reps)
        cpu = statistics.median(sum(r["cpu_seconds"] for r in ranks) for ranks in reps)  # all processes together
        train_rows.append({"figure": "train", "processes": n, "mode": "independent" if job == "alone" else "distributed",
                           "tasks": args.tasks, "batches_per_task": args.batches, "seconds": seconds,
                           "tasks_per_s": args.tasks / seconds, "cpu_seconds_per_task": cpu / args.tasks,
                           "cores_used": cpu / seconds, "all_seconds": [max(r["seconds"] for r in ranks) for ranks in reps]})
    shot = {n: launch(n, "oneshot", args.k, 20) for n in (1, 2)}
    oneshot_rows = [{"figure": "oneshot", "processes": n, "k": args.k, "ms": ranks[0]["ms"],
                     "cpu_ms_per_rank": [r["cpu_ms"] for r in ranks],
                     "mask_bytes_held_per_rank": [r["mask_bytes_held"] for r in ranks],
                     "rss_growth_bytes_per_rank": [r["rss_growth_bytes"] for r in ranks],
                     "task": ranks[0]["task"]} for n, ranks in shot.items()]
    meta["load_average_after"] = os.getloadavg()
    results = {"meta": meta, "rows": train_rows + oneshot_rows,
               "train_throughput_ratio_2_vs_1": train_rows[1]["tasks_per_s"] / train_rows[0]["tasks_per_s"],
               "control_ratio_2_independent_vs_1": train_rows[2]["tasks_per_s"] / train_rows[0]["tasks_per_s"],
               "oneshot_same_task": shot[1][0]["task"] == shot[2][0]["task"] == shot[2][1]["task"]}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main(sys.argv[1:])
