"""The lesson in a notebook: fastai's names over Ursa's stages.

`download_images`, `verify_images`, `vision_learner` (`cnn_learner`), `learn.export` and `load_learner` are
the lines the lesson types; each is a thin front on the stage that does the work, so a notebook and the
CLI write the same files: `download_images` is `ursa download` (manifest, resume, dedup), `verify_images`
is `ursa verify` ("delete" moves to the quarantine and writes the journal; nothing is unlinked),
`learn.export` is `ursa export` (the same checked folder, from the Learner in memory), and `load_learner`
is `ursa.export.load_model`.

This module sits above training and export: a Learner's `export` needs the export stage, which the
training package may not import, so the notebook's Learner is `NotebookLearner`, training's Learner plus
`export`, built by training's own `vision_learner`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

from ursa.collect.download import DownloadReport, download, jobs_from_list, split_dest
from ursa.collect.urls import UrlList, is_http_url, parse_url_text, read_url_list
from ursa.config import CollectConfig, VerifyConfig, check_number
from ursa.errors import CollectError, VerifyError
from ursa.export.predictor import Predictor, load_model
from ursa.export.run import ExportResult, export_learner
from ursa.imageio import NON_IMAGE_SUFFIXES
from ursa.train import learner as _train
from ursa.verify import VerifyReport, quarantine_dir, verify_folder

__all__ = ["BadImages", "NotebookLearner", "cnn_learner", "download_images", "load_learner", "verify_images", "vision_learner"]


@contextlib.contextmanager
def _bar(label: str, enabled: bool) -> Iterator[Callable[..., None]]:
    """A Rich progress bar (a live widget in Jupyter, a line in a terminal); yields update(done, total, info="")."""
    if not enabled:
        yield lambda done, total, info="": None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn()) as bar:
        task = bar.add_task(label, total=None, info="")
        yield lambda done, total, info="": bar.update(task, completed=done, total=total, info=info)


# ---------------------------------------------------------------------------------------------------
# collect and verify
# ---------------------------------------------------------------------------------------------------


def _url_list(urls: str | os.PathLike[str] | Iterable[str]) -> UrlList:
    """A URL-list file (read as `ursa download` reads it), one URL, or an iterable of URL strings."""
    if isinstance(urls, os.PathLike) or (isinstance(urls, str) and not is_http_url(urls.strip())):
        return read_url_list(urls)
    items = [urls] if isinstance(urls, str) else list(urls) if isinstance(urls, Iterable) else None
    if items is None or not all(isinstance(u, str) for u in items):
        what = type(urls).__name__ if items is None else type(next(u for u in items if not isinstance(u, str))).__name__
        raise CollectError(f"download_images takes a URL-list file (.txt with one URL per line, or .csv with a 'url' column) or a list of URL strings, not {what}.")
    found = parse_url_text("\n".join(items), source="the list of URLs")
    if not found.urls:
        raise CollectError(f"the list of URLs holds no http(s) URL ({len(found.not_urls)} other entries, {found.blank} blank). Pass image addresses such as 'https://example.com/bear.jpg'.")
    return found


def download_images(
    urls: str | os.PathLike[str] | Iterable[str],
    dest: str | os.PathLike[str],
    max_pics: int | None = 1000,
    max_workers: int = 8,
    timeout: float = CollectConfig.timeout,
    *,
    progress: bool = True,
) -> DownloadReport:
    """Download the images of `urls` into the class folder `dest` (data/bears/black), as `ursa download` does.

    `urls` is a URL-list file (.txt, one URL per line; .csv with a url column) or a list of URL strings.
    `max_pics`: most good images the class folder keeps, counting earlier runs (None: every URL);
    `max_workers`: downloads in flight at once; `timeout`: seconds to connect and between two reads.
    Every URL gets a row in `<root>/.ursa/manifest.csv`; running the line again resumes (URLs already
    settled are not fetched again) and identical images are stored once. Returns the DownloadReport
    (counts per class, failure reasons); `progress` shows a bar and a summary line.
    """
    check_number(max_pics, "max_pics", CollectError, integer=True, at_least=1, optional=True, hint="Give the most images to keep, e.g. 200, or None for every URL.")
    check_number(max_workers, "max_workers", CollectError, integer=True, at_least=1, hint="Try 8.")
    check_number(timeout, "timeout", CollectError, above=0.0, unit="seconds", hint="Try 10.")
    root, cls = split_dest(dest)
    url_list = _url_list(urls)
    config = CollectConfig(max_images=max_pics, concurrency=max_workers, per_host=min(CollectConfig.per_host, max_workers), timeout=float(timeout))
    with _bar("download", progress) as update:
        report = download(jobs_from_list(url_list, cls), root, config=config,
                          on_progress=lambda p: update(p.done, p.total, f"ok {p.ok} failed {p.failed} duplicate {p.duplicate}"))  # fmt: skip
    if progress:
        c = report.per_class.get(cls, {})
        why = f" ({', '.join(f'{k} {n}' for k, n in report.reasons.most_common())})" if report.reasons else ""
        print(f"{cls}: {c.get('ok', 0)} new, {c.get('duplicate', 0)} duplicate, {c.get('failed', 0)} failed{why}, {c.get('skipped', 0)} done before; manifest {report.manifest}")
    return report


class BadImages(list):  # type: ignore[type-arg]  # list[Path]
    """The files `verify_images` found unreadable, as they were named before any move: a list of Paths, like
    the failures fastai's verify_images returns. `report` is the whole VerifyReport (repairs, shrinks,
    duplicates, skipped links); `moved` says whether the files went to the quarantine (delete=True) or were
    left in place (delete=False)."""

    def __init__(self, files: Iterable[Path], report: VerifyReport, *, moved: bool):
        super().__init__(files)
        self.report, self.moved = report, moved


def _dataset_of(path: Path) -> tuple[Path, str | None]:
    """(dataset root, class folder or None) for `path`: a folder holding images and no sub-folders is a class
    folder of the dataset above it (as `download_images`' dest is), unless it has its own `.ursa`."""
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise VerifyError(f"{str(path)!r} {what}. Give a class folder (data/bears/black) or the dataset folder (data/bears).")
    if (path / ".ursa").is_dir():
        return path, None
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    has_images = any(e.is_file() and e.suffix.lower() not in NON_IMAGE_SUFFIXES for e in entries)
    has_folders = any(e.is_dir() and not e.is_symlink() for e in entries)
    full = path.absolute()
    if has_images and not has_folders and full.parent != full:
        return (path.parent, path.name) if path.name not in ("", "..") else (full.parent, full.name)
    return path, None


def verify_images(path: str | os.PathLike[str], delete: bool = True, max_size: int | None = None, *, progress: bool = True) -> BadImages:
    """Decode every image under `path` (a class folder, or the dataset folder) fully, as `ursa verify` does.

    `delete=True` (the lesson's "delete"): unreadable files are moved to `<root>/.ursa/quarantine/` and each
    move is a journal line, so it can be undone (nothing is unlinked); images are repaired (orientation,
    colour mode, truncation; originals kept) and shrunk to `max_size` px on the longest side when given.
    `delete=False` only reports: nothing is moved or changed. A class folder is checked with its dataset's
    quarantine, journal and manifest (the folder above it). Returns the unreadable files (`BadImages`, a
    list of Paths, empty when all is well); `.report` has the rest.
    """
    root, sub = _dataset_of(Path(path))
    config = VerifyConfig(max_size=max_size, repair=bool(delete))
    with _bar("verify", progress) as update:
        report = verify_folder(root, config=config, subfolder=sub, report_only=not delete, on_progress=lambda done, total: update(done, total))
    bad = BadImages((root / r.file for r in report.results if r.status in ("quarantined", "unreadable")), report, moved=bool(delete))
    if progress:
        where = f"{root / sub}" if sub else f"{root}"
        if delete:
            gone = f"{len(bad)} unreadable moved to {quarantine_dir(root)} (undo from the journal {report.journal})"
        else:
            gone = f"{len(bad)} unreadable (left in place: delete=False only reports)"
        fixes = "repaired" if delete else "need a repair"
        need = report.count("repaired") if delete else sum(bool(r.changes) for r in report.results if r.status == "ok")
        print(f"{where}: {len(report.results)} files, {gone}, {need} {fixes}, {report.count('skipped')} skipped, {len(report.duplicates)} groups of duplicates")
    return bad


# ---------------------------------------------------------------------------------------------------
# learner, export, load
# ---------------------------------------------------------------------------------------------------


class NotebookLearner(_train.Learner):
    """Training's Learner (`ursa.train.learner.Learner`: fit_one_cycle, lr_find, unfreeze, save, ...) plus
    `export`, which writes the folder `ursa export` writes from this Learner and its DataBunch."""

    def export(self, dest: str | os.PathLike[str], *, int8: bool = False, open_set_quantile: float = 0.05, opset: int = 17, verbose: bool = True) -> ExportResult:
        """Write the export folder `dest` (model.safetensors, model.json, model.onnx; no pickle), checked on
        the validation images as `ursa export` checks it; `load_learner(dest)` reads it back.

        `dest` must not exist or be empty (an export never overwrites), and is written under a temporary
        name and renamed, so a failed export leaves nothing. The options are `ursa export`'s; `verbose`
        prints each step.
        """
        return export_learner(self, dest, int8=int8, open_set_quantile=open_set_quantile, opset=opset, on_step=print if verbose else None)

    def next_batch(self, pool: str | os.PathLike[str], n: int = 30, *, uncertainty: str = "margin", seed: int | None = None) -> list[dict[str, str]]:
        """The `n` images of the folder `pool` whose labels would help this model most, best first: rows
        {name (the file's path), guess, confidence, reason}, as `ursa next RUN --pool DIR` writes them to
        next.csv (see `ursa.interpret.suggest`). The pool's features are computed once (progress bar) and
        cached beside the dataset's; nothing is written into the pool."""
        from ursa.interpret.suggest import suggest_for_learner
        from ursa.train.callbacks import FeatureProgress

        bar = FeatureProgress(enabled=self.progress, console=self.console)
        try:
            return suggest_for_learner(self, pool, n=n, kind=uncertainty, seed=seed, progress=bar.update).rows
        finally:
            bar.close()


def vision_learner(dls: Any, arch: str = "efficientnet_lite0", **kwargs: Any) -> NotebookLearner:
    """A pretrained `arch` with a new head for `dls.classes`, frozen to start: training's `vision_learner`
    (see `ursa.train.learner.vision_learner` for the options) building a `NotebookLearner`."""
    return _train.vision_learner(dls, arch, cls=NotebookLearner, **kwargs)  # type: ignore[return-value]


cnn_learner = vision_learner  # the lesson's older name


def load_learner(dest: str | os.PathLike[str], **options: Any) -> Predictor:
    """The export folder `dest` (written by `learn.export` or `ursa export`), loaded for prediction:
    `pred_class, pred_idx, probs = load_learner(dest).predict(image)` for a path, bytes or a PIL image.

    The Predictor checks every file against the hashes in model.json; a folder that is not an export
    raises ExportError. `options` are `ursa.export.Predictor`'s (backend, precision, threads, ...).
    """
    return load_model(dest, **options)
