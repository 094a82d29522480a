"""Speed and memory benchmarks: every figure measured against the dense, mask-free computation of the
same shapes in the same run, so the ratios survive a slower or busier machine.

Rows (``run_benchmarks``):
- ``train``: one training step per task per batch (FC 1024-1024, output 500, batch 128, threshold masks,
  RMSprop), K = 1 and K tasks batched, against a dense step of the same network (forward + backward;
  ``dense_step_ms`` adds the optimiser step);
- ``oneshot``: One-Shot task inference on one image (entropy, α = 1/k) against k, against a dense forward +
  backward of one image; with the bytes the masks take and the peak memory;
- ``kernel``: the bank's two primitives (``contract`` = M @ g, ``superpose`` = Σ α_i M_i) per backend,
  as effective bandwidth over the packed bits.

Timings are medians of repeated runs (CPU: wall clock; CUDA: synchronised wall clock).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from supsup import kernels
from supsup.architectures import ARCHITECTURES, build_model
from supsup.inference import Inference, infer_tasks
from supsup.model import SupermaskModel

#: The goals of issue 4 (ms or ratios), printed beside the measured figures.
GOALS = {
    ("train", "cpu", 1): "<= 1.5x dense",
    ("train", "cpu", "batched"): "<= 1.3x dense per task",
    ("train", "cuda", "batched"): "<= 0.04 ms per task (H200)",
    ("oneshot", "cpu", "fc1024", 50): "<= 30 ms",
    ("oneshot", "cpu", "lenet", 250): "<= 15 ms",
    ("oneshot", "cuda", "lenet", 2500): "<= 0.2 ms, masks <= 100 MB (H200)",
    ("oneshot", "cuda", "lenet", 100000): "<= 2 ms, fits in memory",
}


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2,
            budget_s: float | None = None) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``reps`` runs (fewer if ``budget_s`` runs out)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        if budget_s is not None and time.perf_counter() - start_all > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 2,
                     budget_s: float | None = None) -> dict[str, float]:
    """Median milliseconds of each function, run in turn within every repetition, so that a change in
    the machine's load during the measurement hits all of them alike (the ratios stay meaningful)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start_all = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
        if budget_s is not None and time.perf_counter() - start_all > budget_s and len(times[name]) >= 3:
            break
    return {name: statistics.median(values) for name, values in times.items()}


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> int:
    """CUDA: peak bytes allocated since the last reset; CPU: the process's peak resident set (monotone)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def machine_info(device: torch.device) -> dict:
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "kernel_backend": kernels.backend_for(device),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["load_average"] = os.getloadavg()
        info["cpu_count"] = os.cpu_count()
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    elif kernels.native.why_unavailable():
        info["native_kernels"] = kernels.native.why_unavailable()
    return info


# ------------------------------------------------------------------------------------------ training
def _dense_net(name: str, output_size: int, device: torch.device) -> nn.Module:
    return ARCHITECTURES[name](output_size=output_size).to(device)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def bench_training(device: torch.device, *, name: str = "fc1024", output_size: int = 500, batch: int = 128,
                   counts: tuple[int, ...] = (1, 4), reps: int = 10, precision: str = "fp32",
                   budget_s: float = 20.0) -> list[dict]:
    """Per task per batch: a SupSup training step with K tasks batched vs a dense step of the same shapes."""
    torch.manual_seed(0)
    tf32 = precision == "tf32"
    old_tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
    rows = []
    try:
        dense = _dense_net(name, output_size, device)
        x = torch.randn(batch, 784, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        opt = torch.optim.RMSprop(dense.parameters(), lr=1e-4)

        def dense_fwd_bwd():
            with _autocast(device, precision):
                loss = F.cross_entropy(dense(x), y)
            loss.backward()
            dense.zero_grad(set_to_none=True)

        def dense_step():
            with _autocast(device, precision):
                loss = F.cross_entropy(dense(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for count in counts:
            model = build_model(name, output_size=output_size, seed=0).to(device)
            ids = model.begin_tasks(count)
            optimizer = torch.optim.RMSprop(model.score_parameters(), lr=1e-4)
            xs = torch.randn(batch * count, 784, device=device)
            ys = torch.randint(0, 10, (batch * count,), device=device)
            route = ids if count > 1 else ids[0]

            def step():  # the step of learners.train_task_group
                with _autocast(device, precision):
                    loss = F.cross_entropy(model(xs, route), ys, reduction="sum") / batch
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            _peak_reset(device)
            ms = time_interleaved({"supsup": step, "dense": dense_fwd_bwd, "dense_step": dense_step}, device, reps,
                                  budget_s=budget_s)
            per_task = ms["supsup"] / count
            rows.append({
                "figure": "train", "model": name, "output_size": output_size, "batch": batch, "tasks_at_once": count,
                "precision": precision, "ms_per_task_batch": per_task, "dense_fwd_bwd_ms": ms["dense"],
                "dense_step_ms": ms["dense_step"], "ratio_vs_dense": per_task / ms["dense"],
                "ratio_vs_dense_step": per_task / ms["dense_step"], "peak_bytes": _peak_bytes(device),
            })
            del model, optimizer, xs, ys
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return rows


# ------------------------------------------------------------------------------------------ one-shot
def random_bank_model(name: str, k: int, device: torch.device, output_size: int = 500, seed: int = 0) -> SupermaskModel:
    """A model whose banks hold ``k`` random masks (timing does not depend on the bits)."""
    model = build_model(name, output_size=output_size, seed=seed).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in model.mask_layers():
        packed = torch.randint(0, 256, (k, layer.bank.row_bytes), dtype=torch.uint8, device=device, generator=gen)
        layer.bank.load_packed(packed)
        del packed
    model.eval()
    return model


class GraphedOneShot:
    """One-Shot inference of one image replayed from a captured CUDA graph (no launch overhead)."""

    def __init__(self, model: SupermaskModel, x: torch.Tensor, how: Inference = Inference()):
        self.x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                infer_tasks(model, self.x, how)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = infer_tasks(model, self.x, how)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.graph.replay()
        return self.out


def bench_oneshot(device: torch.device, name: str, ks: list[int], *, output_size: int = 500, reps: int = 10,
                  budget_s: float = 10.0, graphs: bool = False) -> list[dict]:
    """One-Shot latency on one image against k, with the dense forward+backward of one image as reference."""
    rows = []
    x = torch.randn(1, 784, device=device)
    dense = _dense_net(name, output_size, device)

    def dense_fwd_bwd():
        out = dense(x)
        torch.special.entr(torch.softmax(out, -1)).sum().backward()
        dense.zero_grad(set_to_none=True)

    for k in ks:
        try:
            model = random_bank_model(name, k, device, output_size)
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # too many masks for this machine
            rows.append({"figure": "oneshot", "model": name, "k": k, "error": f"{type(exc).__name__}: {exc}"[:200]})
            break
        mask_bytes = sum(layer.bank.packed.numel() for layer in model.mask_layers())
        _peak_reset(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        ms = time_interleaved({"oneshot": lambda: infer_tasks(model, x), "dense": dense_fwd_bwd}, device, reps,
                              budget_s=budget_s)
        dense_ms, ms = ms["dense"], ms["oneshot"]
        row = {
            "figure": "oneshot", "model": name, "output_size": output_size, "k": k, "ms": ms,
            "dense_fwd_bwd_ms": dense_ms, "ratio_vs_dense": ms / dense_ms, "bytes_per_task": model.bytes_per_task(),
            "float32_bytes_per_task": 4 * model.num_weights(), "mask_bytes": mask_bytes,
            "peak_bytes": _peak_bytes(device), "peak_extra_bytes": (_peak_bytes(device) - base) if base else None,
            "backend": kernels.backend_for(device),
        }
        if graphs and device.type == "cuda":
            try:
                graphed = GraphedOneShot(model, x)
                row["graphed_ms"] = time_ms(lambda: graphed(x), device, reps * 5, budget_s=budget_s)
                del graphed
            except Exception as exc:  # capture is an optimisation: record why it failed and go on
                row["graphed_error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ kernels
def bench_kernels(device: torch.device, *, num_bits: int = 315_200, k: int = 2500, reps: int = 10,
                  backends: tuple[str, ...] | None = None, budget_s: float = 10.0) -> list[dict]:
    """``contract`` and ``superpose`` over ``k`` random packed rows of ``num_bits`` bits, per backend."""
    if backends is None:
        backends = ("torch", "triton") if device.type == "cuda" else ("torch", "native")
    packed = torch.randint(0, 256, (k, (num_bits + 7) // 8), dtype=torch.uint8, device=device)
    g = torch.randn(num_bits, device=device)
    alpha = torch.rand(k, device=device)
    rows = []
    for name in backends:
        if name == "native" and not kernels.native.available():
            continue
        if name == "triton" and not kernels.triton_available():
            continue
        with kernels.use_backend(name):
            for op, fn in (("contract", lambda: kernels.contract(packed, g)),
                           ("superpose", lambda: kernels.superpose(packed, alpha, num_bits))):
                ms = time_ms(fn, device, reps, budget_s=budget_s)
                rows.append({"figure": "kernel", "op": op, "backend": name, "k": k, "num_bits": num_bits, "ms": ms,
                             "packed_gb_per_s": packed.numel() / ms / 1e6})
    return rows


# ------------------------------------------------------------------------------------------ driver
def _plan(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        if quick:
            return {"train_counts": (1, 16), "fc_ks": [10, 250], "lenet_ks": [10, 2500], "kernel_k": 2500,
                    "reps": 20, "precisions": ("fp32",)}
        return {"train_counts": (1, 250), "fc_ks": [10, 250, 2500], "lenet_ks": [10, 250, 2500, 10000, 100000],
                "kernel_k": 2500, "reps": 30, "precisions": ("fp32", "tf32", "bf16")}
    if quick:
        return {"train_counts": (1, 4), "fc_ks": [10, 50], "lenet_ks": [10, 250, 1000], "kernel_k": 250,
                "reps": 7, "precisions": ("fp32",)}
    return {"train_counts": (1, 4, 8), "fc_ks": [10, 50, 250, 1000], "lenet_ks": [10, 250, 2500, 10000],
            "kernel_k": 2500, "reps": 21, "precisions": ("fp32",)}


def run_benchmarks(device: str | torch.device = "cpu", quick: bool = False, json_path: str | Path | None = None,
                   *, plan: dict | None = None, console=None, retain_memory: bool = True,
                   deadline: float | None = None) -> dict:
    """Run every benchmark on ``device``, print a table and (if ``json_path``) write JSON; returns the results.

    ``quick`` takes well under a minute on 2 CPU cores; ``plan`` overrides the sizes (keys of ``_plan``).
    ``retain_memory`` applies ``kernels.retain_freed_memory()`` first (CPU; the dense references run
    under the same allocator, and ``meta.retained_freed_memory`` records it). ``deadline`` (a
    ``time.perf_counter()`` value): parts not started by then are skipped and say so. The JSON is
    rewritten after every part."""
    device = torch.device(device)
    retained = kernels.retain_freed_memory() if retain_memory and device.type == "cpu" else False
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    settings = {**_plan(device, quick), **(plan or {})}
    results = {"meta": {**machine_info(device), "quick": quick, "retained_freed_memory": retained,
                        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}},
               "rows": []}
    started = time.perf_counter()
    reps = settings["reps"]
    graphs = device.type == "cuda"
    precisions = list(settings["precisions"])
    parts: list[tuple[str, Callable[[], list[dict]]]] = []
    if precisions:
        parts.append((f"train {precisions[0]}", lambda: bench_training(
            device, counts=tuple(settings["train_counts"]), reps=reps, precision=precisions[0])))
    parts += [(f"oneshot lenet k={k}", lambda k=k: bench_oneshot(device, "lenet", [k], reps=reps, graphs=graphs))
              for k in settings["lenet_ks"]]
    parts += [(f"oneshot fc1024 k={k}", lambda k=k: bench_oneshot(device, "fc1024", [k], reps=reps, graphs=graphs))
              for k in settings["fc_ks"]]
    parts += [(f"train {p}", lambda p=p: bench_training(device, counts=tuple(settings["train_counts"]), reps=reps,
                                                         precision=p))
              for p in precisions[1:]]
    parts.append(("kernels", lambda: bench_kernels(device, k=settings["kernel_k"], reps=reps)))
    for what, part in parts:
        if deadline is not None and time.perf_counter() > deadline:
            results["rows"].append({"figure": "error", "part": what, "error": "skipped: out of time"})
            continue
        try:
            results["rows"] += part()
        except Exception as exc:  # one failing part (e.g. out of memory) must not lose the others
            results["rows"].append({"figure": "error", "part": what, "error": f"{type(exc).__name__}: {exc}"[:300]})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if json_path is not None:  # after every part: a run killed later keeps what it measured
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(results, indent=2))
    if kernels.triton_failure:
        results["meta"]["triton_failure"] = kernels.triton_failure
    results["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    results["meta"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_table(results, console)
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results


def _goal(row: dict, device_type: str) -> str:
    if row["figure"] == "train":
        key = ("train", device_type, 1 if row["tasks_at_once"] == 1 else "batched")
    elif row["figure"] == "oneshot":
        key = ("oneshot", device_type, row["model"], row["k"])
    else:
        return ""
    return GOALS.get(key, "")


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:,.1f} MB"


def print_table(results: dict, console=None) -> None:
    from rich.console import Console

    from supsup.tables import make_table

    console = console or Console()
    meta = results["meta"]
    device_type = meta["device"].split(":")[0]
    title = (f"supsup bench on {meta.get('gpu') or meta['cpu']} ({meta['device']}, {meta['threads']} threads, "
             f"kernels: {meta['kernel_backend']}, {meta['date']})")
    table = make_table(["figure", "setting", "measured", "dense", "ratio", "memory", "goal"], title=title)
    for row in results["rows"]:
        if "error" in row:
            setting = row.get("part") or f"{row.get('model')} k={row.get('k', 0):,}"
            table.add_row(row["figure"], setting, "[red]" + row["error"][:60], "", "", "", "")
            continue
        if row["figure"] == "train":
            table.add_row("train / task / batch", f"{row['model']} K={row['tasks_at_once']} {row['precision']}",
                          f"{row['ms_per_task_batch']:.3f} ms", f"{row['dense_fwd_bwd_ms']:.3f} ms",
                          f"{row['ratio_vs_dense']:.2f}x", _mb(row["peak_bytes"]) + " peak", _goal(row, device_type))
        elif row["figure"] == "oneshot":
            measured = f"{row['ms']:.3f} ms"
            if "graphed_ms" in row:
                measured += f" (graph {row['graphed_ms']:.3f})"
            table.add_row("one-shot, 1 image", f"{row['model']} k={row['k']:,}", measured,
                          f"{row['dense_fwd_bwd_ms']:.3f} ms", f"{row['ratio_vs_dense']:.1f}x",
                          f"masks {_mb(row['mask_bytes'])}, {row['bytes_per_task']:,} B/task", _goal(row, device_type))
        else:
            table.add_row(f"kernel {row['op']}", f"{row['backend']} k={row['k']:,} P={row['num_bits']:,}",
                          f"{row['ms']:.3f} ms", "", "", f"{row['packed_gb_per_s']:.1f} GB/s of bits", "")
    console.print(table)
    console.print(f"{meta.get('seconds', 0)} s; load average {meta.get('load_average')} -> {meta.get('load_average_end')}")
    load, cores = (meta.get("load_average") or [0])[0], meta.get("cpu_count") or 1
    if device_type == "cpu" and meta["threads"] > 1 and load > cores - 0.5:
        console.print(f"[yellow]the machine is busy (load {load:.1f} on {cores} cores): torch ops with more than one "
                      "thread can stall a whole time slice waiting for their second thread, so these figures are "
                      "not reliable; --threads 1 measures the code, not the contention.")


def markdown_table(results: dict) -> str:
    """The rows of a results dict (or of a saved JSON) as a Markdown table, for BENCHMARKS.md."""
    from supsup.tables import make_table, markdown

    device_type = results["meta"]["device"].split(":")[0]
    rows = []
    for row in results["rows"]:
        if "error" in row:
            rows.append((row["figure"], f"{row.get('part') or row.get('model')} {row.get('k', '')}",
                         f"error: {row['error'][:80]}", "", "", "", ""))
        elif row["figure"] == "train":
            rows.append(("train, per task per batch", f"{row['model']} K={row['tasks_at_once']} {row['precision']}",
                         f"{row['ms_per_task_batch']:.3f} ms", f"{row['dense_fwd_bwd_ms']:.3f} ms (with optimiser "
                         f"step: {row['dense_step_ms']:.3f})", f"{row['ratio_vs_dense']:.2f}x "
                         f"({row['ratio_vs_dense_step']:.2f}x)", f"peak {_mb(row['peak_bytes'])}",
                         _goal(row, device_type)))
        elif row["figure"] == "oneshot":
            graphed = f" (CUDA graph: {row['graphed_ms']:.3f} ms)" if "graphed_ms" in row else ""
            rows.append(("One-Shot, one image", f"{row['model']} k={row['k']:,}", f"{row['ms']:.3f} ms{graphed}",
                         f"{row['dense_fwd_bwd_ms']:.3f} ms", f"{row['ratio_vs_dense']:.1f}x",
                         f"masks {_mb(row['mask_bytes'])} ({row['bytes_per_task']:,} B/task; float32: "
                         f"{row['float32_bytes_per_task']:,})", _goal(row, device_type)))
        else:
            rows.append((f"kernel {row['op']}", f"{row['backend']}, k={row['k']:,}, P={row['num_bits']:,}",
                         f"{row['ms']:.3f} ms", "", "", f"{row['packed_gb_per_s']:.1f} GB/s of packed bits", ""))
    return markdown(make_table(["figure", "setting", "measured", "dense, same run", "ratio", "memory", "goal"],
                               rows))


if __name__ == "__main__":  # python -m supsup.bench RESULTS.json  ->  Markdown rows
    import sys

    print(markdown_table(json.loads(Path(sys.argv[1]).read_text())))
