"""Label-noise benchmark: how well does Ursa find flipped labels, against the lesson's top-losses approach?

On a real dataset (default ../shared/data/monkey10, `--train training --valid validation`), a seeded
10% of the training labels are flipped to another class at random (in memory; no file is written).
Then, in the same run:

- Ursa: `ursa.interpret.issues.search_issues` (k-fold out-of-sample probabilities on the cached
  features + confident learning, plus duplicates, outliers and image quality), timed end to end.
- Baseline, the lesson's approach: train the default head on the noisy labels, rank the training images
  by their loss under that model, and flag the top k, k = the number of training images Ursa flags.

Precision, recall and F1 of each flagged set against the flipped set are printed as ONE JSON line.
Features come from the run's on-disk cache (computed once if missing; `features_s` says how long).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _features import default_features

from ursa.interpret.issues import search_issues
from ursa.models import Head
from ursa.train.learner import Learner

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "monkey10"


def prf(flagged: set[int], truth: set[int]) -> dict[str, float]:
    tp = len(flagged & truth)
    p = tp / len(flagged) if flagged else 0.0
    r = tp / len(truth) if truth else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}


def top_loss_baseline(x: torch.Tensor, y: torch.Tensor, x_plain: torch.Tensor, n_classes: int, k: int, *, seed: int, epochs: int) -> set[int]:
    """The lesson's approach: train the default head on the (noisy) labels, flag the k largest training losses."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Head(x.shape[1], n_classes, dropout=0.25)
        dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True, generator=gen, drop_last=len(y) > 64)
        learn = Learner(head, dl, None, classes=[str(i) for i in range(n_classes)], progress=False, label_smoothing=0.1, wd=0.01)
        learn.fit_one_cycle(epochs, 3e-3)
    head.eval()
    n = len(x_plain)
    with torch.inference_mode():
        loss = torch.nn.functional.cross_entropy(head(x_plain), y[:n], reduction="none")
    return set(torch.argsort(loss, descending=True)[:k].tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--train", default="training")
    ap.add_argument("--valid", default="validation")
    ap.add_argument("--noise", type=float, default=0.10, help="share of training labels flipped")
    ap.add_argument("--seed", type=int, default=0, help="seed of the flips")
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    if not args.root.is_dir():
        raise SystemExit(f"dataset {args.root} not found; pass --root")

    split, fd, data, tcfg, features_s = default_features(args.root, train=args.train, valid=args.valid)

    n_tr, n_va, nv = len(fd.train_names), len(fd.valid_names), len(fd.views)
    c = len(split.classes)
    clean = fd.y_train[:n_tr].numpy().copy()
    rng = np.random.default_rng(args.seed)
    flipped = np.sort(rng.choice(n_tr, size=round(args.noise * n_tr), replace=False))
    noisy = clean.copy()
    noisy[flipped] = (clean[flipped] + rng.integers(1, c, size=len(flipped))) % c  # always another class
    truth = set(flipped.tolist())

    x_tr = fd.x_train.numpy().reshape(nv, n_tr, -1)
    views = [[x_tr[v, i] for v in range(nv)] for i in range(n_tr)] + [[x[i] for x in (t.numpy() for t in fd.x_valid)] for i in range(n_va)]
    labels = np.concatenate([noisy, fd.y_valid.numpy()])
    t1 = time.perf_counter()
    report = search_issues(split.root, fd.train_names + fd.valid_names, labels, [False] * n_tr + [True] * n_va, views, split.classes, folds=5, epochs=args.epochs, seed=data.seed)
    search_s = time.perf_counter() - t1
    index = {n: i for i, n in enumerate(fd.train_names)}
    label_rows = report.of_kind("label")
    flagged = {index[it.name] for it in label_rows if it.split == "train"}
    ursa = prf(flagged, truth)
    suggested_right = sum(1 for it in label_rows if it.split == "train" and index[it.name] in truth and it.suggested == split.classes[clean[index[it.name]]])

    y_all = torch.from_numpy(np.tile(noisy, nv))
    base_flag = top_loss_baseline(fd.x_train, y_all, fd.x_train[:n_tr], c, len(flagged), seed=data.seed, epochs=args.epochs)
    base = prf(base_flag, truth)
    print(json.dumps({
        "benchmark": "label_noise",
        "dataset": str(args.root.name),
        "n_train": n_tr,
        "n_valid": n_va,
        "noise": args.noise,
        "n_flipped": len(truth),
        "ursa": {**ursa, "n_flagged": len(flagged), "suggested_label_correct": suggested_right, "n_flagged_valid": sum(1 for it in label_rows if it.split == "valid")},
        "top_losses_baseline": {**base, "k": len(flagged)},
        "f1_gain": round(ursa["f1"] - base["f1"], 4),
        "issue_search_s": round(search_s, 2),
        "features_s": round(features_s, 2),
        "other_findings": {k: v for k, v in report.summary["counts"].items() if k != "label"},
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
