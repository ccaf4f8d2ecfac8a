"""The frozen-feature cache: backbone features computed once per image and view, reused by every epoch.

Most of a frozen-backbone epoch is the backbone's forward pass, and it gives the same answer every
epoch. So features are computed once per (image, view) and stored on disk beside the dataset
(`<root>/.ursa/cache/<signature>/`), keyed by name, size and modification time: a re-run, a second
run with other head settings, the label-issue search and the duplicate search all read the cache.

Views: 0 is the evaluation transform, 1 its horizontal mirror (test-time augmentation), and 2.. are
seeded random draws of the training transform of the run's `Augment` (any Augment: each view is a
random draw with its own seed), whose spec is part of the cache's signature.

Larger than memory: each view is stored as fixed-size shards (`SHARD_ROWS` rows) written as they
complete, read back memory-mapped; images are decoded by DataLoader workers as they are needed. An
interrupted extraction keeps its finished shards and resumes from there. A cache written by the
earlier one-file-per-view layout is not read; it is recomputed once into the new layout.

For a run: `prepare_backbone` gives the backbone a TrainConfig asks for, and `cached_features` reads (or
computes) every view a split needs, as the tensors the head stage, the label-issue search and the
duplicate search take (`FeatureData`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ursa._io import atomic_write_bytes, atomic_write_json
from ursa.config import DEFAULT_AUG, Augment, DataConfig, TrainConfig
from ursa.data.items import Skipped
from ursa.data.split import Split
from ursa.data.transforms import eval_transform, input_size, open_image, train_transform
from ursa.errors import TrainError
from ursa.imageio import eval_min_side
from ursa.models import Backbone, create_backbone
from ursa.train import distributed as dist

__all__ = ["FeatureCache", "FeatureSet", "FeatureData", "extract", "cache_dir_for", "cached_features", "prepare_backbone", "views_for", "PLAIN", "MIRROR", "SHARD_ROWS"]

PLAIN, MIRROR = 0, 1
SHARD_ROWS = 1024  # rows per cache shard: what an interruption can lose, and the most held in memory while extracting
Progress = Callable[[int, int], None]


def cache_dir_for(root: Path) -> Path:
    """`<root>/.ursa/cache`, or a per-root folder under ~/.cache/ursa when the dataset is read-only.

    URSA_CACHE_DIR overrides both.
    """
    env = os.environ.get("URSA_CACHE_DIR")
    if env:
        return Path(env) / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    local = root / ".ursa" / "cache"
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ursa" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    # A folder with no write bits is read-only by intent, even for root (who could write anyway).
    if not (root.stat().st_mode & 0o222):
        return home
    try:
        local.mkdir(parents=True, exist_ok=True)
        probe = local / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        return local
    except OSError:
        return home


class _Images(Dataset):
    """Decodes and transforms one view of each path; a failed decode yields ok=False, never an exception."""

    def __init__(self, paths: Sequence[Path], tf: Callable[[Any], torch.Tensor], size: int, seeds: Sequence[int] | None, *, min_side: int | None = None):
        self.paths, self.tf, self.size, self.seeds = list(paths), tf, size, seeds
        self.min_side = min_side or size  # smallest short side a JPEG is draft-decoded to

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        try:
            im = open_image(self.paths[i], min_side=self.min_side)
            if self.seeds is None:
                x = self.tf(im)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seeds[i])
                    x = self.tf(im)
            return x, True, ""
        except Exception as exc:  # a broken file becomes a skipped row, whatever Pillow raised
            return torch.zeros(3, self.size, self.size), False, f"{type(exc).__name__}: {exc}"


@dataclass
class FeatureSet:
    """Features of `names` for one view: float32 (n, d); `failed` lists the files that would not decode."""

    names: list[str]
    feats: np.ndarray
    failed: list[Skipped]


def _aug_signature(aug: Augment) -> dict[str, Any]:
    """The augmentation's part of the signature. `DEFAULT_AUG` (with or without flips) keeps the keys it had
    before `Augment` existed, so caches written then stay valid; any other Augment adds its whole spec."""
    if replace(aug, do_flip=DEFAULT_AUG.do_flip) == DEFAULT_AUG:
        return {"flip": aug.do_flip, "jitter": DEFAULT_AUG.max_lighting, "scale": [DEFAULT_AUG.min_scale, 1.0]}
    return {"flip": aug.do_flip, "aug": aug.spec()}


def _signature(backbone: Backbone, *, aug: Augment, seed: int, precision: str = "fp32") -> str:
    spec = {
        "timm": backbone.timm_name,
        "weights": backbone.weights,
        "cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()},
        **_aug_signature(aug),
        "seed": seed,
        "v": 3,  # 2: sharded layout; 3: evaluation view resized from the crop's region (ursa.imageio)
    }
    if precision != "fp32":
        spec["precision"] = precision  # reduced-precision features are not mixed with fp32 ones
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCache:
    """Feature shards for one backbone + transform signature, under `cache_root/<signature>/view<v>/`.

    Each view is a set of shards: `<id>.npy` (float16 (rows, num_features), at most `shard_rows` rows)
    and `<id>.json` (the rows' keys `name|bytes|mtime_ns`); the id is a hash of the keys, so two
    processes that compute the same shard write the same file. A shard is written (atomically, the
    .npy before the .json that makes it count) as soon as its rows are computed, so an interrupted
    extraction keeps every finished shard and a re-run computes only the rest. Shards are read
    memory-mapped: memory is bounded by a shard and a batch, not by the dataset.

    Under torchrun, the missing shards are split across ranks, gathered, and written by local rank 0.
    """

    def __init__(
        self,
        cache_root: Path,
        backbone: Backbone,
        *,
        flip: bool = True,
        seed: int = 42,
        aug: Augment = DEFAULT_AUG,
        shard_rows: int = SHARD_ROWS,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
    ):
        if shard_rows < 1:
            raise TrainError(f"shard_rows must be at least 1 (got {shard_rows}).")
        aug = aug if (flip or not aug.do_flip) else replace(aug, do_flip=False)  # flip=False turns the Augment's flips off
        self.backbone, self.aug, self.flip, self.seed = backbone, aug, aug.do_flip, seed
        self.shard_rows, self.device, self.precision = shard_rows, torch.device(device), precision
        self.dir = Path(cache_root) / _signature(backbone, aug=aug, seed=seed, precision=precision)
        self._maps: dict[Path, np.ndarray] = {}

    def view_dir(self, view: int) -> Path:
        """Folder of `view`'s shards."""
        return self.dir / f"view{view}"

    def index(self, view: int) -> dict[str, tuple[Path, int]]:
        """key -> (shard .npy path, row) for every complete shard of `view`; damaged shards are ignored."""
        out: dict[str, tuple[Path, int]] = {}
        for meta in sorted(self.view_dir(view).glob("*.json")):
            arr = meta.with_suffix(".npy")
            try:
                keys = json.loads(meta.read_text())["keys"]
                rows = self._map(arr).shape[0]
            except (ValueError, OSError, KeyError, TypeError):
                continue  # a damaged shard is recomputed, not trusted
            if rows != len(keys):
                continue
            for r, k in enumerate(keys):
                out.setdefault(k, (arr, r))
        return out

    def _map(self, arr: Path) -> np.ndarray:
        m = self._maps.get(arr)
        if m is None:
            m = np.load(arr, mmap_mode="r")
            if m.ndim != 2 or m.shape[1] != self.backbone.num_features:
                raise ValueError(f"{arr} has shape {m.shape}")
            self._maps[arr] = m
        return m

    @staticmethod
    def _key(root: Path, name: str) -> str:
        st = (root / name).stat()
        return f"{name}|{st.st_size}|{st.st_mtime_ns}"

    def get(
        self,
        root: Path,
        names: Sequence[str],
        view: int,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: Progress | None = None,
    ) -> FeatureSet:
        """Features of `names` (relative to `root`) for `view`, computing and storing only what is missing.

        Returns float32 (n_ok, num_features) in the order of `names`, without the files that would not decode.
        """
        failed = self.build(root, names, view, batch_size=batch_size, num_workers=num_workers, progress=progress)
        bad = {s.name for s in failed}
        ok_names = [n for n in names if n not in bad]
        return FeatureSet(ok_names, self.read(root, ok_names, view), failed)

    def read(self, root: Path, names: Sequence[str], view: int) -> np.ndarray:
        """Cached features of `names` for `view`: float32 (n, num_features), read from the memory-mapped
        shards (only the rows asked for are paged in). Every name must be cached (see `build`)."""
        index = self.index(view)
        out = np.zeros((len(names), self.backbone.num_features), np.float32)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for pos, n in enumerate(names):
            hit = index.get(self._key(root, n))
            if hit is None:
                raise TrainError(f"{n} has no cached features for view {view}; build the cache first (FeatureCache.build).")
            by_shard.setdefault(hit[0], []).append((hit[1], pos))
        for arr, pairs in by_shard.items():
            pairs.sort()
            rows, pos = [r for r, _ in pairs], [p for _, p in pairs]
            out[pos] = self._map(arr)[rows]
        return out

    def build(
        self,
        root: Path,
        names: Sequence[str],
        view: int,
        *,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: Progress | None = None,
    ) -> list[Skipped]:
        """Compute and store the missing features of `names` for `view`, one shard at a time; returns the
        files that would not decode (they are not cached, so a fixed file is tried again).

        `progress(done, total)` counts this process's missing images. Under torchrun the missing
        shards are dealt out to the ranks in rounds, each round's results gathered on every rank and
        written by local rank 0; every rank returns the same failures.
        """
        index = self.index(view)
        seen: set[str] = set()
        missing: list[int] = []
        for i, n in enumerate(names):
            k = self._key(root, n)
            if k not in index and k not in seen:
                seen.add(k)
                missing.append(i)
        world, me = dist.world_size(), dist.rank()
        missing = dist.broadcast(missing)  # every rank deals out the same list, whatever its disk showed
        if not missing:
            if progress is not None:
                progress(len(names), len(names))
            return []
        rows = min(self.shard_rows, -(-len(missing) // world))  # smaller shards when there are too few for every rank
        chunks = [missing[j : j + rows] for j in range(0, len(missing), rows)]
        mine_total = sum(len(c) for c in chunks[me::world])
        done = 0
        failed: list[Skipped] = []
        for start in range(0, len(chunks), world):
            chunk = chunks[start + me] if start + me < len(chunks) else []
            part = self._extract_chunk(root, names, chunk, view, batch_size=batch_size, num_workers=num_workers,
                                       progress=None if progress is None else (lambda d, _t, base=done: progress(base + d, mine_total)))  # fmt: skip
            done += len(chunk)
            for keys, feats, bad in dist.gather(part):
                failed.extend(Skipped(n, r) for n, r in bad)
                if keys and dist.is_local_main():
                    self._store(view, keys, feats)
        dist.barrier()  # every writer finished before anyone reads
        return failed

    def _extract_chunk(self, root: Path, names: Sequence[str], chunk: list[int], view: int, *, batch_size: int, num_workers: int, progress: Progress | None) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
        """(keys, float16 features, [(name, reason)] of failures) of one shard's images."""
        if not chunk:
            return [], np.zeros((0, self.backbone.num_features), np.float16), []
        new = extract(
            self.backbone,
            [root / names[i] for i in chunk],
            view=view,
            seeds=[_view_seed(self.seed, view, names[i]) for i in chunk],
            aug=self.aug,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
            device=self.device,
            precision=self.precision,
        )
        ok = [j for j, reason in enumerate(new.failed_reasons) if reason is None]
        bad = [(names[chunk[j]], r) for j, r in enumerate(new.failed_reasons) if r is not None]
        # kept as float16, as stored, so a fresh run and a cached re-run see identical features
        return [self._key(root, names[chunk[j]]) for j in ok], new.feats[ok].astype(np.float16), bad

    def _store(self, view: int, keys: list[str], feats: np.ndarray) -> None:
        sid = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20]
        base = self.view_dir(view) / sid
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(feats, dtype=np.float16))
        atomic_write_bytes(base.with_suffix(".npy"), buf.getvalue())
        atomic_write_json(base.with_suffix(".json"), {"keys": keys, "rows": len(keys)})
        self._maps.pop(base.with_suffix(".npy"), None)


def _view_seed(seed: int, view: int, name: str) -> int:
    return zlib.crc32(f"{seed}|{view}|{name}".encode()) & 0x7FFFFFFF


@dataclass
class _Extracted:
    feats: np.ndarray
    failed_reasons: list[str | None]


def extract(
    backbone: Backbone,
    paths: Sequence[Path],
    *,
    view: int = PLAIN,
    seeds: Sequence[int] | None = None,
    aug: Augment = DEFAULT_AUG,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> _Extracted:
    """Run the frozen backbone over one view of `paths`: float32 features (n, num_features).

    The model runs in channels-last layout under `inference_mode` (faster convolutions on CPU), on
    `device`, under autocast when `precision` is bf16/fp16. Images are decoded by `num_workers`
    DataLoader workers as batches are needed, so memory holds a few batches, not the dataset.
    """
    size = input_size(backbone.data_config)
    if view in (PLAIN, MIRROR):
        tf, view_seeds, min_side = eval_transform(backbone.data_config), None, eval_min_side(backbone.data_config)
    else:
        tf, view_seeds, min_side = train_transform(backbone.data_config, aug=aug), list(seeds or []), size
    ds = _Images(paths, tf, size, view_seeds, min_side=min_side)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, persistent_workers=False)
    device = torch.device(device)
    model = backbone.model.eval().to(device=device, memory_format=torch.channels_last)
    out = np.zeros((len(ds), backbone.num_features), np.float32)
    reasons: list[str | None] = []
    done = 0
    with torch.inference_mode():
        for x, ok, why in dl:
            if view == MIRROR:
                x = torch.flip(x, dims=[-1])
            with dist.autocast(device, precision):
                f = model(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
            out[done : done + len(x)] = f.float().cpu().numpy()
            reasons.extend(None if o else str(w) for o, w in zip(ok.tolist(), why))
            done += len(x)
            if progress is not None:
                progress(done, len(ds))
    return _Extracted(out, reasons)


# ---- the features of a run -------------------------------------------------------------------------


def prepare_backbone(train: TrainConfig, backbone: Backbone | None = None) -> Backbone:
    """The backbone of `train` (or the one given), with its input side set to `train.size` when given."""
    bb = backbone or create_backbone(train.arch, weights=train.weights)
    if train.size is not None:  # TrainConfig has checked its range
        bb = replace(bb, data_config={**bb.data_config, "input_size": (3, train.size, train.size)})
    return bb


def views_for(n_train: int, *, max_views: int, budget: int, flip: bool) -> list[int]:
    """Cached views for training: plain, then mirrored (if flips allowed), then augmented views, while
    n_train * len(views) stays within `budget` (at least the plain view)."""
    pool = [PLAIN] + ([MIRROR] if flip else []) + list(range(2, 2 + max_views))
    n = max(1, min(len(pool), budget // max(1, n_train)))
    return pool[:n]


@dataclass
class FeatureData:
    """Cached features of a split: training samples (all views stacked) and validation views."""

    x_train: torch.Tensor  # (n_train * views, d) float32, view-major: rows [v * n_train, (v + 1) * n_train) are view v
    y_train: torch.Tensor  # (n_train * views,) int64
    train_names: list[str]
    x_valid: list[torch.Tensor]  # one (n_valid, d) tensor per evaluation view
    y_valid: torch.Tensor
    valid_names: list[str]
    failed: list[Skipped]  # files that would not decode, left out of every tensor
    views: list[int]


def cached_features(split: Split, backbone: Backbone, cfg: TrainConfig, data_cfg: DataConfig, *, progress: Callable[[str, int, int], None] | None = None, device: torch.device | str = "cpu") -> FeatureData:
    """Features for every training view and the evaluation views of the validation set (cached on disk;
    computed on `device`, shared out across ranks under torchrun). `progress(label, done, total)` per pass."""
    cache = FeatureCache(cache_dir_for(split.root), backbone, flip=data_cfg.flip, seed=data_cfg.seed, aug=data_cfg.aug, device=device)
    views = views_for(len(split.train), max_views=cfg.views, budget=cfg.view_budget, flip=data_cfg.flip)
    eval_views = [PLAIN, MIRROR] if (cfg.tta and data_cfg.flip) else [PLAIN]
    failed: dict[str, Skipped] = {}

    def get(names: list[str], view: int, label: str) -> FeatureSet:
        cb = (lambda d, t: progress(label, d, t)) if progress else None
        fs = cache.get(split.root, names, view, progress=cb, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        failed.update({s.name: s for s in fs.failed})
        return fs

    # each label says which pass of how many, so a listener can turn a pass's done/total into an overall fraction
    n_pass = len(eval_views) + len(views)
    va_names = [it.name for it in split.valid]
    va_sets = [get(va_names, v, f"features valid view {v} (pass {k + 1}/{n_pass})") for k, v in enumerate(eval_views)]
    tr_names = [it.name for it in split.train]
    tr_sets = [get(tr_names, v, f"features train view {v} (pass {len(eval_views) + k + 1}/{n_pass})") for k, v in enumerate(views)]
    bad = set(failed)
    label = {it.name: it.label for it in [*split.train, *split.valid]}
    index = {c: i for i, c in enumerate(split.classes)}

    def stack(fs_list: list[FeatureSet], names: list[str]) -> list[torch.Tensor]:
        keep = [n for n in names if n not in bad]
        out = []
        for fs in fs_list:
            row = {n: i for i, n in enumerate(fs.names)}
            out.append(torch.from_numpy(fs.feats[[row[n] for n in keep]]))
        return out

    tr_keep = [n for n in tr_names if n not in bad]
    va_keep = [n for n in va_names if n not in bad]
    xs = stack(tr_sets, tr_names)
    y_tr = torch.tensor([index[label[n]] for n in tr_keep], dtype=torch.long)
    return FeatureData(
        x_train=torch.cat(xs),
        y_train=y_tr.repeat(len(xs)),
        train_names=tr_keep,
        x_valid=stack(va_sets, va_names),
        y_valid=torch.tensor([index[label[n]] for n in va_keep], dtype=torch.long),
        valid_names=va_keep,
        failed=list(failed.values()),
        views=views,
    )
