"""Speed and memory benchmarks: every figure measured against the dense, mask-free computation of the
same shapes in the same run, so the ratios survive a slower or busier machine.

Rows (``run_benchmarks``):
- ``train``: one training step per task per batch (FC 1024-1024, output 500, batch 128, threshold masks,
  RMSprop: the fused step where it applies, and then also torch's, ``unfused_*``), K = 1 and K tasks
  batched, against a dense step of the same network (forward + backward; ``dense_step_ms`` adds the
  optimiser step);
- ``oneshot``: One-Shot task inference on one real MNIST test image (normalised, as a PermutedMNIST task
  feeds it; a different image each repetition; random images only when MNIST is not at hand) against k,
  against a dense forward + backward of the same image and against one ``memcpy`` of as many bytes as
  the masks take (the floor of any method that reads every mask once); with the peak memory;
- ``per-sample``: per-sample One-Shot of a batch of real MNIST test images over 50 LeNet masks against the
  50 masked forwards of that batch;
- ``kernel``: the bank's two primitives (``contract`` = M @ g, ``superpose`` = Σ α_i M_i) per backend,
  as effective bandwidth over the packed bits.

Timings are medians of repeated runs (CPU: wall clock; CUDA: synchronised wall clock); every row also
records its run-to-run spread (interquartile range / median), on the CPU the same ratios in CPU time
(which a busy machine inflates far less), and ``meta`` the machine (CPU model and flags, load average
before and after).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from supsup import kernels
from supsup.architectures import ARCHITECTURES, build_model
from supsup.fused import ThresholdRMSprop
from supsup.inference import Inference, infer_tasks
from supsup.learners import TrainConfig, make_optimizer
from supsup.model import SupermaskModel

#: The goals of issues 4 and 15 (ms or ratios; CPU goals on one thread), printed beside the measured figures.
GOALS = {
    ("train", "cpu", 1): "<= 1.4x dense",
    ("train", "cpu", 8): "<= 1.25x dense per task",
    ("train", "cuda", "batched"): "<= 0.04 ms per task (H200)",
    ("oneshot", "cpu", "fc1024", 50): "<= 30 ms",
    ("oneshot", "cpu", "fc1024", 1000): "<= 40 ms",
    ("oneshot", "cpu", "lenet", 250): "<= 15 ms",
    ("oneshot", "cpu", "lenet", 2500): "<= 1.0x memcpy of its masks",
    ("oneshot", "cpu", "lenet", 10000): "<= 30 ms",
    ("oneshot", "cuda", "lenet", 2500): "<= 0.2 ms, masks <= 100 MB (H200)",
    ("oneshot", "cuda", "lenet", 100000): "<= 2 ms, fits in memory",
    ("per-sample", "cpu", 1024): "<= 1.0x the k masked forwards",
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


def spread(times: list[float]) -> float:
    """Run-to-run spread of repeated timings: interquartile range / median (0.1 = 10%)."""
    if len(times) < 4:
        return (max(times) - min(times)) / statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


@dataclass
class Timings:
    """Milliseconds of every repetition: ``wall`` clock, and ``cpu``, the CPU time this process used (on a
    shared machine it excludes the time spent waiting for a core, so it is far less sensitive to the load;
    with several threads it adds them up)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    def median(self, name: str, kind: str = "wall") -> float:
        return statistics.median(getattr(self, kind)[name])


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 2,
                     budget_s: float | None = None) -> Timings:
    """Every repetition of each function, run in turn within every repetition, so that a change in the
    machine's load during the measurement hits all of them alike (the ratios stay meaningful)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = Timings({name: [] for name in fns}, {name: [] for name in fns})
    start_all = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times.wall[name].append((time.perf_counter() - start) * 1e3)
            times.cpu[name].append((time.process_time() - start_cpu) * 1e3)
        if budget_s is not None and time.perf_counter() - start_all > budget_s and len(times.wall[name]) >= 3:
            break
    return times


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> int:
    """CUDA: peak bytes allocated since the last reset; CPU: the process's peak resident set (monotone)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


