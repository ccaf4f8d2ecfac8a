"""The `ursa` command: one sub-command per stage, plus `demo`.

Each command fills a config dataclass and calls one library function; heavy imports happen inside the
command so `ursa --help` is instant. Any `UrsaError` becomes its message and exit code 2.

The commands live in one module per stage (data, train, collect, verify, export, predict, serve,
interpret, review, studio, lesson); this module makes the app, registers them in the order `--help` lists
them, and runs it.
"""

from __future__ import annotations

import sys

import typer

from ursa.cli import collect, data, export, interpret, lesson, predict, review, serve, studio, suggest, train, verify
from ursa.cli._common import ARGV, err_console
from ursa.errors import UrsaError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Make your own image classifier on a CPU: collect, verify, train, interpret, clean, export, serve.",
)

app.command("info")(data.info)
app.command("show-batch")(data.show_batch)
app.command("lr-find")(train.lr_find)
app.command("train")(train.train_cmd)
app.command("demo")(train.demo)
app.command("download")(collect.download_cmd)
app.command("search")(collect.search_cmd)
app.command("verify")(verify.verify_cmd)
app.command("export")(export.export_cmd)
app.command("predict")(predict.predict_cmd)
app.command("serve")(serve.serve_cmd)
app.command("interpret")(interpret.interpret_cmd)
app.command("issues")(interpret.issues_cmd)
app.command("next")(suggest.next_cmd)
app.command("review")(review.review_cmd)
app.command("studio")(studio.studio_cmd)
app.add_typer(lesson.lesson_app, name="lesson")

# Commands that run PyTorch over batches, where the allocator tuning pays. Not serve or review: a server must
# give the memory of large uploads back to the system, which the tuning (no mmap, 1 GiB trim threshold) prevents.
_TUNED_COMMANDS = frozenset({"train", "lr-find", "show-batch", "demo", "issues", "interpret", "lesson", "next"})


def _command(argv: list[str]) -> str | None:
    """The sub-command named in `argv` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; `argv` (without the program name) is for tests."""
    args = list(sys.argv[1:] if argv is None else argv)
    if _command(args) in _TUNED_COMMANDS:
        from ursa.train.runtime import tune_allocator

        tune_allocator()
    ARGV[:] = args  # what `train --nproc N` passes on to torchrun
    try:
        app(args=argv, prog_name="ursa")
    except UrsaError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(exc.exit_code) from None
