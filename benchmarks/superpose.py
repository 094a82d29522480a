"""One-Shot / per-sample inference, general path (old) vs _UniformSuperposeLinear (new), alternated in one process."""
import json, os, statistics, sys, time
import torch
from supsup import bench
from supsup.inference import Inference, infer_tasks
from supsup.layers import SupermaskLayer, SupermaskLinear

torch.set_num_threads(1)
cpu = torch.device("cpu")
FAST = SupermaskLinear._masked_forward
images, source = bench.oneshot_images(cpu, 64)
load = lambda: os.getloadavg()
rows, meta = [], {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": 1, "torch": torch.__version__,
                  "images": source, "load_start": load()}
cases = [("lenet", k, None) for k in (10, 2500, 10000)] + [("fc1024", k, None) for k in (10, 1000)] + [("lenet", 50, 128)]
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 15
for name, k, batch in cases:
    model = bench.random_bank_model(name, k, cpu)
    how = Inference(granularity="sample") if batch else Inference()
    i = {"old": 0, "new": 0}
    def run(side):
        SupermaskLinear._masked_forward = FAST if side == "new" else SupermaskLayer._masked_forward
        i[side] += 1
        x = images[:batch] if batch else images[i[side] % 64][None]
        return infer_tasks(model, x, how)
    picks = {s: [] for s in ("old", "new")}
    for j in range(8):  # same picks: old vs new on the same inputs
        for s in picks:
            i[s] = j
            picks[s].append(run(s))
    same = all(torch.equal(a, b) for a, b in zip(picks["old"], picks["new"]))
    t = bench.time_interleaved({"old": lambda: run("old"), "new": lambda: run("new")}, cpu, reps, warmup=3, budget_s=60)
    row = {"model": name, "k": k, "batch": batch or 1, "per_sample": bool(batch), "same_picks": same,
           "old_ms": statistics.median(t.wall["old"]), "new_ms": statistics.median(t.wall["new"]),
           "old_cpu_ms": statistics.median(t.cpu["old"]), "new_cpu_ms": statistics.median(t.cpu["new"]),
           "wall": t.wall, "load": load()}
    SupermaskLinear._masked_forward = FAST
    print(f"{name} k={k} B={batch or 1}: old {row['old_ms']:.2f} ms, new {row['new_ms']:.2f} ms "
          f"(cpu {row['old_cpu_ms']:.2f}/{row['new_cpu_ms']:.2f}), same picks {same}, load {row['load']}", flush=True)
    rows.append(row)
    del model
meta["load_end"] = load()
json.dump({"meta": meta, "rows": rows}, open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/superpose.json", "w"), indent=1)