#: CPU flags shown in the table's title (all of them are in ``meta.cpu_flags``).
KEY_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vbmi", "amx_tile", "hypervisor")


def machine_info(device: torch.device) -> dict:
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "kernel_backend": kernels.backend_for(device),
        "cpu_count": os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average"] = os.getloadavg()
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        info["cpu"] = fields.get("model name", info["cpu"])
        info["cpu_mhz"] = fields.get("cpu MHz")
        info["cpu_flags"] = fields.get("flags", "").split()
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

        def training_step(xs: torch.Tensor, ys: torch.Tensor, count: int,
                          fused_step: bool) -> tuple[Callable[[], None], torch.optim.Optimizer]:
            """The step of learners.fit_task_group on K = ``count`` tasks: the fused step where it applies,
            or (``fused_step=False``) torch's RMSprop."""
            model = build_model(name, output_size=output_size, seed=0).to(device)
            ids = model.begin_tasks(count)
            optimizer = make_optimizer(model, TrainConfig(lr=1e-4, fused_step=fused_step))
            route = ids if count > 1 else ids[0]

            def step():
                with _autocast(device, precision):
                    loss = F.cross_entropy(model(xs, route), ys, reduction="sum") / batch
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return step, optimizer

        for count in counts:
            xs = torch.randn(batch * count, 784, device=device)
            ys = torch.randint(0, 10, (batch * count,), device=device)
            step, optimizer = training_step(xs, ys, count, fused_step=True)
            steps = {"supsup": step}
            if isinstance(optimizer, ThresholdRMSprop):  # against torch's RMSprop, in the same run
                steps["unfused"] = training_step(xs, ys, count, fused_step=False)[0]
            _peak_reset(device)
            times = time_interleaved({**steps, "dense": dense_fwd_bwd, "dense_step": dense_step}, device,
                                     reps, budget_s=budget_s)
            ms = {name: times.median(name) for name in times.wall}
            per_task = ms["supsup"] / count
            rows.append({
                "figure": "train", "model": name, "output_size": output_size, "batch": batch, "tasks_at_once": count,
                "precision": precision, "ms_per_task_batch": per_task, "dense_fwd_bwd_ms": ms["dense"],
                "dense_step_ms": ms["dense_step"], "ratio_vs_dense": per_task / ms["dense"],
                "ratio_vs_dense_step": per_task / ms["dense_step"], "peak_bytes": _peak_bytes(device),
                "spread": spread(times.wall["supsup"]), "dense_spread": spread(times.wall["dense"]),
                "reps": len(times.wall["dense"]),
            })
            if "unfused" in steps:
                rows[-1].update(step="fused", unfused_ms_per_task_batch=ms["unfused"] / count,
                                unfused_ratio_vs_dense=ms["unfused"] / count / ms["dense"])
            if device.type == "cpu":
                rows[-1]["cpu_ratio_vs_dense"] = times.median("supsup", "cpu") / count / times.median("dense", "cpu")
            del steps, step, optimizer, xs, ys
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


def oneshot_images(device: torch.device, count: int = 64) -> tuple[torch.Tensor, str]:
    """``[count, 784]`` MNIST test images as PermutedMNIST task 0 feeds them (normalised, permuted: about 82%
    of the pixels are the background value) and where they came from; random normal images, said so, when
    MNIST cannot be loaded (no data root and no network)."""
    from supsup.data.idx import load_mnist
    from supsup.data.streams import PermutedMNIST

    try:
        stream = PermutedMNIST(load_mnist(), 1, seed=1)
        images = stream.batch(0, "test", torch.arange(count))[0]
        what = f"MNIST test images 0..{count - 1}, PermutedMNIST task 0 ({stream.data.source})"
    except Exception as exc:  # the figures are still measured, on images without MNIST's background
        images = torch.randn(count, 784, generator=torch.Generator().manual_seed(0))
        what = f"random normal images (MNIST unavailable: {type(exc).__name__}: {exc})"[:300]
    return images.to(device), what


