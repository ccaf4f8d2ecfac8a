"""The frozen-feature cache: backbone features computed once per image and view, reused by every epoch.

Most of a frozen-backbone epoch is the backbone's forward pass, and it gives the same answer every
epoch. So features are computed once per (image, view) and stored on disk beside the dataset
(`<root>/.ursa/cache/<signature>/`), keyed by name, size and modification time: a re-run, a second
run with other head settings, the label-issue search and the duplicate search all read the cache.

Views: 0 is the evaluation transform, 1 its horizontal mirror (test-time augmentation), and 2.. are
seeded random augmentations of the training transform.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ursa._io import atomic_write_bytes, atomic_write_json
from ursa.data.items import Skipped
from ursa.data.transforms import eval_transform, input_size, open_image, train_transform
from ursa.models import Backbone

__all__ = ["FeatureCache", "FeatureSet", "extract", "cache_dir_for", "PLAIN", "MIRROR"]

PLAIN, MIRROR = 0, 1
Progress = Callable[[int, int], None]


def cache_dir_for(root: Path) -> Path:
    """`<root>/.ursa/cache`, or a per-root folder under ~/.cache/ursa when the dataset is read-only.

    URSA_CACHE_DIR overrides both.
    """
    env = os.environ.get("URSA_CACHE_DIR")
    if env:
        return Path(env) / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    local = root / ".ursa" / "cache"
    try:
        local.mkdir(parents=True, exist_ok=True)
        probe = local / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        return local
    except OSError:
        home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ursa"
        return home / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]


class _Images(Dataset):
    """Decodes and transforms one view of each path; a failed decode yields ok=False, never an exception."""

    def __init__(self, paths: Sequence[Path], tf: Callable[[Any], torch.Tensor], size: int, seeds: Sequence[int] | None):
        self.paths, self.tf, self.size, self.seeds = list(paths), tf, size, seeds

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        try:
            im = open_image(self.paths[i], min_side=self.size)
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


def _signature(backbone: Backbone, *, flip: bool, seed: int, jitter: float, scale: tuple[float, float]) -> str:
    spec = {
        "timm": backbone.timm_name,
        "weights": backbone.weights,
        "cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()},
        "flip": flip,
        "seed": seed,
        "jitter": jitter,
        "scale": list(scale),
        "v": 1,
    }
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCache:
    """Per-view feature files for one backbone + transform signature, under `cache_root/<signature>/`."""

    def __init__(self, cache_root: Path, backbone: Backbone, *, flip: bool = True, seed: int = 42, jitter: float = 0.2, scale: tuple[float, float] = (0.35, 1.0)):
        self.backbone, self.flip, self.seed, self.jitter, self.scale = backbone, flip, seed, jitter, scale
        self.dir = Path(cache_root) / _signature(backbone, flip=flip, seed=seed, jitter=jitter, scale=scale)

    def _paths(self, view: int) -> tuple[Path, Path]:
        return self.dir / f"view{view}.json", self.dir / f"view{view}.npy"

    def _load(self, view: int) -> tuple[dict[str, int], list[str], np.ndarray | None]:
        meta, arr = self._paths(view)
        if not (meta.is_file() and arr.is_file()):
            return {}, [], None
        try:
            keys = json.loads(meta.read_text())["keys"]
            feats = np.load(arr)
        except (ValueError, OSError, KeyError):
            return {}, [], None  # a damaged cache is rebuilt, not trusted
        if len(keys) != len(feats):
            return {}, [], None
        return {k: i for i, k in enumerate(keys)}, keys, feats

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
        """Features of `names` (relative to `root`) for `view`, computing and storing only what is missing."""
        index, keys, feats = self._load(view)
        want = [self._key(root, n) for n in names]
        missing = [i for i, k in enumerate(want) if k not in index]
        failed: list[Skipped] = []
        if missing:
            new = extract(
                self.backbone,
                [root / names[i] for i in missing],
                view=view,
                seeds=[_view_seed(self.seed, view, names[i]) for i in missing],
                flip=self.flip,
                jitter=self.jitter,
                scale=self.scale,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
            )
            ok = [j for j, reason in enumerate(new.failed_reasons) if reason is None]
            failed = [Skipped(names[missing[j]], r) for j, r in enumerate(new.failed_reasons) if r is not None]
            add_keys = [want[missing[j]] for j in ok]
            # kept as float16, as stored, so a fresh run and a cached re-run see identical features
            add = new.feats[ok].astype(np.float16)
            keys = keys + add_keys
            feats = add if feats is None else np.concatenate([feats.astype(np.float16), add])
            index = {k: i for i, k in enumerate(keys)}
            self._store(view, keys, feats)
        elif progress is not None:
            progress(len(names), len(names))
        bad = {s.name for s in failed}
        ok_names = [n for n in names if n not in bad]
        rows = [index[self._key(root, n)] for n in ok_names]
        out = feats[rows].astype(np.float32) if feats is not None and rows else np.zeros((0, self.backbone.num_features), np.float32)
        return FeatureSet(ok_names, out, failed)

    def _store(self, view: int, keys: list[str], feats: np.ndarray) -> None:
        meta, arr = self._paths(view)
        import io

        buf = io.BytesIO()
        np.save(buf, feats.astype(np.float16))
        atomic_write_bytes(arr, buf.getvalue())
        atomic_write_json(meta, {"keys": keys})


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
    flip: bool = True,
    jitter: float = 0.2,
    scale: tuple[float, float] = (0.35, 1.0),
    batch_size: int = 32,
    num_workers: int = 0,
    progress: Progress | None = None,
) -> _Extracted:
    """Run the frozen backbone over one view of `paths`: float32 features (n, num_features).

    The model runs in channels-last layout under `inference_mode` (about 1.5x faster on CPU here).
    """
    size = input_size(backbone.data_config)
    if view in (PLAIN, MIRROR):
        tf, view_seeds = eval_transform(backbone.data_config), None
    else:
        tf, view_seeds = train_transform(backbone.data_config, flip=flip, jitter=jitter, scale=scale), list(seeds or [])
    ds = _Images(paths, tf, size, view_seeds)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, persistent_workers=False)
    model = backbone.model.eval().to(memory_format=torch.channels_last)
    out = np.zeros((len(ds), backbone.num_features), np.float32)
    reasons: list[str | None] = []
    done = 0
    with torch.inference_mode():
        for x, ok, why in dl:
            if view == MIRROR:
                x = torch.flip(x, dims=[-1])
            f = model(x.contiguous(memory_format=torch.channels_last))
            out[done : done + len(x)] = f.float().numpy()
            reasons.extend(None if o else str(w) for o, w in zip(ok.tolist(), why))
            done += len(x)
            if progress is not None:
                progress(done, len(ds))
    return _Extracted(out, reasons)
