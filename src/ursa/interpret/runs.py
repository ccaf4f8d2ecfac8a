"""A training run folder read back (what `ursa train --out` wrote), for the stages that work on a run.

`read_run(run_dir)` gives its config.json, split.json and configs, with one InterpretError per way a folder
can fail to be a usable run (not a run, unfinished, its dataset moved), each saying what to do.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ursa.config import DataConfig, TrainConfig
from ursa.data.split import Split, load_split
from ursa.errors import InterpretError, UrsaError

__all__ = ["RunFolder", "read_run", "read_run_csv"]

WEIGHTS = Path("models") / "model.safetensors"


@dataclass(frozen=True)
class RunFolder:
    """A run folder read back: `config` is config.json as written; `data` and `train` its configs; `split`
    the seeded split (its `root` the dataset, checked to exist) or None when not asked for."""

    path: Path
    config: dict[str, Any]
    data: DataConfig
    train: TrainConfig
    split: Split | None

    @property
    def weights(self) -> Path:
        """models/model.safetensors of the run."""
        return self.path / WEIGHTS


def read_run(run_dir: str | Path, *, weights: bool = False, split: bool = True) -> RunFolder:
    """Read `run_dir`: config.json always; models/model.safetensors must exist when `weights`; split.json
    and the dataset it names when `split`. InterpretError naming the fix otherwise."""
    run = Path(run_dir)
    cfg_path = run / "config.json"
    if weights and not (cfg_path.is_file() and (run / WEIGHTS).is_file()):
        raise InterpretError(f"{run} is not a finished training run (needs config.json and {WEIGHTS.as_posix()}). Pass the folder `ursa train --out` wrote.")
    if not cfg_path.is_file():
        raise InterpretError(f"{run} is not a training run (no config.json). Pass a folder written by `ursa train DATA --out {run}`.")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    sp = None
    if split:
        try:
            sp = load_split(run / "split.json")
        except UrsaError as exc:
            raise InterpretError(str(exc)) from None
        if not sp.root.is_dir():
            raise InterpretError(f"the dataset of {run} ({sp.root}) is not there any more. Move it back, or train again on its new location.")
    return RunFolder(run, cfg, DataConfig(**cfg["data"]), TrainConfig.from_dict(cfg["train"]), sp)


def read_run_csv(run_dir: str | Path, name: str, *, command: str, columns: tuple[str, ...] | None = None) -> list[dict[str, str]]:
    """The rows of `run_dir/name` (a CSV a stage wrote into the run) as dicts of strings, in file order.
    InterpretError naming `command` (what writes it) when the file is missing, or lacks any of `columns`."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise InterpretError(f"{path} does not exist. Run `{command}` first.")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if columns and rows and any(c not in rows[0] for c in columns):
        raise InterpretError(f"{path} lacks the columns {', '.join(columns)}. Run `{command}` again.")
    return rows
