"""Full fine-tuning throughput on 1 and N processes (DDP), with the final metrics of each.

On a CPU: `ursa train --nproc N --threads 1` (gloo, one thread per process) for N in --nprocs.
On a machine with GPUs: pass `--device cuda --nprocs 1 2 4 8` (NCCL, one GPU per process).
Images/s counts training samples over all ranks divided by the time spent in training batches
(validation excluded), as recorded in each run's config.json. The feature cache is built once, before
the timed runs. Prints ONE JSON line. Usage: python benchmarks/ddp_scaling.py [--per-class 60] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_dataset(root: Path, classes: int, per_class: int, px: int) -> None:
    """Coloured shapes on noise, one folder per class."""
    from PIL import Image, ImageDraw

    colors = [(220, 40, 40), (40, 160, 60), (40, 70, 220), (230, 200, 40)]
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([c, i])
            im = Image.fromarray((rng.integers(0, 60, (px, px, 3)) + 100).astype(np.uint8))
            m = px // 6 + int(rng.integers(0, px // 8))
            draw = ImageDraw.Draw(im)
            (draw.ellipse if c % 2 else draw.rectangle)((m, m, px - m, px - m), fill=colors[c % 4])
            im.save(d / f"{i:04d}.png")


def train(data: Path, out: Path, nproc: int, args: argparse.Namespace, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "ursa", "train", str(data), "--out", str(out), "--size", str(args.size), "--fine-tune", str(args.epochs),
           "--device", args.device, "--nproc", str(nproc), "--threads", str(args.threads)]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    rt = json.loads((out / "config.json").read_text())["runtime"]
    return {"nproc": nproc, "images_per_s": rt["fine_tune_images_per_s"], "train_s": rt["fine_tune_train_s"], "error_rate": m["error_rate"],
            "accuracy": m["accuracy"], "valid_loss": round(m["valid_loss"], 4), "wall_s": round(wall, 1), "device": rt["device"], "precision": rt["precision"]["precision"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--px", type=int, default=80)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        make_dataset(tmp_p / "data", a.classes, a.per_class, a.px)
        env = {**os.environ, "URSA_CACHE_DIR": str(tmp_p / "cache"), "OMP_NUM_THREADS": str(a.threads)}
        # build the feature cache first, so every timed run starts from the same state
        subprocess.run([sys.executable, "-m", "ursa", "train", str(tmp_p / "data"), "--out", str(tmp_p / "warm"), "--size", str(a.size), "--device", a.device, "--threads", str(a.threads)],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        runs = [train(tmp_p / "data", tmp_p / f"p{n}", n, a, env) for n in a.nprocs]
    base = runs[0]["images_per_s"]
    print(json.dumps({
        "benchmark": "ddp_scaling", "device": runs[0]["device"], "backend": "nccl" if a.device == "cuda" else "gloo",
        "threads_per_process": a.threads, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "train_images": int(a.classes * a.per_class * 0.8), "size": a.size, "epochs": a.epochs,
        "runs": runs, "speedup": {str(r["nproc"]): round(r["images_per_s"] / base, 3) for r in runs},
    }))


if __name__ == "__main__":
    main()
