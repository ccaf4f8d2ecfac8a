"""`ursa next RUN --pool DIR`: which photos of an unlabelled folder to label next, with the model's guess.

The pool is any folder of images (read recursively; hidden folders such as `.ursa/` and files that are
not images are skipped and counted). Its embeddings come from the run's backbone through the feature
cache (`ursa.train.features.FeatureCache`, stored with the dataset's cache, never inside the pool:
the pool folder is only read), computed once with a progress bar. The run's head gives the logits,
calibrated by the run's temperature (`ursa.interpret.active.temperature_of`), and
`ursa.interpret.active.select` ranks the pool against the dataset's own images (plain view).

`suggest_next(run, pool, n=30)` returns a `NextReport` and writes, once everything is computed,
`runs/NAME/next.csv` (`name,guess,confidence,reason`, name = the pool file's absolute path, best first),
`next.json` (the pool, the counts and the settings) and `next.png` (a contact sheet of the picks).
`suggest_for_learner(learn, pool, n)` is the same for a notebook Learner, in memory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ursa._io import atomic_write_bytes, atomic_write_json, sha256_file
from ursa.data.items import Skipped, check_image, inside_root
from ursa.errors import InterpretError
from ursa.imageio import NON_IMAGE_SUFFIXES
from ursa.interpret.active import NEAR_DUPLICATE, Selection, calibrated_probs, select, temperature_of

__all__ = ["NEXT_COLUMNS", "NextReport", "scan_pool", "check_pool", "suggest_next", "suggest_for_learner", "read_next", "head_params"]

NEXT_COLUMNS = ("name", "guess", "confidence", "reason")
Progress = Callable[[str, int, int], None]


@dataclass
class NextReport:
    """The picks of one selection, as next.csv rows, and what was skipped on the way."""

    pool: Path
    rows: list[dict[str, str]]  # next.csv rows, best first: name (absolute path), guess, confidence, reason
    classes: list[str]
    n_images: int  # pool images considered (decodable)
    skipped: list[Skipped] = field(default_factory=list)  # pool files that are not images or do not decode
    n_train_duplicates: int = 0
    n_pool_duplicates: int = 0
    temperature: float = 1.0
    written: list[Path] = field(default_factory=list)  # files written (empty for a Learner's selection)
    root: Path | None = None  # the dataset the picks are to be labelled into

    def to_csv(self) -> str:
        """next.csv as text."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(NEXT_COLUMNS)
        w.writerows([[r[c] for c in NEXT_COLUMNS] for r in self.rows])
        return buf.getvalue()

    def summary(self) -> dict[str, Any]:
        """next.json: the pool, the counts, the temperature and the picks' names."""
        return {
            "pool": str(self.pool),
            "n_picks": len(self.rows),
            "n_images": self.n_images,
            "n_skipped": len(self.skipped),
            "skipped": [[s.name, s.reason] for s in self.skipped[:100]],
            "n_train_duplicates": self.n_train_duplicates,
            "n_pool_duplicates": self.n_pool_duplicates,
            "temperature": self.temperature,
            "classes": self.classes,
            "root": str(self.root) if self.root is not None else None,
        }


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__pycache__"


def scan_pool(pool: str | Path) -> tuple[list[str], list[Skipped]]:
    """(image names relative to `pool`, sorted; skipped files with the reason) of every file under `pool`.

    Hidden files and folders are not read; symlinks are skipped (a pool is read, never followed out of);
    files with a non-image suffix or that do not open as an image are skipped with the reason.
    """
    pool = Path(pool)
    names: list[str] = []
    skipped: list[Skipped] = []
    for dirpath, dirnames, filenames in os.walk(pool):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d) and not (Path(dirpath) / d).is_symlink())
        for fname in sorted(filenames):
            if _hidden(fname):
                continue
            path = Path(dirpath) / fname
            rel = path.relative_to(pool).as_posix()
            if path.is_symlink():
                skipped.append(Skipped(rel, "symlink (not followed; copy the file into the pool)"))
            elif path.suffix.lower() in NON_IMAGE_SUFFIXES:
                skipped.append(Skipped(rel, f"not an image ({path.suffix} file)"))
            else:
                reason = check_image(path)
                if reason is None:
                    names.append(rel)
                else:
                    skipped.append(Skipped(rel, reason))
    return sorted(names), skipped


