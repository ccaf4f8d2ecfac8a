"""A `review --apply` killed half-way (SIGKILL, a real process) is finished by the next apply, and undo still
restores the dataset byte for byte, whether the apply was finished or not."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ursa.errors import ReviewError
from ursa.review import Review, dataset_labels

DELETES = ["circle/copy.png", "square/002.png", "square/003.png", "triangle/000.png"]
RELABEL = ("square/001.png", "circle")

# Test-only driver: runs a real `Review.apply()` in its own process and SIGKILLs that process right after
# the N-th rename of a file into quarantine ("moves") or of the staged cleaned.csv into place ("csv"), the
# moment a crash or a kill -9 would leave the dataset half-changed. Only this child process is affected.
_DRIVER = """
import os, signal, sys
from pathlib import Path
from ursa.review import Review

root, target, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real_replace, seen = os.replace, [0]

def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    rel = Path(dst).relative_to(root).as_posix() if Path(dst).is_relative_to(root) else ""
    if (target == "moves" and rel.startswith(".ursa/quarantine/")) or (target == "csv" and rel == "cleaned.csv"):
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
Review(root).apply()
print("finished without being killed")
"""


def _kill_apply(tmp_path: Path, root: Path, *, target: str = "moves", after: int = 2) -> None:
    driver = tmp_path / "kill_apply.py"
    driver.write_text(_DRIVER)
    proc = subprocess.run([sys.executable, str(driver), str(root), target, str(after)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def _decide(root: Path) -> dict[str, str]:
    """Four deletions and a relabel; returns the cleaned.csv an uninterrupted apply writes."""
    rv = Review(root)
    expected = dataset_labels(root)
    for name in DELETES:
        rv.decide(name, "delete")
        del expected[name]
    rv.decide(RELABEL[0], "relabel", label=RELABEL[1])
    expected[RELABEL[0]] = RELABEL[1]
    return expected


def _csv(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {r["name"]: r["label"] for r in csv.DictReader(fh)}


def _ops(root: Path) -> list[str]:
    return [json.loads(x)["op"] for x in (root / ".ursa/journal.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("users_csv", [False, True])
def test_apply_killed_after_two_of_four_moves_is_finished_by_the_next_apply(tmp_path: Path, review_case, tree_digest, run_cli, users_csv: bool) -> None:  # noqa: ANN001
    """Regression: killed after 2 of 4 moves (cleaned.csv untouched), a second `--apply` said "nothing to
    apply" and the dataset stayed half-changed. Now it makes the two remaining moves and writes cleaned.csv."""
    root, _ = review_case
    if users_csv:
        (root / "cleaned.csv").write_text("name,label\n" + "".join(f"{n},{lab}\n" for n, lab in dataset_labels(root).items()))
    before = tree_digest(root)
    expected = _decide(root)
    _kill_apply(tmp_path, root, after=2)
    moved = [n for n in DELETES if not (root / n).exists()]
    assert len(moved) == 2 and all((root / ".ursa/quarantine" / n).is_file() for n in moved)
    assert tree_digest(root).get("cleaned.csv") == before.get("cleaned.csv")  # untouched (or still absent)
    assert Review(root).state().unfinished is not None

    code, out, err = run_cli("review", root, "--apply")
    assert code == 0, err
    assert "finished the interrupted apply" in out
    assert not any((root / n).exists() for n in DELETES)
    quarantined = tree_digest(root / ".ursa/quarantine")
    assert all(quarantined[n] == before[n] for n in DELETES)
    assert _csv(root / "cleaned.csv") == expected
    assert _ops(root)[-2:] == ["apply", "applied"] and Review(root).state().unfinished is None
    code, _, err = run_cli("review", root, "--apply")
    assert code == 2 and "nothing to apply" in err  # finished once, not twice

    code, _, err = run_cli("review", root, "--undo")
    assert code == 0, err
    assert tree_digest(root) == before
    assert len(Review(root).state().decisions()) == len(DELETES) + 1  # pending again