class Memcpy:
    """One ``memcpy`` of ``nbytes`` between two buffers touched beforehand (CPU), or a device-to-device copy."""

    def __init__(self, nbytes: int, device: torch.device):
        self.src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        self.dst = torch.zeros_like(self.src)

    def __call__(self) -> None:
        if self.src.is_cuda:
            self.dst.copy_(self.src)
        else:
            ctypes.memmove(self.dst.data_ptr(), self.src.data_ptr(), self.src.numel())


def bench_oneshot(device: torch.device, name: str, ks: list[int], *, output_size: int = 500, reps: int = 10,
                  budget_s: float = 10.0, graphs: bool = False, images: torch.Tensor | None = None) -> list[dict]:
    """One-Shot latency on one image against k, with the dense forward+backward of the same image and one
    memcpy of the masks' bytes as references, interleaved repetition by repetition."""
    rows = []
    if images is None:
        images = oneshot_images(device)[0]
    dense = _dense_net(name, output_size, device)
    turn = {"dense": 0, "oneshot": 0}

    def image(side: str) -> torch.Tensor:  # the two sides see the same sequence of images
        turn[side] += 1
        return images[turn[side] % images.shape[0]][None]

    def dense_fwd_bwd():
        out = dense(image("dense"))
        torch.special.entr(torch.softmax(out, -1)).sum().backward()
        dense.zero_grad(set_to_none=True)

    for k in ks:
        try:
            model = random_bank_model(name, k, device, output_size)
            mask_bytes = sum(layer.bank.row_bytes for layer in model.mask_layers()) * k
            copy = Memcpy(mask_bytes, device)
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # too many masks for this machine
            rows.append({"figure": "oneshot", "model": name, "k": k, "error": f"{type(exc).__name__}: {exc}"[:200]})
            break
        _peak_reset(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times = time_interleaved({"oneshot": lambda: infer_tasks(model, image("oneshot")), "dense": dense_fwd_bwd,
                                  "memcpy": copy}, device, reps, budget_s=budget_s)
        ms = {side: times.median(side) for side in times.wall}
        row = {
            "figure": "oneshot", "model": name, "output_size": output_size, "k": k, "ms": ms["oneshot"],
            "dense_fwd_bwd_ms": ms["dense"], "ratio_vs_dense": ms["oneshot"] / ms["dense"],
            "memcpy_ms": ms["memcpy"], "ratio_vs_memcpy": ms["oneshot"] / ms["memcpy"],
            "spread": spread(times.wall["oneshot"]), "memcpy_spread": spread(times.wall["memcpy"]),
            "reps": len(times.wall["memcpy"]),
            "bytes_per_task": model.bytes_per_task(), "float32_bytes_per_task": 4 * model.num_weights(),
            "mask_bytes": mask_bytes, "peak_bytes": _peak_bytes(device),
            "peak_extra_bytes": (_peak_bytes(device) - base) if base else None, "backend": kernels.backend_for(device),
        }
        if device.type == "cpu":
            row["cpu_ratio_vs_memcpy"] = times.median("oneshot", "cpu") / times.median("memcpy", "cpu")
        if graphs and device.type == "cuda":
            try:
                graphed = GraphedOneShot(model, images[:1])
                row["graphed_ms"] = time_ms(lambda: graphed(image("oneshot")), device, reps * 5, budget_s=budget_s)
                del graphed
            except Exception as exc:  # capture is an optimisation: record why it failed and go on
                row["graphed_error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        del model, copy
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ per-sample
def bench_per_sample(device: torch.device, *, k: int = 50, batch: int = 1024, reps: int = 7,
                     budget_s: float = 30.0, images: torch.Tensor | None = None) -> list[dict]:
    """Per-sample One-Shot (``granularity="sample"``) of a batch of real MNIST test images over k LeNet masks,
    against the k masked forwards of the same batch (what choosing by trying every task would cost)."""
    model = random_bank_model("lenet", k, device)
    x = (images if images is not None else oneshot_images(device, batch)[0])[:batch]
    how = Inference(granularity="sample")

    @torch.no_grad()
    def masked_forwards():
        for task in range(k):
            model(x, task)

    times = time_interleaved({"per_sample": lambda: infer_tasks(model, x, how), "forwards": masked_forwards},
                             device, reps, budget_s=budget_s)
    ms = {side: times.median(side) for side in times.wall}
    row = {"figure": "per-sample", "model": "lenet", "k": k, "batch": x.shape[0], "ms": ms["per_sample"],
           "forwards_ms": ms["forwards"], "ratio_vs_forwards": ms["per_sample"] / ms["forwards"],
           "spread": spread(times.wall["per_sample"]), "forwards_spread": spread(times.wall["forwards"]),
           "reps": len(times.wall["forwards"])}
    if device.type == "cpu":
        row["cpu_ratio_vs_forwards"] = times.median("per_sample", "cpu") / times.median("forwards", "cpu")
    return [row]


# ------------------------------------------------------------------------------------------ kernels
def bench_kernels(device: torch.device, *, num_bits: int = 315_200, k: int = 2500, reps: int = 10,
                  backends: tuple[str, ...] | None = None, budget_s: float = 10.0) -> list[dict]:
    """``contract`` and ``superpose`` over ``k`` random masks of ``num_bits`` bits, per backend, each given its
    layout (the native kernels tiles, the others rows); g is dense, so no column is skipped."""
    if backends is None:
        backends = ("torch", "triton") if device.type == "cuda" else ("torch", "native")
    rows_packed = torch.randint(0, 256, (k, (num_bits + 7) // 8), dtype=torch.uint8, device=device)
    g = torch.randn(num_bits, device=device)
    alpha = torch.rand(k, device=device)
    rows = []
    for name in backends:
        if name == "native" and not kernels.native.available():
            continue
        if name == "triton" and not kernels.triton_available():
            continue
        packed = rows_packed
        if name == "native":
            packed = kernels.new_store(k, rows_packed.shape[1], device)
            kernels.write_rows(packed, 0, rows_packed)
            packed = kernels.tasks(packed, slice(0, k))
        with kernels.use_backend(name):
            for op, fn in (("contract", lambda: kernels.contract(packed, g)),
                           ("superpose", lambda: kernels.superpose(packed, alpha, num_bits))):
                ms = time_ms(fn, device, reps, budget_s=budget_s)
                rows.append({"figure": "kernel", "op": op, "backend": name, "k": k, "num_bits": num_bits, "ms": ms,
                             "packed_gb_per_s": rows_packed.numel() / ms / 1e6})
    return rows


# ------------------------------------------------------------------------------------------ driver
def _plan(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        if quick:
            return {"train_counts": (1, 16), "fc_ks": [10, 250], "lenet_ks": [10, 2500], "kernel_k": 2500,
                    "reps": 20, "precisions": ("fp32",), "per_sample_batch": 1024}
        return {"train_counts": (1, 250), "fc_ks": [10, 250, 2500], "lenet_ks": [10, 250, 2500, 10000, 100000],
                "kernel_k": 2500, "reps": 30, "precisions": ("fp32", "tf32", "bf16"), "per_sample_batch": 1024}
    if quick:
        return {"train_counts": (1, 4), "fc_ks": [10, 50], "lenet_ks": [10, 250, 1000], "kernel_k": 250,
                "reps": 7, "precisions": ("fp32",), "per_sample_batch": 128}
    return {"train_counts": (1, 4, 8), "fc_ks": [10, 50, 250, 1000], "lenet_ks": [10, 250, 2500, 10000],
            "kernel_k": 2500, "reps": 21, "precisions": ("fp32",), "per_sample_batch": 1024}


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
    images, results["meta"]["oneshot_images"] = oneshot_images(device)
    precisions = list(settings["precisions"])
    parts: list[tuple[str, Callable[[], list[dict]]]] = []
    if precisions:
        parts.append((f"train {precisions[0]}", lambda: bench_training(
            device, counts=tuple(settings["train_counts"]), reps=reps, precision=precisions[0])))
    parts += [(f"oneshot {name} k={k}", lambda name=name, k=k: bench_oneshot(device, name, [k], reps=reps,
                                                                            graphs=graphs, images=images))
              for name, key in (("lenet", "lenet_ks"), ("fc1024", "fc_ks")) for k in settings[key]]
    parts += [(f"train {p}", lambda p=p: bench_training(device, counts=tuple(settings["train_counts"]), reps=reps,
                                                         precision=p))
              for p in precisions[1:]]
    if settings.get("per_sample_batch"):
        batch = settings["per_sample_batch"]
        parts.append((f"per-sample B={batch}", lambda: bench_per_sample(
            device, batch=batch, reps=min(reps, 7), images=oneshot_images(device, batch)[0])))
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
        key = ("train", device_type, row["tasks_at_once"] if device_type == "cpu" else
               1 if row["tasks_at_once"] == 1 else "batched")
    elif row["figure"] == "oneshot":
        key = ("oneshot", device_type, row["model"], row["k"])
    elif row["figure"] == "per-sample":
        key = ("per-sample", device_type, row["batch"])
    else:
        return ""
    return GOALS.get(key, "")


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:,.1f} MB"


def _spread(row: dict, key: str = "spread") -> str:
    return f" ±{100 * row[key]:.0f}%" if row.get(key) is not None else ""


def _load(meta: dict) -> str:
    start, end = meta.get("load_average"), meta.get("load_average_end")
    fmt = lambda load: "?" if not load else f"{load[0]:.1f}"  # noqa: E731
    return f"load average {fmt(start)} -> {fmt(end)} on {meta.get('cpu_count')} cores"


def machine_line(meta: dict) -> str:
    """One line saying where and when: CPU model and key flags (or the GPU), threads, load, date."""
    flags = [f for f in KEY_FLAGS if f in meta.get("cpu_flags", [])]
    where = meta.get("gpu") or f"{meta['cpu']}" + (f" ({', '.join(flags)})" if flags else "")
    return (f"{where}, {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, kernels "
            f"{meta['kernel_backend']}, {_load(meta)}, {meta['date']}")


def _cells(row: dict, device_type: str) -> list[str]:
    """figure, setting, measured, dense, ratio, memcpy of the masks, memory, goal."""
    if "error" in row:
        return [row["figure"], row.get("part") or f"{row.get('model')} k={row.get('k', 0):,}",
                f"error: {row['error'][:80]}", "", "", "", "", ""]
    if row["figure"] == "train":
        return ["train, per task per batch", f"{row['model']} K={row['tasks_at_once']} {row['precision']}",
                f"{row['ms_per_task_batch']:.3f} ms{_spread(row)}" + (
                    f" (torch's RMSprop: {row['unfused_ms_per_task_batch']:.3f} ms, "
                    f"{row['unfused_ratio_vs_dense']:.2f}x)" if "unfused_ms_per_task_batch" in row else ""),
                f"{row['dense_fwd_bwd_ms']:.3f} ms{_spread(row, 'dense_spread')} (with optimiser step: "
                f"{row['dense_step_ms']:.3f})", f"{row['ratio_vs_dense']:.2f}x ({row['ratio_vs_dense_step']:.2f}x)"
                + (f"; CPU time {row['cpu_ratio_vs_dense']:.2f}x" if "cpu_ratio_vs_dense" in row else ""),
                "", f"peak {_mb(row['peak_bytes'])}", _goal(row, device_type)]
    if row["figure"] == "oneshot":
        graphed = f" (CUDA graph: {row['graphed_ms']:.3f} ms)" if "graphed_ms" in row else ""
        memcpy = f"{row['memcpy_ms']:.3f} ms{_spread(row, 'memcpy_spread')}: **{row['ratio_vs_memcpy']:.2f}x**" \
            if "memcpy_ms" in row else ""
        if "cpu_ratio_vs_memcpy" in row:
            memcpy += f" (CPU time {row['cpu_ratio_vs_memcpy']:.2f}x)"
        return ["One-Shot, one image", f"{row['model']} k={row['k']:,}", f"{row['ms']:.3f} ms{_spread(row)}{graphed}",
                f"{row['dense_fwd_bwd_ms']:.3f} ms", f"{row['ratio_vs_dense']:.1f}x", memcpy,
                f"masks {_mb(row['mask_bytes'])} ({row['bytes_per_task']:,} B/task; float32: "
                f"{row['float32_bytes_per_task']:,})", _goal(row, device_type)]
    if row["figure"] == "per-sample":
        return [f"One-Shot per sample, {row['batch']:,} images", f"{row['model']} k={row['k']:,}",
                f"{row['ms']:.1f} ms{_spread(row)}", "",
                f"{row['ratio_vs_forwards']:.2f}x the {row['k']} masked forwards ({row['forwards_ms']:.1f} ms"
                f"{_spread(row, 'forwards_spread')}, same run)" + (f"; CPU time {row['cpu_ratio_vs_forwards']:.2f}x"
                                                                   if "cpu_ratio_vs_forwards" in row else ""),
                "", "", _goal(row, device_type)]
    return [f"kernel {row['op']}", f"{row['backend']}, k={row['k']:,}, P={row['num_bits']:,}", f"{row['ms']:.3f} ms",
            "", "", "", f"{row['packed_gb_per_s']:.1f} GB/s of packed bits", ""]


COLUMNS = ("figure", "setting", "measured (± spread)", "dense, same run", "ratio", "memcpy of the masks, same run",
           "memory", "goal")
TABLE_WIDTH = 160  # terminal columns from which the results print as a table


def print_table(results: dict, console=None) -> None:
    from rich.console import Console

    from supsup.tables import make_table

    console = console or Console()
    meta = results["meta"]
    device_type = meta["device"].split(":")[0]
    rows = [[c.replace("**", "") for c in _cells(row, device_type)] for row in results["rows"]]
    if console.width < TABLE_WIDTH:  # too narrow for 8 columns: a block per row, one line per figure
        console.print(f"supsup bench: {machine_line(meta)}", highlight=False)
        for row, cells in zip(results["rows"], rows):
            console.print(f"\n[bold]{cells[0]}[/bold], {cells[1]}", highlight=False)
            for head, cell in zip(COLUMNS[2:], cells[2:]):
                if cell:
                    console.print(f"  {head}: " + ("[red]" if "error" in row else "") + cell, highlight=False)
    else:
        table = make_table(COLUMNS, title=f"supsup bench: {machine_line(meta)}")
        for row, cells in zip(results["rows"], rows):
            table.add_row(*(("[red]" + c) if "error" in row and i == 2 else c for i, c in enumerate(cells)))
        console.print(table)
    console.print(f"{meta.get('seconds', 0)} s; {_load(meta)}; One-Shot on {meta.get('oneshot_images', '?')}")
    load, cores = (meta.get("load_average") or [0])[0], meta.get("cpu_count") or 1
    if device_type == "cpu" and load > cores - 0.5:
        console.print(f"[yellow]the machine is busy (load {load:.1f} on {cores} cores): times are inflated and noisy "
                      "(see each row's spread); with more than one thread, torch ops can stall a whole time slice "
                      "waiting for their second thread. Ratios measured in the same run are the robust figures.")


def markdown_table(results: dict) -> str:
    """The machine line and the rows of a results dict (or of a saved JSON) as a Markdown table."""
    from supsup.tables import make_table, markdown

    device_type = results["meta"]["device"].split(":")[0]
    rows = [_cells(row, device_type) for row in results["rows"]]
    return machine_line(results["meta"]) + "\n\n" + markdown(make_table(COLUMNS, rows))


if __name__ == "__main__":  # python -m supsup.bench RESULTS.json  ->  Markdown rows
    import sys

    print(markdown_table(json.loads(Path(sys.argv[1]).read_text())))
