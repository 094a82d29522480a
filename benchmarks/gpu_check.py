"""The one GPU run of issue 4: Triton kernels against the CPU reference, then the GPU benchmark rows.

On the GPU machine, from the repository root (nothing to install; at most ``--budget-s`` = 215 s):

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out "$OUT"

Stages (each one guarded: a failure is recorded and the next stage still runs; JSON is rewritten
after every stage, so a timeout still leaves the finished stages in ``$OUT``):
1. ``tests``: pytest on tests/test_kernels.py and tests/test_bank.py (the GPU tests compare the Triton
   kernels with the float reference and with the CPU kernel on 3,000 LeNet-sized masks);
2. ``tune``: time a few Triton tile shapes and the byte-table (``lut``) contraction against the
   bit-expansion one on LeNet's first layer (k = 20,000), check each against the reference, keep the
   fastest for stage 3;
3. ``bench``: ``supsup.bench.run_benchmarks`` on the GPU: training per task per batch (K = 1 and 250;
   fp32, tf32, bf16), One-Shot latency for k = 10 … 100,000 (eager and CUDA-graphed), kernel rows;
4. ``layout`` (if time is left): batched training, K = 250, with the current bmm layout of
   ``SupermaskLinear._stacked_forward`` and with the proposed weight-major one.

Writes ``$OUT/gpu_check.json`` (everything), ``$OUT/bench_gpu.json`` (the bench rows) and ``$OUT/bench_gpu.md``
(the same rows as a Markdown table for BENCHMARKS.md), and prints a summary.

Dry run on a CPU with tiny sizes (the Triton kernels through Triton's interpreter, if installed):

    TRITON_INTERPRET=1 PYTHONPATH=src .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_dry
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from supsup import kernels
from supsup.bench import markdown_table, run_benchmarks, time_ms

START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def stage_tests(device: torch.device, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "tests/test_bank.py"]
    env = {**os.environ, "PYTHONPATH": "src" + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out = (proc.stdout + proc.stderr).strip()
        return {"returncode": proc.returncode, "passed": proc.returncode == 0, "tail": out[-3000:]}
    except subprocess.TimeoutExpired as exc:
        return {"returncode": None, "passed": False, "tail": f"timed out after {timeout} s: {str(exc.stdout)[-2000:]}"}


def stage_tune(device: torch.device, tiny: bool) -> dict:
    """Time Triton tiles on LeNet's first layer (R = 29,400 bytes per mask), check them, keep the best."""
    from supsup.kernels import triton_kernels as tk

    k, R = (64, 300) if tiny else (20_000, 29_400)
    gen = torch.Generator(device=device).manual_seed(0)
    packed = torch.randint(0, 256, (k, R), dtype=torch.uint8, device=device, generator=gen)
    g = torch.randn(8 * R, device=device, generator=gen)
    alpha = torch.rand(k, device=device, generator=gen)
    # reference: the torch path (unpack chunks to float, matmul) on the same device and bits
    with kernels.use_backend("torch"):
        ref_c = kernels.contract(packed, g).cpu()
        ref_s = kernels.superpose(packed, alpha, 8 * R).cpu()
    reps = 3 if tiny else 10
    result = {"k": k, "row_bytes": R, "contract": [], "superpose": []}
    contract_candidates = [("bits", t) for t in [(32, 32, 4), (64, 32, 4), (32, 64, 4), (64, 64, 8)]]
    contract_candidates += [("lut", t) for t in [(128, 32, 4), (256, 32, 8), (128, 64, 8)]]
    if tiny:
        contract_candidates = [("bits", (16, 16, 4)), ("lut", (16, 16, 4))]
    best = None
    defaults = (tk.CONTRACT_VARIANT, tk.CONTRACT_TILE, tk.LUT_TILE, tk.SUPERPOSE_TILE)
    with kernels.use_backend("triton"):
        for variant, tile in contract_candidates:
            tk.CONTRACT_VARIANT = variant
            if variant == "lut":
                tk.LUT_TILE = tile
            else:
                tk.CONTRACT_TILE = tile
            entry = {"variant": variant, "tile": list(tile)}
            try:
                got = kernels.contract(packed, g).cpu()
                entry["max_rel_err"] = float(((got - ref_c).abs() / ref_c.abs().clamp_min(1.0)).max())
                entry["ok"] = bool(torch.allclose(got, ref_c, rtol=1e-4, atol=1e-2))
                entry["ms"] = time_ms(lambda: kernels.contract(packed, g), device, reps)
                entry["packed_gb_per_s"] = packed.numel() / entry["ms"] / 1e6
                if entry["ok"] and (best is None or entry["ms"] < best[2]):
                    best = (variant, tile, entry["ms"])
            except Exception as exc:  # a tile that does not compile is skipped, not fatal
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            result["contract"].append(entry)
        tk.CONTRACT_VARIANT, tk.CONTRACT_TILE, tk.LUT_TILE, tk.SUPERPOSE_TILE = defaults
        if best is not None:
            tk.CONTRACT_VARIANT = best[0]
            if best[0] == "lut":
                tk.LUT_TILE = best[1]
            else:
                tk.CONTRACT_TILE = best[1]
        result["contract_best"] = None if best is None else {"variant": best[0], "tile": list(best[1]), "ms": best[2]}

        best_s = None
        superpose_tiles = [(16, 16, 4)] if tiny else [(32, 32, 4), (64, 32, 4), (32, 64, 4), (64, 64, 8)]
        for tile in superpose_tiles:
            tk.SUPERPOSE_TILE = tile
            entry = {"tile": list(tile)}
            try:
                got = kernels.superpose(packed, alpha, 8 * R).cpu()
                entry["ok"] = bool(torch.allclose(got, ref_s, rtol=1e-4, atol=1e-2))
                entry["ms"] = time_ms(lambda: kernels.superpose(packed, alpha, 8 * R), device, reps)
                if entry["ok"] and (best_s is None or entry["ms"] < best_s[1]):
                    best_s = (tile, entry["ms"])
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            result["superpose"].append(entry)
        tk.SUPERPOSE_TILE = best_s[0] if best_s else defaults[3]
        result["superpose_best"] = None if best_s is None else {"tile": list(best_s[0]), "ms": best_s[1]}
    return result


