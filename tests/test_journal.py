"""The dataset journal shared by verify and review: one file, one line schema, seq numbers that never repeat
across threads and processes, torn and old lines, and the review's undo with verify's lines in between."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from ursa.errors import ReviewError, UrsaError, VerifyError
from ursa.journal import LEGACY_REVIEW_JOURNAL, Journal, journal_path
from ursa.review import Review
from ursa.verify import verify_folder


def _raw(root: Path) -> list[dict]:
    return [json.loads(x) for x in journal_path(root).read_text().splitlines()]


def test_verify_and_review_write_one_journal_with_one_schema(review_case, tree_digest) -> None:  # noqa: ANN001
    """Regression: verify kept its own journal with another schema, while review said it was the only code
    that changed a dataset. Now both append `{seq, at, op, ...}` lines to <root>/.ursa/journal.jsonl, and
    `review --undo` still restores the dataset byte for byte with verify's lines in between."""
    root, _ = review_case
    (root / "square" / "broken.png").write_bytes(b"not a picture")
    rv = Review(root)
    rv.decide("circle/copy.png", "delete")
    verify_folder(root)  # quarantines square/broken.png
    before = tree_digest(root)
    rv.decide("square/001.png", "relabel", label="circle")
    rv.apply()
    rv.undo_apply()
    assert tree_digest(root) == before
    lines = _raw(root)
    assert [ln["op"] for ln in lines] == ["decide", "quarantine", "decide", "apply", "applied", "unapply"]
    assert [ln["seq"] for ln in lines] == list(range(1, len(lines) + 1)) and all(ln["at"] for ln in lines)
    assert lines[1]["file"] == "square/broken.png" and lines[1]["to"] == ".ursa/quarantine/square/broken.png"
    assert not (root / LEGACY_REVIEW_JOURNAL).exists()  # nothing goes to the old file
    assert len(rv.state().decisions()) == 2  # verify's lines do not disturb the review's state


def test_a_review_journal_from_before_is_still_read_and_undone(review_case, tree_digest) -> None:  # noqa: ANN001
    """Decisions and applies recorded in the old <root>/.ursa/review/journal.jsonl: `--undo` still undoes them,
    new lines go to the one journal and number on from the old ones."""
    root, _ = review_case
    before = tree_digest(root)
    rv = Review(root)
    rv.decide("circle/copy.png", "delete")
    rv.apply()
    old = root / LEGACY_REVIEW_JOURNAL
    journal_path(root).replace(old)  # as an earlier version left it
    assert not (root / "circle/copy.png").exists()
    rv = Review(root)
    assert len(rv.state().applies) == 1
    rv.undo_apply()
    assert tree_digest(root) == before
    legacy_bytes = old.read_bytes()
    line = rv.decide("square/002.png", "keep")
    assert line["seq"] == 5 and [ln["op"] for ln in _raw(root)] == ["unapply", "decide"]
    assert old.read_bytes() == legacy_bytes


def test_verify_lines_from_before_are_read(tmp_path: Path) -> None:
    """Verify's lines from before the one journal (`time`, `stage`, `action`; damaged lines in the middle, left
    by a run killed mid-write) are read with `op` and `at`, and new lines number after them."""
    root = tmp_path
    old = [
        {"time": "2024-01-01T00:00:00+00:00", "stage": "verify", "action": "quarantine", "file": "a/x.jpg", "to": ".ursa/quarantine/a/x.jpg", "reason": "r"},
        {"time": "2024-01-01T00:00:01+00:00", "stage": "verify", "action": "repair", "file": "a/y.jpg", "sha256_before": "b", "sha256_after": "c"},
    ]
    journal_path(root).parent.mkdir(parents=True)
    journal_path(root).write_text(json.dumps(old[0]) + "\n" + '{"time": "2024-01-01T0{"torn": 1}\n' + json.dumps(old[1]) + "\n")
    j = Journal(root, error=VerifyError)
    got = j.lines()
    assert [(ln["op"], ln["at"]) for ln in got] == [("quarantine", old[0]["time"]), ("repair", old[1]["time"])]
    assert j.append("quarantine", file="a/z.jpg")["seq"] == 1


def test_a_torn_last_line_is_passed_over_and_set_aside(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    j.append("decide", name="a")
    with open(j.path, "a") as fh:
        fh.write('{"seq": 2, "at": "20')  # a process killed mid-write
    assert [ln["seq"] for ln in Journal(tmp_path).lines()] == [1]
    line = Journal(tmp_path).append("decide", name="b")
    assert line["seq"] == 2 and [ln["seq"] for ln in _raw(tmp_path)] == [1, 2]
    assert j.path.with_name("journal.jsonl.torn").read_text() == '{"seq": 2, "at": "20\n'  # kept, not deleted


def test_a_damaged_line_in_the_middle_stops_the_reader(tmp_path: Path) -> None:
    """A decision or an apply silently dropped could not be undone: the stage says which line to fix."""
    j = Journal(tmp_path, error=ReviewError)
    j.append("decide", name="a")
    with open(j.path, "a") as fh:
        fh.write("{garbage}\n")
    j.append("decide", name="b")
    with pytest.raises(ReviewError, match=r"line 2 is damaged"):
        Journal(tmp_path, error=ReviewError).lines()
    with pytest.raises(VerifyError, match=r"line 2 is damaged"):
        verify_folder(_one_image(tmp_path))


def _one_image(root: Path) -> Path:
    (root / "a").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "x.png")
    return root


def test_threads_and_nested_locks_number_every_line_once(tmp_path: Path) -> None:
    journals = [Journal(tmp_path), Journal(tmp_path)]  # two objects on one file: one lock between them

    def work(k: int) -> None:
        for i in range(20):
            journals[k % 2].append("decide", name=f"{k}-{i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with journals[0].locked(), journals[1].locked():  # re-entrant, across objects, in one thread
        journals[1].append("apply", id="x")
    assert sorted(ln["seq"] for ln in _raw(tmp_path)) == list(range(1, 122))


_APPENDER = """
import sys
from ursa.journal import Journal
j = Journal(sys.argv[1])
for i in range(40):
    j.append("decide", name=f"{sys.argv[2]}-{i}")
"""


def test_processes_number_every_line_once(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(tmp_path), str(k)]) for k in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    lines = _raw(tmp_path)
    assert sorted(ln["seq"] for ln in lines) == list(range(1, 121)) and len({ln["name"] for ln in lines}) == 120


def test_an_unreadable_journal_is_the_stages_error(tmp_path: Path) -> None:
    journal_path(tmp_path).mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(UrsaError, match="Cannot read the journal"):
        Journal(tmp_path).lines()
