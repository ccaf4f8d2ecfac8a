"""The lesson's lines in Python against `ursa train`, on ../shared/data/monkey10, 2 threads, in one run.

(a) `ursa train DATA --train training --valid validation --threads 2` (the CLI, a fresh process);
(b) the notebook lines: `ImageDataLoaders.from_folder(root, train="training", valid="validation")`,
    `vision_learner(dls, "efficientnet_lite0", metrics=error_rate)`, `learn.fit_one_cycle(4)` (frozen
    body: the head on the feature cache), then `learn.unfreeze()` and
    `learn.fit_one_cycle(2, max_lr=slice(3e-5, 3e-4))` (the network; reported, not timed against (a));
(c) (b) with the cache disabled, `vision_learner(..., cache=False)`: the network every frozen epoch
    (fastai's path). With `--network-epochs N` < 4 it runs N epochs and extrapolates the wall time of 4
    (setup + 4 x the mean epoch), saying so in the JSON.

Each contender runs in its own process with its own empty feature cache (URSA_CACHE_DIR), so every
wall time includes starting Python, importing, loading the backbone and computing the features.
Targets: (b) within 1.2x of (a)'s wall time and 0.5 points of its error rate; (b) >= 5x faster than (c).
CPU seconds (user + system) of each process are reported beside the wall times: on a machine other
work shares, they show the work each contender does when the wall times are noise.
With `--repeats N`, (a) and (b) run N times each, alternating, and their median wall times are compared
(the unfreeze stage runs once). Prints one JSON line. Usage:
    python benchmarks/notebook_speed.py [--data ../shared/data/monkey10] [--network-epochs 1] [--skip-unfreeze] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_flags

REPO = Path(__file__).resolve().parents[1]
THREADS = 2

# (b) and (c): the lines a notebook user types, and the timings around them. Started as `python -c`;
# argv: root, cache (1/0), frozen epochs to run, unfreeze (1/0), launch time (time.time() of the parent).
CHILD = r"""
import json, sys, time
root, cache, epochs, unfreeze, t_launch = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4] == "1", float(sys.argv[5])
import torch
torch.set_num_threads(THREADS)
from ursa import ImageDataLoaders, error_rate, vision_learner
dls = ImageDataLoaders.from_folder(root, train="training", valid="validation")
learn = vision_learner(dls, "efficientnet_lite0", metrics=error_rate, cache=cache, progress=False)
t_setup = time.time()
if cache:
    learn.features()
t_features = time.time()
learn.fit_one_cycle(epochs)
t_fit = time.time()
rows = learn.recorder.rows
out = {"setup_s": t_setup - t_launch, "features_s": t_features - t_setup, "fit_s": t_fit - t_features, "wall_s": t_fit - t_launch,
       "epoch_s": [r["seconds"] for r in rows], "error_rate": rows[-1]["error_rate"], "path": learn.recorder.path,
       "n_train": len(dls.train_ds) if hasattr(dls, "train_ds") else len(dls.train.dataset), "n_valid": len(dls.valid.dataset)}
if cache:
    from ursa.train.metrics import error_rate as err
    fd = learn.features()
    head = learn.model[1].eval()
    with torch.inference_mode():
        tta = torch.stack([head(v).softmax(-1) for v in fd.x_valid]).mean(0)
    out["error_rate_tta"] = err(tta, fd.y_valid)
if unfreeze:
    learn.unfreeze()
    t0 = time.time()
    learn.fit_one_cycle(2, max_lr=slice(3e-5, 3e-4))
    out.update(unfreeze_s=time.time() - t0, unfreeze_error_rate=learn.recorder.rows[-1]["error_rate"], unfreeze_path=learn.recorder.path)