def test_killed_after_the_moves_and_again_while_finishing(tmp_path: Path, review_case, tree_digest) -> None:  # noqa: ANN001
    """Killed with every move made but cleaned.csv not yet in place; then the finishing apply is killed right
    after it puts cleaned.csv in place (before its "applied" line). The third apply only records it."""
    root, _ = review_case
    before = tree_digest(root)
    expected = _decide(root)
    _kill_apply(tmp_path, root, after=len(DELETES))
    assert not any((root / n).exists() for n in DELETES) and not (root / "cleaned.csv").exists()
    _kill_apply(tmp_path, root, target="csv", after=1)
    assert _csv(root / "cleaned.csv") == expected and Review(root).state().unfinished is not None
    line = Review(root).apply()
    assert line["resumed"] and line["counts"] == {"keep": 0, "relabel": 1, "delete": 4}
    assert _csv(root / "cleaned.csv") == expected and Review(root).state().unfinished is None
    Review(root).undo_apply()
    assert tree_digest(root) == before


def test_undo_of_a_killed_apply_restores_everything(tmp_path: Path, review_case, tree_digest) -> None:  # noqa: ANN001
    root, _ = review_case
    (root / "cleaned.csv").write_text("name,label\n" + "".join(f"{n},{lab}\n" for n, lab in dataset_labels(root).items()))
    before = tree_digest(root)
    expected = _decide(root)
    _kill_apply(tmp_path, root, after=2)
    rv = Review(root)
    line = rv.undo_apply()
    assert [m["name"] for m in line["moves"]] == DELETES
    assert tree_digest(root) == before and rv.state().unfinished is None
    assert rv.apply()["counts"]["delete"] == 4  # the decisions are pending again, and apply in full
    assert _csv(root / "cleaned.csv") == expected


def test_new_decisions_after_a_killed_apply_are_applied_after_finishing_it(tmp_path: Path, review_case, tree_digest) -> None:  # noqa: ANN001
    root, _ = review_case
    before = tree_digest(root)
    expected = _decide(root)
    _kill_apply(tmp_path, root, after=2)
    rv = Review(root)
    rv.decide("triangle/001.png", "relabel", label="square")
    line = rv.apply()
    assert line["finished"] and line["counts"] == {"keep": 0, "relabel": 1, "delete": 0}
    assert _csv(root / "cleaned.csv") == {**expected, "triangle/001.png": "square"}
    assert _ops(root)[-4:] == ["decide", "applied", "apply", "applied"]
    rv.undo_apply()
    rv.undo_apply()
    assert tree_digest(root) == before


def test_a_file_changed_after_the_kill_is_not_moved_unseen(tmp_path: Path, review_case, tree_digest) -> None:  # noqa: ANN001
    root, _ = review_case
    before = tree_digest(root)
    _decide(root)
    _kill_apply(tmp_path, root, after=2)
    waiting = next(n for n in DELETES if (root / n).exists())
    (root / waiting).write_bytes(b"edited since")
    crashed = tree_digest(root)
    rv = Review(root)
    with pytest.raises(ReviewError, match="changed after the apply .* was planned.*--undo"):
        rv.apply()
    assert tree_digest(root) == crashed and rv.state().unfinished is not None  # nothing changed
    rv.undo_apply()  # undo brings back what was moved and leaves the edited file as it is
    assert tree_digest(root) == {**before, waiting: tree_digest(root)[waiting]} and (root / waiting).read_bytes() == b"edited since"


def test_apply_lines_from_before_the_applied_line_count_as_done(tmp_path: Path, review_case, tree_digest) -> None:  # noqa: ANN001
    """A journal written before applies were recorded in two steps has no "applied" lines: its applies are
    done (nothing is redone), and undo still restores them."""
    root, _ = review_case
    before = tree_digest(root)
    _decide(root)
    rv = Review(root)
    rv.apply()
    old = []
    for ln in rv.lines():
        if ln["op"] == "applied":
            continue
        if ln["op"] == "apply":
            del ln["csv"]["staged"]
        old.append(json.dumps(ln))
    rv.journal.write_text("\n".join(old) + "\n")
    assert rv.state().unfinished is None and len(rv.state().applies) == 1
    with pytest.raises(ReviewError, match="nothing to apply"):
        rv.apply()
    rv.undo_apply()
    assert tree_digest(root) == before
