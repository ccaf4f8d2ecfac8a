"""Active-learning benchmark: do the pool images Ursa picks to label improve the model more than random ones?

On a real dataset (default ../shared/data/monkey10, `--train training --valid validation`): each seed
starts from `--start` labelled photos per class (seeded draw); the rest of the training folder is the
pool, its labels hidden from the method. Then `--rounds` rounds of `--per-round` photos, chosen by
`ursa.interpret.active.select` (the selection `ursa next` makes) or at random, each labelled (its true
label revealed) and added; after every round the default head (L-BFGS linear head, `TrainConfig().c`)
is fitted again on the cached plain-view features and scored on the validation set (plain and mirrored
views averaged, as `ursa train` scores). Both methods start from the same labelled set per seed.

One JSON line per setting (`--setting` repeated: e.g. `margin`, `entropy`), each with the random
baseline measured in the same run: validation error per round (mean of the seeds), the ratios the
targets are about, and the selection time per round. Features come from the on-disk cache (computed
once if missing; `features_s` says how long).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _features import default_features
from _machine import cpu_flags
from ursa.interpret.active import calibrated_probs, select
from ursa.train.head import lbfgs_linear

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "monkey10"


def fit_and_score(x: np.ndarray, y: np.ndarray, n_classes: int, valid: list[np.ndarray], y_valid: np.ndarray, *, c: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(validation error, weight, bias) of the default head fitted on (x, y)."""
    w, b, _ = lbfgs_linear(torch.from_numpy(x), torch.from_numpy(y), n_classes, c=c)
    w, b = w.numpy(), b.numpy()
    probs = np.mean([calibrated_probs(v @ w.T + b) for v in valid], axis=0)
    return float((probs.argmax(1) != y_valid).mean()), w, b


def run_seed(x: np.ndarray, y: np.ndarray, valid: list[np.ndarray], y_valid: np.ndarray, classes: list[str], *, seed: int, start: int, rounds: int, per_round: int, method: str, c: float) -> tuple[list[float], list[float]]:
    """(validation error after round 0..rounds, selection seconds of each round) of one method and seed."""
    rng = np.random.default_rng(seed)
    labelled = np.concatenate([rng.choice(np.flatnonzero(y == k), size=start, replace=False) for k in range(len(classes))])
    errors, times = [], []
    pick_rng = np.random.default_rng([seed, 1])
    for r in range(rounds + 1):
        err, w, b = fit_and_score(x[labelled], y[labelled], len(classes), valid, y_valid, c=c)
        errors.append(err)
        if r == rounds:
            break
        pool = np.setdiff1d(np.arange(len(y)), labelled)
        t0 = time.perf_counter()
        if method == "random":
            new = pick_rng.choice(pool, size=per_round, replace=False)
        else:
            probs = calibrated_probs(x[pool] @ w.T + b)
            sel = select(x[pool], probs, classes, n=per_round, labelled_emb=x[labelled], kind=method, seed=seed)
            new = pool[[p.index for p in sel.picks]]
        times.append(time.perf_counter() - t0)
        labelled = np.concatenate([labelled, new])
    return errors, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--train", default="training")
    ap.add_argument("--valid", default="validation")
    ap.add_argument("--start", type=int, default=5, help="labelled photos per class at the start")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--setting", action="append", help="uncertainty of Ursa's selection: margin (default) or entropy; repeat for several")
    args = ap.parse_args()
    if not args.root.is_dir():
        raise SystemExit(f"dataset {args.root} not found; pass --root")
    torch.set_num_threads(min(2, torch.get_num_threads()))

    split, fd, data, tcfg, features_s = default_features(args.root, train=args.train, valid=args.valid)
    n_tr = len(fd.train_names)
    x = fd.x_train[:n_tr].numpy()  # the plain view of every training image
    y = fd.y_train[:n_tr].numpy()
    valid = [v.numpy() for v in fd.x_valid]
    y_valid = fd.y_valid.numpy()
    classes = split.classes
    seeds = list(range(args.seeds))
    common = dict(start=args.start, rounds=args.rounds, per_round=args.per_round, c=tcfg.c)

    t_base = time.perf_counter()
    base = [run_seed(x, y, valid, y_valid, classes, seed=s, method="random", **common)[0] for s in seeds]
    base_s = time.perf_counter() - t_base
    base_mean = np.mean(base, axis=0)
    for setting in args.setting or ["margin"]:
        t1 = time.perf_counter()
        got = [run_seed(x, y, valid, y_valid, classes, seed=s, method=setting, **common) for s in seeds]
        ursa_mean = np.mean([e for e, _ in got], axis=0)
        sel_times = [t for _, ts in got for t in ts]
        last, three = float(ursa_mean[-1]), float(ursa_mean[min(3, args.rounds)])
        print(json.dumps({
            "benchmark": "active_learning",
            "dataset": args.root.name,
            "setting": setting,
            "n_train": n_tr,
            "n_valid": len(y_valid),
            "start_per_class": args.start,
            "rounds": args.rounds,
            "per_round": args.per_round,
            "seeds": args.seeds,
            "labelled_per_round": [len(classes) * args.start + r * args.per_round for r in range(args.rounds + 1)],
            "ursa_error": [round(float(v), 4) for v in ursa_mean],
            "random_error": [round(float(v), 4) for v in base_mean],
            "ursa_error_per_seed_final": [round(e[-1], 4) for e, _ in got],
            "random_error_per_seed_final": [round(e[-1], 4) for e in base],
            "final_ratio": round(last / max(float(base_mean[-1]), 1e-9), 3),
            "target_final_ratio_at_most": 0.7,
            "ursa_round3_vs_random_round5": round(three - float(base_mean[-1]), 4),
            "target_round3_no_worse": three <= float(base_mean[-1]),
            "selection_s_mean": round(float(np.mean(sel_times)), 3),
            "selection_s_max": round(float(np.max(sel_times)), 3),
            "target_selection_s_under": 2.0,
            "ursa_s": round(time.perf_counter() - t1, 2),
            "random_s": round(base_s, 2),
            "features_s": round(features_s, 2),
            "threads": torch.get_num_threads(),
            "cpu_flags": cpu_flags(),
        }))


if __name__ == "__main__":
    main()
