"""The model the inference benchmarks measure: `--model` (an export folder) or an export of `--run`.

Shared by predict_latency.py and serve_load.py (run as scripts, so this folder is on sys.path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "monkey10"


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", type=Path, help="export folder (default: export --run to a temporary folder)")
    ap.add_argument("--run", type=Path, default=Path("/tmp/m10run"), help="training run to export when --model is not given")


def model_folder(args: argparse.Namespace, tmp: Path, *, int8: bool = False) -> Path | None:
    """args.model, or a fresh export of args.run under `tmp` (with the int8 model when `int8`); None (after
    saying how to make one) when neither exists."""
    if args.model is not None:
        return Path(args.model)
    if not (args.run / "config.json").is_file():
        print(f"no --model and no run at {args.run}; train one first: ursa train {DATA} --train training --valid validation --out {args.run}", file=sys.stderr)
        return None
    from ursa.export import export_run

    return export_run(args.run, tmp / "model", int8=int8).out