def check_pool(pool: str | Path, dataset_root: str | Path) -> Path:
    """`pool`, checked: a folder, and neither the dataset folder nor inside it nor around it (InterpretError)."""
    pool = Path(pool)
    if not pool.exists():
        raise InterpretError(f"pool folder {pool} does not exist. Pass --pool with a folder of unlabelled images.")
    if not pool.is_dir():
        raise InterpretError(f"--pool {pool} is a file, not a folder. Pass the folder that holds the unlabelled images.")
    root_abs, pool_abs = Path(dataset_root).resolve(), pool.resolve()
    if inside_root(root_abs, pool_abs):
        what = "the training folder itself" if pool_abs == root_abs else f"inside the training folder {dataset_root}"
        raise InterpretError(f"--pool {pool} is {what}: its images are labelled already. Pass a folder of new, unlabelled images outside the dataset.")
    if inside_root(pool_abs, root_abs):
        raise InterpretError(f"--pool {pool} holds the training folder {dataset_root}: its images are labelled already. Pass a folder of new, unlabelled images outside the dataset.")
    return pool


def head_params(state: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(W (classes, d), b (classes,)) of the Head in state dict `state` (keys `1.bn.*`, `1.fc.*`, or the
    Head's own `bn.*`, `fc.*`), with its BatchNorm (eval mode) folded in: logits = x @ W.T + b."""
    pre = "1." if "1.fc.weight" in state else ""
    get = lambda k: np.asarray(state[pre + k], dtype=np.float64)  # noqa: E731
    try:
        w, b = get("fc.weight"), get("fc.bias")
        scale = get("bn.weight") / np.sqrt(get("bn.running_var") + 1e-5)
        shift = get("bn.bias") - get("bn.running_mean") * scale
    except KeyError as exc:
        raise InterpretError(f"the model has no classifier head ({exc} missing). Train the run again.") from None
    return w * scale[None, :], b + w @ shift


def _pool_cache_root(dataset_cache: Path, pool: Path) -> Path:
    """Where a pool's features are cached: beside the dataset's, one folder per pool path."""
    return dataset_cache / "pool" / hashlib.sha1(str(pool.resolve()).encode()).hexdigest()[:12]


def _suggest(
    pool: Path,
    *,
    n: int,
    split: Any,
    backbone: Any,
    data: Any,
    w: np.ndarray,
    b: np.ndarray,
    temperature: float,
    cache_root: Path,
    kind: str,
    seed: int,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> tuple[NextReport, Selection]:
    from ursa.train.features import PLAIN, FeatureCache

    check_pool(pool, split.root)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InterpretError(f"--n must be a whole number of at least 1 (got {n!r}).")
    names, skipped = scan_pool(pool)
    if not names:
        extra = f" ({len(skipped)} files skipped: {skipped[0].name}: {skipped[0].reason})" if skipped else ""
        raise InterpretError(f"the pool {pool} holds no images{extra}. Put the unlabelled photos in it (sub-folders are read too), then run again.")
    if n > len(names):
        raise InterpretError(f"--n {n} is more than the {len(names)} images in the pool {pool}. Pass --n {len(names)} or fewer.")

    def bar(label: str) -> Callable[[int, int], None] | None:
        return (lambda d, t: progress(label, d, t)) if progress else None

    cache_kw = dict(flip=data.flip, seed=data.seed, aug=data.aug)
    labelled = [it.name for it in [*split.train, *split.valid]]
    lab_fs = FeatureCache(cache_root, backbone, **cache_kw).get(split.root, labelled, PLAIN, batch_size=batch_size, progress=bar("features of the dataset"))
    pool_fs = FeatureCache(_pool_cache_root(cache_root, pool), backbone, **cache_kw).get(pool, names, PLAIN, batch_size=batch_size, progress=bar("features of the pool"))
    skipped += list(pool_fs.failed)
    if not pool_fs.names:
        raise InterpretError(f"none of the {len(names)} images in the pool {pool} could be decoded ({pool_fs.failed[0].name}: {pool_fs.failed[0].reason}). Check them with `ursa verify`, then run again.")
    n = min(n, len(pool_fs.names))
    if progress:
        progress("comparing files with the dataset", 0, 1)
    pool_hashes = [sha256_file(pool / nm) for nm in pool_fs.names]
    lab_hashes = [sha256_file(split.root / nm) for nm in lab_fs.names]
    probs = calibrated_probs(pool_fs.feats.astype(np.float64) @ w.T + b, temperature)
    classes = list(split.classes)
    sel = select(pool_fs.feats, probs, classes, n=n, labelled_emb=lab_fs.feats, pool_hashes=pool_hashes, train_hashes=lab_hashes, kind=kind, near=NEAR_DUPLICATE, seed=seed)
    pool_abs = pool.resolve()
    rows = [{"name": str(pool_abs / pool_fs.names[p.index]), "guess": p.guess, "confidence": f"{p.confidence:.4f}", "reason": p.reason} for p in sel.picks]
    report = NextReport(pool_abs, rows, classes, len(pool_fs.names), skipped, sel.n_train_duplicates, sel.n_pool_duplicates, temperature, root=Path(split.root))
    return report, sel


def suggest_next(run_dir: str | Path, pool: str | Path, *, n: int = 30, kind: str = "margin", seed: int | None = None, write: bool = True, progress: Progress | None = None) -> NextReport:
    """The `n` images of `pool` whose labels would help run `run_dir` most (see the module docstring).

    Every bad input raises InterpretError before anything is written: a missing pool, a pool that is
    (or holds, or is inside) the dataset folder, a pool with no images, `n` larger than the pool, a run
    folder that is not a finished run. With `write`, next.csv, next.json and next.png are written into
    the run folder once everything is computed. `progress(label, done, total)` reports feature passes.
    """
    from ursa.interpret.runs import read_run
    from ursa.train.features import cache_dir_for, prepare_backbone

    rf = read_run(run_dir, weights=True)
    run, split, data, train, weights = rf.path, rf.split, rf.data, rf.train, rf.weights
    check_pool(pool, split.root)  # before the backbone loads: a wrong pool fails at once
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as fh:
        keys = list(fh.keys())
        head = {k: fh.get_tensor(k) for k in keys if k.startswith("1.")}
        body = {k[2:]: fh.get_tensor(k) for k in keys if k.startswith("0.")} if _fine_tuned(run) else None
    w, b = head_params(head)
    backbone = prepare_backbone(train)
    cache_root = cache_dir_for(split.root)
    if body is not None:  # a fine-tuned body: its own features, cached apart from the pretrained body's
        import torch

        backbone.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in body.items()})
        cache_root = cache_root / f"run-{sha256_file(weights)[:16]}"
    report, sel = _suggest(Path(pool), n=n, split=split, backbone=backbone, data=data, w=w, b=b, temperature=temperature_of(run), cache_root=cache_root,
                           kind=kind, seed=data.seed if seed is None else seed, batch_size=train.batch_size, progress=progress)  # fmt: skip
    if write:
        _write(run, report)
    return report


def _fine_tuned(run: Path) -> bool:
    try:
        return json.loads((run / "metrics.json").read_text(encoding="utf-8")).get("final_stage") == "fine_tune"
    except (OSError, ValueError, AttributeError):
        return False


def _write(run: Path, report: NextReport) -> None:
    """next.png, next.json, then next.csv (what the review page reads), each atomically."""
    from ursa.imageio import decode_image
    from ursa.interpret.plots import image_grid

    thumbs, titles = [], []
    for r in report.rows:
        try:
            im = decode_image(r["name"], min_side=160)
            im.thumbnail((160, 160))
            thumbs.append(np.asarray(im.convert("RGB")))
        except Exception:  # a file that changed or went since the selection: a grey tile, not a crash
            thumbs.append(np.full((160, 160, 3), 200, np.uint8))
        titles.append(f"{Path(r['name']).name[:22]}\n{r['guess']} {float(r['confidence']):.0%}")
    if thumbs:
        image_grid(thumbs, titles, suptitle=f"label these next ({len(thumbs)} of {report.n_images} pool images): model's guess and confidence", out=run / "next.png")
        report.written.append(run / "next.png")
    atomic_write_json(run / "next.json", report.summary())
    atomic_write_bytes(run / "next.csv", report.to_csv().encode("utf-8"))
    report.written += [run / "next.json", run / "next.csv"]


def suggest_for_learner(learn: Any, pool: str | Path, *, n: int = 30, kind: str = "margin", seed: int | None = None, progress: Progress | None = None) -> NextReport:
    """`suggest_next` for an image Learner in memory (made by `vision_learner`): its head, its DataBunch's
    dataset, its backbone's feature cache (a body trained after `unfreeze()` gets a cache of its own).
    Temperature 1 (a Learner has no calibration). Writes nothing."""
    from ursa.train.features import cache_dir_for

    im = getattr(learn, "_image", None)
    if im is None:
        raise InterpretError("next_batch needs an image learner made by vision_learner(dls, arch).")
    split = learn.dls.split
    state = {k: v.detach().cpu().numpy() for k, v in im.head.state_dict().items()}
    w, b = head_params(state)
    cache_root = cache_dir_for(split.root)
    from ursa.train.learner import _digest

    digest = _digest(im.backbone.model)
    if digest != im.body_digest:
        cache_root = cache_root / f"body-{digest[:16]}"
    report, _ = _suggest(Path(pool), n=n, split=split, backbone=im.backbone, data=im.data, w=w, b=b, temperature=1.0, cache_root=cache_root,
                         kind=kind, seed=im.data.seed if seed is None else seed, batch_size=im.train.batch_size, progress=progress)  # fmt: skip
    return report


def read_next(run_dir: str | Path) -> list[dict[str, str]]:
    """The rows of `run_dir/next.csv` (columns NEXT_COLUMNS), best first."""
    from ursa.interpret.runs import read_run_csv

    return read_run_csv(run_dir, "next.csv", command=f"ursa next {run_dir} --pool DIR", columns=NEXT_COLUMNS)
