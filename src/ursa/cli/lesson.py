"""`ursa lesson ...`: runnable lessons on what happens inside training, each printing its numbers and writing a picture.

The lessons (`ursa.lessons`) import nothing from the rest of ursa: this module gives them their data
(`ursa.data.arrays`) and writes their pictures atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ursa.cli._common import console
from ursa.config import check_number

__all__ = ["lesson_app"]

lesson_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Runnable lessons on what happens inside: SGD from scratch, mini-batches, learning rate, epochs, "
    "under- and overfitting, predict. Each prints its numbers and writes a picture.",
)

LessonDataArg = Annotated[
    Optional[Path],
    typer.Argument(help="Dataset folder (one sub-folder of images per class); omitted: the embedded digits.", show_default=False),
]


def _lesson_seed(seed: int) -> int:
    """--seed of the lessons, checked as DataConfig checks a seed (the lessons import nothing from ursa)."""
    from ursa.config import MAX_SEED
    from ursa.errors import LessonError

    check_number(seed, "--seed", LessonError, integer=True, at_least=0, at_most=MAX_SEED)
    return seed


LessonSeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the data, the split and the training.", callback=_lesson_seed)]
LessonSizeOpt = Annotated[int, typer.Option("--size", help="With DATA: images are read as size x size grayscale pixels.")]


def _lesson_out(out: Path, suffixes: tuple[str, ...]) -> Path:
    """Check that `out` is a file name we can write, with one of `suffixes`; create its folder if missing."""
    from ursa.errors import LessonError

    if out.suffix.lower() not in suffixes:
        raise LessonError(f"--out {out} should end in {' or '.join(suffixes)}. Pass a file name such as lesson{suffixes[0]}.")
    if out.is_dir():
        raise LessonError(f"--out {out} is a folder. Pass a file name such as {out / ('lesson' + suffixes[0])}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LessonError(f"cannot create the folder for --out {out} ({exc.strerror}). Choose another --out.") from None
    if not os.access(out.parent, os.W_OK):
        raise LessonError(f"cannot write to {out.parent}. Choose another --out in a folder you can write to.")
    return out


def _run_lesson(lesson, *args, outs: dict[str, Path], **options):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Call `lesson` writing each of `outs` (keyword -> final path) to a temporary name, then rename.

    An interrupted lesson leaves no half-written picture, and the lessons' ValueErrors (bad numbers,
    bad arrays) become LessonErrors with the same message.
    """
    from ursa.errors import LessonError

    # The temporary name keeps the suffix, because matplotlib picks the file format from it.
    staged = {k: p.with_name(f".{p.stem}.{os.getpid()}.tmp{p.suffix}") for k, p in outs.items()}
    try:
        result = lesson(*args, **options, **staged)
        for key, tmp in staged.items():
            os.replace(tmp, outs[key])
    except ValueError as exc:
        raise LessonError(str(exc)) from exc
    except OSError as exc:
        raise LessonError(f"could not write {', '.join(map(str, outs.values()))} ({exc}). Choose another --out.") from exc
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return result