print("RESULT " + json.dumps(out))
""".replace("THREADS", str(THREADS))


def run_child(root: Path, cache_dir: Path, *, cache: bool, epochs: int, unfreeze: bool) -> dict:
    env = {**os.environ, "URSA_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": str(THREADS)}
    cpu0 = _children_cpu()
    t = time.time()
    p = subprocess.run([sys.executable, "-c", CHILD, str(root), "1" if cache else "0", str(epochs), "1" if unfreeze else "0", repr(t)], env=env, capture_output=True, text=True)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"contender failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return {**json.loads(line[len("RESULT "):]), "cpu_s": _children_cpu() - cpu0}


def _children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process so far: on a machine other work
    shares, a steadier measure of the work a contender does than its wall time."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cli(root: Path, cache_dir: Path, out: Path) -> tuple[dict, float]:
    """(metrics.json, wall seconds) of `ursa train` in a fresh process with an empty cache."""
    env = {**os.environ, "URSA_CACHE_DIR": str(cache_dir), "OMP_NUM_THREADS": str(THREADS)}
    cpu0 = _children_cpu()
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "ursa", "train", str(root), "--train", "training", "--valid", "validation", "--threads", str(THREADS), "--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.time() - t
    if p.returncode:
        raise SystemExit(f"ursa train failed:\n{p.stderr[-3000:]}")
    return {**json.loads((out / "metrics.json").read_text()), "cpu_s": _children_cpu() - cpu0}, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "monkey10"))
    ap.add_argument("--network-epochs", type=int, default=4, help="epochs (c) really runs (1..4); fewer are extrapolated to 4")
    ap.add_argument("--skip-unfreeze", action="store_true", help="leave out (b)'s unfreeze + fit_one_cycle(2)")
    ap.add_argument("--repeats", type=int, default=1, help="run (a) and (b) this many times each, alternating (a b, b a, ...); medians are reported")
    args = ap.parse_args()
    root = Path(args.data)
    if not root.is_dir():
        print(json.dumps({"benchmark": "notebook_speed", "skipped": f"{root} not found"}))
        return
    result: dict = {"benchmark": "notebook_speed", "data": root.name, "threads": THREADS, "cpu_flags": cpu_flags(), "load_average_1min_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        walls_a: list[float] = []
        walls_b: list[float] = []
        cpu_a: list[float] = []
        cpu_b: list[float] = []
        b: dict = {}
        for i in range(max(1, args.repeats)):
            for who in ("a", "b") if i % 2 == 0 else ("b", "a"):  # alternating, so a drift in the machine's load hits both
                if who == "a":
                    m, wall = run_cli(root, tmp_p / f"cache-a{i}", tmp_p / f"run-a{i}")
                    walls_a.append(wall)
                    cpu_a.append(m["cpu_s"])
                    result["a_cli"] = {"error_rate": round(m["error_rate"], 4), "feature_s": m["feature_s"], "head": "lbfgs", "tta": m["tta"]}
                else:
                    r = run_child(root, tmp_p / f"cache-b{i}", cache=True, epochs=4, unfreeze=not args.skip_unfreeze and not b)
                    walls_b.append(r["wall_s"])
                    cpu_b.append(r["cpu_s"])
                    b = b or r
        result["a_cli"].update(wall_s=round(statistics.median(walls_a), 1), wall_s_each=[round(w, 1) for w in walls_a], cpu_s=round(statistics.median(cpu_a), 1), cpu_s_each=[round(c, 1) for c in cpu_a])
        # (b) the notebook lines, frozen on the cache, then (first run only) unfreeze + fit_one_cycle(2)
        result["b_notebook"] = {"wall_s": round(statistics.median(walls_b), 1), "wall_s_each": [round(w, 1) for w in walls_b], "cpu_s": round(statistics.median(cpu_b), 1), "cpu_s_each": [round(c, 1) for c in cpu_b], "error_rate": round(b["error_rate"], 4),
                                "error_rate_tta": round(b["error_rate_tta"], 4), "features_s": round(b["features_s"], 1), "fit_one_cycle_4_s": round(b["fit_s"], 2), "path": b["path"]}  # fmt: skip
        if not args.skip_unfreeze:
            result["b_unfreeze_fit_one_cycle_2"] = {"error_rate": round(b["unfreeze_error_rate"], 4), "seconds": round(b["unfreeze_s"], 1), "path": b["unfreeze_path"]}
        # (c) the network every frozen epoch
        n = max(1, min(4, args.network_epochs))
        c = run_child(root, tmp_p / "cache-c", cache=False, epochs=n, unfreeze=False)
        per_epoch = c["fit_s"] / n
        wall_c = c["setup_s"] + 4 * per_epoch
        cpu_c = c["cpu_s"] * (c["setup_s"] + 4 * per_epoch) / max(1e-9, c["setup_s"] + c["fit_s"])  # scaled as the wall time is
        result["c_no_cache"] = {"wall_s": round(wall_c, 1), "cpu_s": round(cpu_c, 1), "epochs_run": n, "extrapolated": n < 4, "epoch_s": round(per_epoch, 1), "error_rate": round(c["error_rate"], 4), "path": c["path"]}
        if n < 4:
            result["c_no_cache"]["note"] = f"ran {n} of 4 epochs; wall_s = setup + 4 x the mean epoch; error_rate is after {n} epoch(s)"
    a, bb = result["a_cli"], result["b_notebook"]
    result["b_over_a_wall"] = round(bb["wall_s"] / a["wall_s"], 3)
    result["b_minus_a_error_points"] = round(100 * (bb["error_rate"] - a["error_rate"]), 2)
    result["c_over_b_wall"] = round(result["c_no_cache"]["wall_s"] / bb["wall_s"], 2)
    result["b_over_a_cpu"] = round(bb["cpu_s"] / a["cpu_s"], 3)
    result["c_over_b_cpu"] = round(result["c_no_cache"]["cpu_s"] / bb["cpu_s"], 2)
    result["targets_met"] = {"b_within_1.2x_of_a": result["b_over_a_wall"] <= 1.2, "b_within_0.5_points_of_a": abs(result["b_minus_a_error_points"]) <= 0.5, "b_5x_faster_than_c": result["c_over_b_wall"] >= 5}
    result["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