def stage_layout(device: torch.device, tiny: bool) -> dict:
    """Batched training with the proposed weight-major bmm layout of ``SupermaskLinear._stacked_forward``
    (y = (W_k x_kᵀ)ᵀ, so the weight gradient comes out contiguous), against the current layout."""
    from supsup.bench import bench_training
    from supsup.layers import SupermaskLinear

    counts = (2,) if tiny else (250,)
    current = bench_training(device, counts=counts, reps=3 if tiny else 15, precision="fp32")
    original = SupermaskLinear._stacked_forward

    def weight_major(self, x, weights):
        self._check_input(x)
        k = weights.shape[0]
        xs = x.reshape(k, x.shape[0] // k, -1)
        return torch.bmm(weights, xs.transpose(1, 2)).transpose(1, 2).reshape(x.shape[0], -1)

    SupermaskLinear._stacked_forward = weight_major
    try:
        proposed = bench_training(device, counts=counts, reps=3 if tiny else 15, precision="fp32")
    finally:
        SupermaskLinear._stacked_forward = original
    return {"current": current, "weight_major_bmm": proposed}


def run_tune_child(args, out: Path, timeout: float) -> dict:
    """The tuning in a child process: a Triton compiler crash there costs the tuning, not the run."""
    cmd = [sys.executable, __file__, "--tune-only", "--device", args.device, "--out", str(out)] + \
        (["--tiny"] if args.tiny else [])
    env = {**os.environ, "PYTHONPATH": "src" + os.pathsep + os.environ.get("PYTHONPATH", "")}
    (out / "tune.json").unlink(missing_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"tuning timed out after {timeout:.0f} s; default tiles kept"}
    if proc.returncode != 0 or not (out / "tune.json").exists():
        return {"error": f"tuning exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}
    return json.loads((out / "tune.json").read_text())


def apply_tuning(tune: dict) -> None:
    from supsup.kernels import triton_kernels as tk

    best = tune.get("contract_best")
    if best:
        tk.CONTRACT_VARIANT = best["variant"]
        if best["variant"] == "lut":
            tk.LUT_TILE = tuple(best["tile"])
        else:
            tk.CONTRACT_TILE = tuple(best["tile"])
    if tune.get("superpose_best"):
        tk.SUPERPOSE_TILE = tuple(tune["superpose_best"]["tile"])


def summarize(report: dict) -> list[str]:
    lines = [f"device: {report['meta'].get('gpu') or report['meta'].get('device')}  "
             f"torch {torch.__version__}  total {elapsed():.0f} s"]
    tests = report.get("tests")
    if tests is None:
        lines.append("tests: skipped")
    else:
        verdict = "PASSED" if tests.get("passed") else "FAILED"
        lines.append(f"tests: {verdict} ({(tests.get('tail') or tests.get('error') or '').splitlines()[-1:]})")
    tune = report.get("tune", {})
    if "contract_best" in tune:
        lines.append(f"tune: contract best {tune['contract_best']}, superpose best {tune.get('superpose_best')}")
    for row in report.get("bench", {}).get("rows", []):
        if row.get("figure") == "train":
            lines.append(f"train {row['model']} K={row['tasks_at_once']:>3} {row['precision']}: "
                         f"{row['ms_per_task_batch']:.4f} ms/task/batch ({row['ratio_vs_dense']:.2f}x dense "
                         f"{row['dense_fwd_bwd_ms']:.3f} ms)  [goal <= 0.04 ms on H200]")
        elif row.get("figure") == "oneshot" and "ms" in row:
            graphed = f", graphed {row['graphed_ms']:.3f} ms" if "graphed_ms" in row else row.get("graphed_error", "")
            lines.append(f"one-shot {row['model']} k={row['k']:>6,}: {row['ms']:.3f} ms{graphed}; masks "
                         f"{row['mask_bytes'] / 1e6:,.1f} MB; peak {row['peak_bytes'] / 1e9:.2f} GB")
        elif row.get("figure") == "oneshot":
            lines.append(f"one-shot {row['model']} k={row['k']:,}: {row.get('error')}")
        elif row.get("figure") == "error":
            lines.append(f"bench part {row['part']} failed: {row['error']}")
        elif row.get("figure") == "kernel":
            lines.append(f"kernel {row['op']} {row['backend']} k={row['k']:,}: {row['ms']:.3f} ms "
                         f"({row['packed_gb_per_s']:.0f} GB/s of packed bits)")
    if report.get("bench", {}).get("meta", {}).get("triton_failure"):
        lines.append("triton switched off during the bench: " + report["bench"]["meta"]["triton_failure"][:300])
    layout = report.get("layout", {})
    if "current" in layout:
        for name in ("current", "weight_major_bmm"):
            for row in layout[name]:
                lines.append(f"layout {name}: K={row['tasks_at_once']} {row['ms_per_task_batch']:.4f} ms/task/batch "
                             f"({row['ratio_vs_dense']:.2f}x dense)")
    if "error" in report.get("bench", {}):
        lines.append("bench error: " + report["bench"]["error"][-500:])
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a dry run of the script itself)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--budget-s", type=float, default=215.0,
                        help="finish within this many seconds (gpu_session.sh kills it at 230)")
    parser.add_argument("--tune-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    report: dict = {"meta": {"device": str(device), "argv": sys.argv, "torch": torch.__version__,
                             "triton_available": kernels.triton_available()}}
    if device.type == "cuda":
        report["meta"]["gpu"] = torch.cuda.get_device_name(device)

    def save():
        report["meta"]["seconds"] = round(elapsed(), 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    def guarded(name, fn):
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:
            report[name] = {"error": traceback.format_exc()[-3000:]}
        report[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[{elapsed():6.1f} s] {name} done in {report[name + '_seconds']} s", flush=True)
        save()

    def left() -> float:
        return args.budget_s - elapsed()

    if not args.skip_tests:
        guarded("tests", lambda: stage_tests(device, timeout=max(20.0, min(75.0, left() - 130))))
    if args.tune_only:  # the child process of the "tune" stage
        (out / "tune.json").write_text(json.dumps(stage_tune(device, args.tiny), indent=2))
        return 0
    if kernels.triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        guarded("tune", lambda: run_tune_child(args, out, timeout=max(20.0, min(70.0, left() - 100))))
        apply_tuning(report.get("tune", {}))
    plan = None
    if args.tiny:
        plan = {"train_counts": (1, 2), "fc_ks": [10], "lenet_ks": [10, 50], "kernel_k": 50, "reps": 3,
                "precisions": ("fp32", "bf16")}
    bench_deadline = START + args.budget_s - 45  # leave time for the summary and the layout stage
    guarded("bench", lambda: run_benchmarks(device, quick=False, json_path=out / "bench_gpu.json", plan=plan,
                                            deadline=bench_deadline))
    if left() > 30:
        guarded("layout", lambda: stage_layout(device, args.tiny))
    if report.get("bench", {}).get("rows"):
        (out / "bench_gpu.md").write_text(markdown_table(report["bench"]) + "\n")
    print("\n".join(summarize(report)), flush=True)
    save()
    return 0 if report.get("tests", {}).get("passed", True) and "error" not in report.get("bench", {}) else 1


if __name__ == "__main__":
    sys.exit(main())
