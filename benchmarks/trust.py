"""Trust benchmark: the budgeted backbone's accuracy, calibration, the open-set detector and heat-map cost.

On a real dataset (default ../shared/data/monkey10, `training/` and `validation/` class folders), in one
run, each result printed as ONE JSON line (with the CPU's flags, threads and the load at its start):

- accuracy: monkey10 full and 10-shot (10 seeded training images per class, the whole validation set):
  `--arch auto` (its default budget: 1.5x the default recipe's estimate) against today's default
  (Lite0) and a Lite2 linear probe (plain view only, the same L-BFGS head), each from a cold feature
  cache, with wall seconds; and the validation ECE before and after temperature scaling of each.
- open_set: trained (default recipe) and exported on 8 classes; unknown: the 2 held-out species
  (`--held-out`, their training and validation photos), scikit-image's sample photos, the digits,
  noise and flat colours. AUROC (known validation photos vs each unknown group) of the detector's
  score and of the softmax baseline (1 - top probability), the share of unknowns rejected and of
  known validation photos accepted at the stored thresholds: detector alone, softmax alone, both.
- detector_choice: the AUROC on the held-out species of each detector Ursa could ship (k-NN cosine
  distance with k = 1 and 5, class-conditional Mahalanobis with one shared covariance), fitted on the
  exported model's embeddings of the known classes' training photos: why k-NN is the default.
- explain: milliseconds per image of `Predictor.explain` (Grad-CAM through the ONNX feature map) against
  a plain `predict_image`, medians over validation photos.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "monkey10"


def cpu_flags() -> list[str]:
    """The CPU features that decide CPU speed (as /proc/cpuinfo names them)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags)


def emit(part: str, **fields: Any) -> None:
    line = {"benchmark": "trust", "part": part, **fields, "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(), "load_average_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(line), flush=True)


def labels_csv(root: Path, path: Path, *, classes: list[str] | None = None, shots: int | None = None, seed: int = 0) -> Path:
    """A `name,label,split` CSV over root/training and root/validation: only `classes`, at most `shots`
    seeded training images per class."""
    rng = np.random.default_rng(seed)
    rows = []
    for side, split in (("training", "train"), ("validation", "valid")):
        for cdir in sorted((root / side).iterdir()):
            if not cdir.is_dir() or (classes is not None and cdir.name not in classes):
                continue
            files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if split == "train" and shots is not None:
                files = [files[i] for i in sorted(rng.choice(len(files), size=min(shots, len(files)), replace=False))]
            rows += [(f.relative_to(root).as_posix(), cdir.name, split) for f in files]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "label", "split"])
        w.writerows(rows)
    return path


def cold_run(root: Path, out: Path, data: Any, train: Any, cache: Path) -> tuple[dict[str, Any], float]:
    """train_run from an empty feature cache; (metrics, wall seconds end to end)."""
    from ursa.train.recipe import train_run

    os.environ["URSA_CACHE_DIR"] = str(cache)
    t = time.perf_counter()
    res = train_run(root, out, data=data, train=train, progress=False)
    return res.metrics, time.perf_counter() - t


def accuracy_part(root: Path, tmp: Path, *, shots: int | None, seed: int) -> None:
    from ursa.config import DataConfig, TrainConfig

    name = "monkey10-full" if shots is None else f"monkey10-{shots}shot"
    data = DataConfig(labels=str(labels_csv(root, tmp / f"{name}.csv", shots=shots, seed=seed)), seed=seed, allow_new_labels=True)
    n_train = sum(1 for r in csv.DictReader(open(data.labels, encoding="utf-8")) if r["split"] == "train")
    recipes = {
        "default": TrainConfig(),
        "auto": TrainConfig(arch="auto"),
        "lite2_linear_probe": TrainConfig(arch="efficientnet_lite2", view_budget=n_train),  # plain view only
    }
    out: dict[str, Any] = {}
    for key, cfg in recipes.items():
        m, wall = cold_run(root, tmp / "runs" / f"{name}-{key}", data, cfg, tmp / "cache" / f"{name}-{key}")
        out[key] = {"arch": (m.get("budget") or {}).get("arch", cfg.arch), "views": len(m["views"]), "error_rate": round(m["error_rate"], 4), "wall_s": round(wall, 1),
                    "ece_before": m["ece"]["before"], "ece_after": m["ece"]["after"], "temperature": m["temperature"]}  # fmt: skip
        if m.get("budget"):
            out[key]["budget"] = {k: m["budget"][k] for k in ("seconds", "estimate_s", "why") if k in m["budget"]}
    best_other = min(out["default"]["error_rate"], out["lite2_linear_probe"]["error_rate"])
    emit("accuracy", dataset=name, n_train=n_train, recipes=out,
         auto_never_worse=out["auto"]["error_rate"] <= best_other, auto_wall_vs_default=round(out["auto"]["wall_s"] / out["default"]["wall_s"], 2),
         ece_after_max=max(v["ece_after"] for v in out.values()))  # fmt: skip


