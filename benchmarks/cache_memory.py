"""Feature extraction larger than memory: peak resident memory for 20,000 vs 2,000 images, and a run
killed half-way (SIGKILL) then restarted finishing with a cache identical to an uninterrupted one.

Images are generated (small, `--px` pixels) and the packaged EfficientNet-Lite0 runs at `--size 32`, so
the whole benchmark takes a few minutes on a laptop CPU. Each extraction runs in a fresh subprocess
(`--child`) that reports its own peak RSS (`ru_maxrss`) and that of its DataLoader workers.
Prints ONE JSON line. Usage: python benchmarks/cache_memory.py [--n 20000] [--small 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VIEW = 2  # a seeded augmented view: the hardest to reproduce exactly after a restart
SHARD_ROWS = 1024


def make_images(root: Path, n: int, px: int) -> list[str]:
    """n generated PNGs in 4 class folders (a coloured square on noise); returns their names."""
    from PIL import Image

    names = []
    rng = np.random.default_rng(0)
    colors = [(220, 40, 40), (40, 160, 60), (40, 70, 220), (230, 200, 40)]
    for i in range(n):
        c = i % 4
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(80, 160, (px, px, 3), dtype=np.uint8)
        m = px // 4 + int(rng.integers(0, px // 8))
        a[m:-m, m:-m] = colors[c]
        name = f"c{c}/{i:06d}.png"
        Image.fromarray(a).save(root / name)
        names.append(name)
    return names


def child(root: Path, cache: Path, n: int, workers: int) -> None:
    """Extract VIEW for the first n images into `cache`; print peak RSS (MiB) of this process and its workers."""
    import torch

    from ursa.config import TrainConfig
    from ursa.train.features import FeatureCache, prepare_backbone

    torch.set_num_threads(1)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))[:n]
    bb = prepare_backbone(TrainConfig(size=32))
    fc = FeatureCache(cache, bb, shard_rows=SHARD_ROWS)
    t0 = time.perf_counter()
    failed = fc.build(root, names, VIEW, batch_size=128, num_workers=workers)
    dt = time.perf_counter() - t0
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"n": n, "failed": len(failed), "seconds": round(dt, 1), "images_per_s": round(n / dt, 1), "peak_rss_mb": round(self_mb, 1), "worker_peak_rss_mb": round(kids_mb, 1)}))


def run_child(root: Path, cache: Path, n: int, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(root), str(cache), str(n), str(workers)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cache_digest(cache: Path) -> tuple[int, str]:
    """(number of shards, sha256 over every shard file's name and bytes): equal digests mean identical caches."""
    h = hashlib.sha256()
    files = sorted(p for p in cache.rglob("*") if p.is_file() and p.suffix in (".npy", ".json"))
    for p in files:
        h.update(p.relative_to(cache).as_posix().encode())
        h.update(p.read_bytes())
    return len([p for p in files if p.suffix == ".json"]), h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--small", type=int, default=2_000)
    ap.add_argument("--px", type=int, default=40)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--child", nargs=4, metavar=("ROOT", "CACHE", "N", "WORKERS"))
    a = ap.parse_args()
    if a.child:
        child(Path(a.child[0]), Path(a.child[1]), int(a.child[2]), int(a.child[3]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        t0 = time.perf_counter()
        make_images(tmp_p / "data", a.n, a.px)
        gen_s = time.perf_counter() - t0
        small = run_child(tmp_p / "data", tmp_p / "cache-small", a.small, a.workers)
        big = run_child(tmp_p / "data", tmp_p / "cache-big", a.n, a.workers)
        # killed half-way, then restarted
        killed_cache = tmp_p / "cache-killed"
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(tmp_p / "data"), str(killed_cache), str(a.n), str(a.workers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        half = (a.n // SHARD_ROWS) // 2
        while proc.poll() is None and len(list(killed_cache.rglob("*.json"))) < half:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shards_at_kill = len(list(killed_cache.rglob("*.json")))
        resumed = run_child(tmp_p / "data", killed_cache, a.n, a.workers)
        n_ref, ref = cache_digest(tmp_p / "cache-big")
        n_res, res = cache_digest(killed_cache)
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    print(json.dumps({
        "benchmark": "cache_memory",
        "images": a.n, "baseline_images": a.small, "px": a.px, "model": "efficientnet_lite0 --size 32", "view": VIEW, "workers": a.workers,
        "peak_rss_mb": big["peak_rss_mb"], "baseline_peak_rss_mb": small["peak_rss_mb"], "rss_ratio": round(ratio, 3),
        "worker_peak_rss_mb": big["worker_peak_rss_mb"],
        "under_2gb": big["peak_rss_mb"] + big["worker_peak_rss_mb"] < 2048, "within_20pct": ratio <= 1.2,
        "images_per_s": big["images_per_s"], "extract_s": big["seconds"], "generate_s": round(gen_s, 1),
        "killed_after_shards": shards_at_kill, "shards": n_ref, "resumed_images": a.n - shards_at_kill * SHARD_ROWS,
        "resumed_s": resumed["seconds"], "identical_after_kill": (n_ref, ref) == (n_res, res),
    }))


if __name__ == "__main__":
    main()
