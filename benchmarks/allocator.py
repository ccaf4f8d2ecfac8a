"""Does keeping PyTorch's large buffers on the heap (mallopt at start-up, as `ursa` does) speed up CPU work?

Runs the same workload in two fresh processes, with and without `ursa.train.runtime.tune_allocator()`:
EfficientNet-Lite0 forward+backward on a batch of 32 images at 224 px (fine-tuning) and a forward
pass (feature extraction), 2 threads. Prints one JSON line with the median seconds per batch of each.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

CHILD = r"""
import sys, time, json, statistics
if sys.argv[1] == "tuned":
    from ursa.train.runtime import tune_allocator
    tune_allocator()
import torch
torch.set_num_threads(2)
from ursa.models import create_backbone
m = create_backbone("efficientnet_lite0", pretrained=False).model
x = torch.randn(32, 3, 224, 224)
fwd, step = [], []
with torch.inference_mode():
    for _ in range(4):
        t = time.perf_counter(); m.eval()(x); fwd.append(time.perf_counter() - t)
m.train()
opt = torch.optim.AdamW(m.parameters(), 1e-4)
for _ in range(4):
    t = time.perf_counter(); loss = m(x).mean(); opt.zero_grad(); loss.backward(); opt.step(); step.append(time.perf_counter() - t)
print(json.dumps({"forward_s": statistics.median(fwd[1:]), "train_step_s": statistics.median(step[1:])}))
"""


def run(mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
    for _ in range(2):  # interleave to spread machine noise over both
        for mode in ("default", "tuned"):
            results[mode].append(run(mode))
    med = {m: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]} for m, rs in results.items()}
    print(json.dumps({
        "benchmark": "allocator", "batch": 32, "px": 224, "threads": 2, "default_glibc": med["default"], "tuned_mallopt": med["tuned"],
        "speedup_forward": round(med["default"]["forward_s"] / med["tuned"]["forward_s"], 2),
        "speedup_train_step": round(med["default"]["train_step_s"] / med["tuned"]["train_step_s"], 2),
        "wall_s": round(time.perf_counter() - t0, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
