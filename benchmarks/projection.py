"""The projection in BENCHMARKS.md: LeNet 300-100 (output 500) at 10^5 and 10^6 tasks on nodes of 8 GPUs,
computed from the inputs below, each a figure measured in this project or a vendor's specification.

    python benchmarks/projection.py        # prints the Markdown tables
"""

from __future__ import annotations

import math

#: name -> (value, unit, source)
INPUTS = {
    "mask_bytes": (39_400, "B per task", "BENCHMARKS.md, H200 One-Shot rows: LeNet out 500, 39,400 B/task"),
    "batches": (1000, "batches of 128 per task", "the paper's MNIST schedule (presets)"),
    "batch_ms_k1": (2.38, "ms per LeNet batch, one task at a time, H200",
                    "REPRODUCIBILITY.md, NNs run on the H200 (launch-bound LeNet)"),
    "batch_ms_k250": (0.116, "ms per task per batch, 250 tasks batched, fp32, H200",
                      "BENCHMARKS.md, H200 train row, FC 1024-1024 K=250 fp32 (LeNet: 13% of its weights, so "
                      "at most this)"),
    "train_peak_fc_k250": (9_674e6, "B peak, FC 1024-1024 K=250 fp32, H200", "BENCHMARKS.md, same row"),
    "weights_fc": (2_363_392, "weights", "FC 1024-1024 out 500: 784·1024 + 1024·1024 + 1024·500"),
    "weights_lenet": (315_200, "weights", "LeNet 300-100 out 500: 784·300 + 300·100 + 100·500"),
    "oneshot_ms": ({250: 0.315, 2_500: 0.738, 10_000: 1.801, 100_000: 12.458}, "ms, one image, CUDA graph, H200",
                   "BENCHMARKS.md, H200 One-Shot rows (LeNet out 500)"),
    "checkpoint_bytes_per_s": (98.5e6 / 0.54, "B/s rewriting the checkpoint",
                               "RELIABILITY.md: 0.54 s for 2,500 LeNet tasks (98.5 MB), 2-core CPU of this project"),
    "gpu_memory": (141e9, "B per H200", "NVIDIA H200 specification"),
    "infiniband": (50e9, "B/s per GPU", "one 400 Gb/s NDR InfiniBand port per GPU (DGX H200 specification)"),
}


def v(name: str):
    return INPUTS[name][0]


def oneshot_ms(k: float) -> float:
    """Interpolated between the measured k (linear in k, as the contraction is), extrapolated past 10^5."""
    points = sorted(v("oneshot_ms").items())
    for (k0, t0), (k1, t1) in zip(points, points[1:]):
        if k <= k1 or (k1, t1) == points[-1]:
            return t0 + (t1 - t0) * (k - k0) / (k1 - k0)
    raise AssertionError


def table(tasks_list=(100_000, 1_000_000), nodes_list=(2, 4, 8), tasks_at_once=250) -> str:
    lines = ["| tasks | GPUs | rounds (K = 250 per rank) | training, at most | time per task (all GPUs) | "
             "bytes in per rank per round | memory per rank, training | masks per rank, sharded inference | "
             "One-Shot, one image, sharded | checkpoint: last, all rounds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    training_state = v("train_peak_fc_k250") * v("weights_lenet") / v("weights_fc")
    for tasks in tasks_list:
        for nodes in nodes_list:
            ranks = 8 * nodes
            per_round = ranks * tasks_at_once
            rounds = math.ceil(tasks / per_round)
            round_s = tasks_at_once * v("batches") * v("batch_ms_k250") / 1e3
            gathered = per_round * v("mask_bytes")
            shard = math.ceil(tasks / ranks)
            gather_s = 4 * tasks / v("infiniband")  # the α-gradient all-gather, k floats, across nodes
            memory = tasks * v("mask_bytes") + training_state + gathered
            saves = sum(min((i + 1) * per_round, tasks) for i in range(rounds)) * v("mask_bytes")
            rate = v("checkpoint_bytes_per_s")
            lines.append(
                f"| {tasks:,} | {ranks} ({nodes} × 8) | {rounds} × {round_s:.0f} s | {rounds * round_s / 60:.0f} min | "
                f"{round_s / per_round * 1e3:.2f} ms | "
                f"{gathered / 1e6:.0f} MB ({gathered / v('infiniband') * 1e3:.1f} ms at IB speed) | "
                f"{memory / 1e9:.1f} GB ({100 * memory / v('gpu_memory'):.0f}% of an H200) | "
                f"{shard * v('mask_bytes') / 1e9:.2f} GB ({shard:,} tasks) | "
                f"{oneshot_ms(shard):.1f} ms + {gather_s * 1e3:.2f} ms gather | "
                f"{tasks * v('mask_bytes') / rate:.0f} s, {saves / rate / 60:,.0f} min |")
    return "\n".join(lines)


def main() -> None:
    print("| input | value | source |\n|---|---|---|")
    for name, (value, unit, source) in INPUTS.items():
        shown = ", ".join(f"k={k:,}: {t}" for k, t in value.items()) if isinstance(value, dict) else f"{value:,.4g}"
        print(f"| `{name}` | {shown} {unit} | {source} |")
    print()
    print(table())
    k1_s = v("batches") * v("batch_ms_k1") / 1e3
    print(f"\nOne task at a time (K = 1): {k1_s:.2f} s per task per GPU; 10^6 tasks on 32 GPUs: "
          f"{1e6 * k1_s / 32 / 3600:.1f} h.")
    whole = oneshot_ms(1e6)
    print(f"One-Shot over 10^6 masks on one GPU (39.4 GB, extrapolated): {whole:.0f} ms per image.")


if __name__ == "__main__":
    main()