def _print_lesson(result, title: str, written: list[Path]) -> None:  # noqa: ANN001
    """The lesson's table, the one line to notice, and the files written."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, col in enumerate(result.columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in result.rows():
        table.add_row(*row)
    console.print(table)
    console.print(f"[bold]notice:[/] {result.notice}", highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)


def _lesson_arrays(data: Path | None, *, seed: int, size: int):  # noqa: ANN202
    """`ursa.data.arrays.image_arrays` for the classification lessons, its errors as LessonErrors."""
    from ursa.data.arrays import image_arrays
    from ursa.errors import DataError, LessonError

    if size < 2:
        raise LessonError(f"--size must be at least 2 pixels, got {size}. Try 16.")
    try:
        return image_arrays(data, seed=seed, size=size)
    except DataError as exc:
        raise LessonError(str(exc)) from exc


@lesson_app.command("sgd")
def lesson_sgd(
    out: Annotated[Path, typer.Option("--out", help="Animation file (.gif).")] = Path("sgd.gif"),
    html: Annotated[bool, typer.Option("--html/--no-html", help="Also write the animation as HTML (same name, .html) for notebooks.")] = True,
    n: Annotated[int, typer.Option("--n", help="Number of noisy points.")] = 100,
    noise: Annotated[float, typer.Option("--noise", help="Standard deviation of the noise added to y.")] = 0.5,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs", help="Gradient-descent steps (each on all points).")] = 100,
    seed: LessonSeedOpt = 42,
) -> None:
    """Fit y = x@a to noisy points by gradient descent, written out by hand; animate the line and the loss."""
    from ursa.errors import LessonError
    from ursa.lessons.sgd import make_line, sgd_lesson

    check_number(noise, "--noise", LessonError, at_least=0.0)  # the lesson checks the rest
    outs = {"out": _lesson_out(out, (".gif",))}
    if html:
        outs["html"] = out.with_suffix(".html")
    try:
        x, y, a_true = make_line(n, noise=noise, seed=seed)
    except ValueError as exc:
        raise LessonError(str(exc)) from exc
    result = _run_lesson(sgd_lesson, x, y, a_true=a_true.tolist(), lr=lr, epochs=epochs, outs=outs)
    _print_lesson(result, f"gradient descent on y = x@a, {n} points", list(outs.values()))


@lesson_app.command("minibatch")
def lesson_minibatch(
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("minibatch.png"),
    n: Annotated[int, typer.Option("--n", help="Number of examples.")] = 100_000,
    features: Annotated[int, typer.Option("--features", help="Number of features per example.")] = 50,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per mini-batch.")] = 64,
    steps: Annotated[int, typer.Option("--steps", help="Updates per method.")] = 200,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (both methods).")] = 0.05,
    seed: LessonSeedOpt = 42,
) -> None:
    """Full-batch gradient descent vs mini-batch SGD: loss against steps and against seconds."""
    from ursa.errors import LessonError
    from ursa.lessons.minibatch import make_regression, minibatch_lesson

    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    try:
        x, y = make_regression(n, d=features, seed=seed)
    except ValueError as exc:
        raise LessonError(str(exc)) from exc
    result = _run_lesson(minibatch_lesson, x, y, batch_size=batch_size, lr=lr, steps=steps, seed=seed, outs=outs)
    _print_lesson(result, f"full batch vs mini-batch, linear regression on {n:,} examples x {features} features", [out])


@lesson_app.command("lr")
def lesson_lr(
    data: LessonDataArg = None,
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("lr.png"),
    high: Annotated[float, typer.Option("--high", help="The too-high learning rate.")] = 3.0,
    good: Annotated[float, typer.Option("--good", help="A good learning rate.")] = 0.3,
    low: Annotated[float, typer.Option("--low", help="The too-low learning rate.")] = 0.003,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs per run.")] = 10,
    size: LessonSizeOpt = 16,
    seed: LessonSeedOpt = 42,
) -> None:
    """Train the same small network three times, with a too-high, a good and a too-low learning rate."""
    from ursa.lessons.lr import lr_lesson

    xt, yt, xv, yv, _, _, desc = _lesson_arrays(data, seed=seed, size=size)
    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    result = _run_lesson(lr_lesson, xt, yt, xv, yv, lrs=(high, good, low), epochs=epochs, seed=seed, outs=outs)
    _print_lesson(result, f"learning rates on {desc}: {len(xt)} train / {len(xv)} valid images", [out])


@lesson_app.command("epochs")
def lesson_epochs(
    data: LessonDataArg = None,
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("epochs.png"),
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs to train.")] = 100,
    n_train: Annotated[int, typer.Option("--n-train", help="Training images used (few, so overfitting shows).")] = 300,
    noise: Annotated[float, typer.Option("--noise", help="Share of training labels swapped for a wrong class, in [0, 1).")] = 0.3,
    hidden: Annotated[int, typer.Option("--hidden", help="Units in each of the two hidden layers.")] = 256,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (SGD with momentum 0.9).")] = 0.02,
    size: LessonSizeOpt = 16,
    seed: LessonSeedOpt = 42,
) -> None:
    """Train for many epochs on few, noisy labels: watch validation loss turn up while training loss falls."""
    from ursa.lessons.epochs import epochs_lesson

    xt, yt, xv, yv, _, _, desc = _lesson_arrays(data, seed=seed, size=size)
    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    result = _run_lesson(
        epochs_lesson, xt, yt, xv, yv, epochs=epochs, n_train=n_train, noise=noise, hidden=hidden, lr=lr, seed=seed, outs=outs
    )
    _print_lesson(result, f"epochs on {desc}: {result.n_train} train images ({result.flipped} mislabelled), {len(xv)} valid", [out])


@lesson_app.command("fit")
def lesson_fit(
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("fit.png"),
    n_train: Annotated[int, typer.Option("--n-train", help="Training points.")] = 18,
    n_valid: Annotated[int, typer.Option("--n-valid", help="Validation points.")] = 40,
    noise: Annotated[float, typer.Option("--noise", help="Standard deviation of the noise on y.")] = 0.25,
    degrees: Annotated[tuple[int, int, int], typer.Option("--degrees", help="Polynomial degrees: underfit, good, overfit.")] = (1, 4, 15),
    seed: LessonSeedOpt = 42,
) -> None:
    """Under-, well- and over-fitted curves on the same noisy points, with training and validation points."""
    from ursa.errors import LessonError
    from ursa.lessons.fit import fit_lesson, make_curve

    check_number(noise, "--noise", LessonError, at_least=0.0)  # the lesson checks the rest
    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    try:
        arrays = make_curve(n_train, n_valid, noise=noise, seed=seed)
    except ValueError as exc:
        raise LessonError(str(exc)) from exc
    result = _run_lesson(fit_lesson, *arrays, degrees=degrees, outs=outs)
    _print_lesson(result, f"polynomials fitted to {n_train} noisy points of sin(pi x), scored on {n_valid} more", [out])


@lesson_app.command("predict")
def lesson_predict(
    data: LessonDataArg = None,
    out: Annotated[Path, typer.Option("--out", help="Picture (.png, .svg or .pdf).")] = Path("predict.png"),
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of training for the linear classifier.")] = 2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Validation batch predicted by hand.")] = 64,
    show: Annotated[int, typer.Option("--show", help="Images of the batch drawn and listed.")] = 6,
    size: LessonSizeOpt = 16,
    seed: LessonSeedOpt = 42,
) -> None:
    """Probabilities, argmax and error rate by hand on one validation batch, checked against the library metric."""
    import math

    from rich.table import Table

    from ursa.errors import LessonError
    from ursa.lessons.predict import predict_lesson
    from ursa.train.metrics import error_rate

    xt, yt, xv, yv, classes, shape, desc = _lesson_arrays(data, seed=seed, size=size)
    outs = {"out": _lesson_out(out, (".png", ".svg", ".pdf"))}
    result = _run_lesson(
        predict_lesson, xt, yt, xv, yv, classes=classes, image_shape=shape, epochs=epochs, batch_size=batch_size,
        show=show, seed=seed, outs=outs,
    )  # fmt: skip
    _print_lesson(result, f"predict on {desc}: one validation batch of {len(result.targets)}", [out])
    library = error_rate(result.probs, result.targets)
    check = Table(title="error rate on the batch", title_justify="left")
    for col in ("by hand: (preds != targets).mean()", "ursa.train.metrics.error_rate", "equal"):
        check.add_column(col, justify="right")
    # Equal up to float rounding: the metric computes 1 - accuracy, the lesson counts the mistakes.
    same = math.isclose(result.error_rate, library, abs_tol=1e-6)
    check.add_row(f"{result.error_rate:.4f}", f"{library:.4f}", "yes" if same else "[bold red]NO[/]")
    console.print(check)
    if not same:
        raise LessonError("the hand-computed error rate differs from the library's; please report this as a bug.")