def _unknown_images(root: Path, held_out: list[str], seed: int) -> dict[str, list[Any]]:
    """name of the group -> images (paths or PIL images) none of the known classes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    groups: dict[str, list[Any]] = {}
    groups["held_out_species"] = [p for c in held_out for side in ("training", "validation") for p in sorted((root / side / c).glob("*.jpg"))]
    photos = []
    import skimage.data as sd

    for fn in ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "text", "page", "horse", "clock", "hubble_deep_field", "immunohistochemistry", "logo", "grass", "gravel", "brick", "colorwheel", "cell", "retina", "microaneurysms", "shepp_logan_phantom", "checkerboard", "binary_blobs"):
        try:
            a = np.asarray(getattr(sd, fn)())
        except Exception:  # noqa: BLE001 - a sample that needs a download, or is missing in this version
            continue
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        a = a.astype(np.float64)
        a = (255 * (a - a.min()) / max(1e-9, a.max() - a.min())).astype(np.uint8)
        im = Image.fromarray(a if a.ndim == 2 else a[..., :3])
        photos.append(im.convert("RGB"))
    groups["skimage_samples"] = photos
    d = load_digits()
    pick = rng.choice(len(d.images), size=60, replace=False)
    groups["digits"] = [Image.fromarray((255 - d.images[i] * 16).clip(0, 255).astype(np.uint8)).resize((128, 128), Image.NEAREST).convert("RGB") for i in pick]
    groups["noise"] = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(40)]
    groups["flat_colours"] = [Image.new("RGB", (256, 256), tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(30)]
    return groups


def open_set_part(root: Path, tmp: Path, *, held_out: list[str], seed: int) -> Path:
    from sklearn.metrics import roc_auc_score

    from ursa.config import DataConfig, TrainConfig
    from ursa.export import export_run, load_model

    classes = sorted(p.name for p in (root / "training").iterdir() if p.is_dir())
    known = [c for c in classes if c not in held_out]
    data = DataConfig(labels=str(labels_csv(root, tmp / "known.csv", classes=known)), seed=seed, allow_new_labels=True)
    m, wall = cold_run(root, tmp / "runs" / "known", data, TrainConfig(), tmp / "cache" / "known")
    run = tmp / "runs" / "known"
    model_dir = tmp / "models" / "known"
    export_run(run, model_dir)
    pred = load_model(model_dir)
    split_rows = [r for r in csv.DictReader(open(data.labels, encoding="utf-8")) if r["split"] == "valid"]

    def scores(images: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        det, soft, rej_det, rej_soft = [], [], [], []
        for img in images:
            p = pred.predict_image(img)
            det.append(p.unfamiliarity)
            soft.append(1.0 - p.prob)
            rej_det.append(p.unfamiliarity > pred.detector.threshold)
            rej_soft.append(p.prob < pred.threshold)
        return np.array(det), np.array(soft), np.array(rej_det), np.array(rej_soft)

    kd, ks, krd, krs = scores([root / r["name"] for r in split_rows])
    result: dict[str, Any] = {
        "known_classes": known, "held_out": held_out, "valid_error_rate": round(m["error_rate"], 4), "train_wall_s": round(wall, 1),
        "detector": pred.meta["open_set"]["detector"]["method"], "detector_threshold": round(pred.detector.threshold, 4), "softmax_threshold": round(pred.threshold, 4),
        "known_valid_accepted": {"detector": round(float((~krd).mean()), 4), "softmax": round(float((~krs).mean()), 4), "both": round(float((~krd & ~krs).mean()), 4), "n": len(kd)},
        "unknown": {},
    }  # fmt: skip
    for group, images in _unknown_images(root, held_out, seed).items():
        if not images:
            continue
        ud, us, urd, urs = scores(images)
        y = np.r_[np.zeros(len(kd)), np.ones(len(ud))]
        result["unknown"][group] = {
            "n": len(ud),
            "auroc_detector": round(float(roc_auc_score(y, np.r_[kd, ud])), 4),
            "auroc_softmax": round(float(roc_auc_score(y, np.r_[ks, us])), 4),
            "rejected_detector": round(float(urd.mean()), 4),
            "rejected_softmax": round(float(urs.mean()), 4),
            "rejected_both": round(float((urd | urs).mean()), 4),
        }
    others = [k for k in result["unknown"] if k != "held_out_species"]
    n_other = sum(result["unknown"][k]["n"] for k in others)
    result["other_unknowns_rejected"] = {r: round(sum(result["unknown"][k][f"rejected_{r}"] * result["unknown"][k]["n"] for k in others) / max(1, n_other), 4) for r in ("detector", "softmax", "both")}
    emit("open_set", **result)
    return model_dir


def detector_choice_part(model_dir: Path, root: Path, *, held_out: list[str]) -> None:
    from sklearn.metrics import roc_auc_score

    from ursa.export import load_model
    from ursa.trust import OpenSetDetector

    pred = load_model(model_dir)
    index = {c: i for i, c in enumerate(pred.classes)}

    def embed(paths: list[Path]) -> np.ndarray:
        return np.concatenate([pred.run(pred.load(p), embedding=True)[1] for p in paths])

    train = [p for c in pred.classes for p in sorted((root / "training" / c).glob("*.jpg"))]
    x_tr, y_tr = embed(train), np.array([index[p.parent.name] for p in train])
    known = embed([p for c in pred.classes for p in sorted((root / "validation" / c).glob("*.jpg"))])
    unknown = embed([p for c in held_out for side in ("training", "validation") for p in sorted((root / side / c).glob("*.jpg"))])
    y = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    auroc = {}
    for name, kw in (("knn_k1", {"method": "knn", "k": 1}), ("knn_k5", {"method": "knn", "k": 5}), ("mahalanobis_shared", {"method": "mahalanobis"})):
        det = OpenSetDetector.fit(x_tr, y_tr, n_classes=len(pred.classes), **kw)
        auroc[name] = round(float(roc_auc_score(y, np.r_[det.score(known), det.score(unknown)])), 4)
    emit("detector_choice", held_out=held_out, n_train=len(train), auroc_held_out_species=auroc, best=max(auroc, key=auroc.get))


def explain_part(model_dir: Path, root: Path, *, n: int = 20) -> None:
    from ursa.export import load_model

    pred = load_model(model_dir)
    photos = sorted((root / "validation").rglob("*.jpg"))[:: max(1, len(sorted((root / "validation").rglob("*.jpg"))) // n)][:n]
    pred.predict_image(photos[0])
    pred.explain(photos[0])
    plain, why = [], []
    for p in photos:
        t = time.perf_counter()
        pred.predict_image(p)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        pred.explain(p)
        why.append(time.perf_counter() - t)
    a, b = statistics.median(plain) * 1e3, statistics.median(why) * 1e3
    emit("explain", n=len(photos), predict_ms=round(a, 1), explain_ms=round(b, 1), ratio=round(b / a, 2), target_ratio=3.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--held-out", nargs=2, default=["n8", "n9"], help="the two species held out of training for the open-set part")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--parts", nargs="+", default=["accuracy", "open_set", "detector_choice", "explain"])
    args = ap.parse_args()
    if not args.root.is_dir():
        raise SystemExit(f"dataset {args.root} not found; pass --root")
    with tempfile.TemporaryDirectory(prefix="ursa-trust-") as tmp_name:
        tmp = Path(tmp_name)
        if "accuracy" in args.parts:
            accuracy_part(args.root, tmp, shots=None, seed=args.seed)
            accuracy_part(args.root, tmp, shots=10, seed=args.seed)
        if {"open_set", "detector_choice", "explain"} & set(args.parts):
            model_dir = open_set_part(args.root, tmp, held_out=list(args.held_out), seed=args.seed)
            if "detector_choice" in args.parts:
                detector_choice_part(model_dir, args.root, held_out=list(args.held_out))
            if "explain" in args.parts:
                explain_part(model_dir, args.root)


if __name__ == "__main__":
    main()
