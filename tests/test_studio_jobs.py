"""The studio's persistent job table (ursa.web.studio.jobs.Jobs) and its child processes (python -m ursa.tasks):
real training, issues and export on a tiny project, cancelling, restarting, adopting and interrupted jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_dataset

from ursa.errors import StudioError
from ursa.web.studio import jobs as jobs_mod
from ursa.web.studio.jobs import FINAL, TRAIN_DEFAULTS, Jobs, check_options
from ursa.web.studio.project import Conflict, NotFound, Project

TINY = {"size": 64, "views": 2}


def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for the interpreter: `$3` is the job folder (argv: -m ursa.tasks JOBDIR)."""
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def _wait_state(jobs: Jobs, job_id: str, state: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = jobs.get(job_id)
        if snap["state"] == state:
            return snap
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {state}: {jobs.get(job_id)}")


# ---- options and the table, without running anything --------------------------------------------------------


def test_options_are_checked_and_completed() -> None:
    assert check_options("train", {}) == TRAIN_DEFAULTS
    assert check_options("train", {"size": 64, "then": []})["size"] == 64
    assert check_options("issues", {"run": "run-2"}) == {"run": "run-2"}
    assert check_options("download", {"class": "cats"}) == {"class": "cats", "max": None}
    bad = [
        ("train", {"epochs": 3}, r"unknown train options \['epochs'\]"),
        ("train", {"size": 3}, "size"),
        ("train", {"views": -1}, "views"),
        ("train", {"valid_pct": 1.5}, "valid-pct"),
        ("train", {"seed": -1}, "seed"),
        ("train", {"aug": 5}, "augmentation preset"),
        ("train", {"aug": "wild"}, "wild"),
        ("train", {"name": "../x"}, "folder name"),
        ("train", {"then": ["train"]}, "then must be a list"),
        ("train", {"fine_tune": -1}, "fine"),
        ("train", [], "must be a JSON object"),
        ("issues", {}, "needs the run"),
        ("export", {"run": "a/b"}, "folder name"),
        ("download", {"class": ".x"}, "folder name"),
        ("download", {"class": "x", "max": 0}, "max must be"),
        ("download", {"class": "x", "max": True}, "max must be"),
        ("sleep", {}, "unknown job kind 'sleep'"),
    ]
    for kind, options, why in bad:
        with pytest.raises(StudioError, match=why):
            check_options(kind, options)


def test_submit_get_list_and_cancel_a_queued_job(tmp_path: Path) -> None:
    jobs = Jobs(tmp_path)  # no worker started: jobs stay queued
    a = jobs.submit("issues", {"run": "run"})
    b = jobs.submit("download", {"class": "cats", "max": 5}, files={"urls.txt": b"http://127.0.0.1:9/a.jpg\n"})
    assert a["state"] == "queued" and a["progress"] == 0.0 and a["options"] == {"run": "run"} and a["result"] is None
    assert set(a) == {"id", "kind", "state", "progress", "stage", "log", "epochs", "result", "error", "options", "created", "started", "ended", "seconds"}
    d = tmp_path / ".ursa" / "studio" / "jobs" / b["id"]
    assert (d / "urls.txt").read_bytes() == b"http://127.0.0.1:9/a.jpg\n" and json.loads((d / "job.json").read_text())["state"] == "queued"
    assert [j["id"] for j in jobs.list()] == [b["id"], a["id"]] and len(jobs.list(1)) == 1
    assert jobs.cancel(a["id"])["state"] == "cancelled"
    with pytest.raises(Conflict, match="already ended"):
        jobs.cancel(a["id"])
    for bad in ("../../etc", "ABCDEF012345", "123", "", None):
        with pytest.raises(NotFound, match="not a job id"):
            jobs.get(bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="there is no job 0123456789ab"):
        jobs.cancel("0123456789ab")
    with pytest.raises(StudioError, match="needs its URL list"):
        jobs.submit("download", {"class": "cats"})
    for name in ("../x", "job.json", ".hidden", "a/b"):
        with pytest.raises(StudioError, match="plain file name"):
            jobs.submit("download", {"class": "cats"}, files={"urls.txt": b"x", name: b"x"})
    again = Jobs(tmp_path)  # the table is read back
    assert [(j["id"], j["state"]) for j in again.list()] == [(b["id"], "queued"), (a["id"], "cancelled")]


# ---- the worker, with stand-in processes -------------------------------------------------------------------


def test_a_process_that_dies_without_an_end_fails_with_its_exit_code(tmp_path: Path) -> None:
    jobs = Jobs(tmp_path, python=_fake_python(tmp_path, 'echo "boom" ; exit 3'))
    jobs.start()
    try:
        snap = jobs.wait(jobs.submit("issues", {"run": "run"})["id"], 30)
    finally:
        jobs.stop()
    assert snap["state"] == "failed" and "exit code 3" in snap["error"] and "output.log" in snap["error"]
    assert (tmp_path / ".ursa/studio/jobs" / snap["id"] / "output.log").read_text().strip() == "boom"


def test_jobs_run_one_at_a_time_oldest_first_and_fold_events(tmp_path: Path) -> None:
    body = """echo "{\\"t\\": 0, \\"type\\": \\"progress\\", \\"p\\": 0.5, \\"stage\\": \\"half\\"}" >> "$3/events.jsonl"
echo "{\\"t\\": 0, \\"type\\": \\"log\\", \\"line\\": \\"$(date +%s%N)\\"}" >> "$3/events.jsonl"
echo "{\\"t\\": 0, \\"type\\": \\"epoch\\", \\"epoch\\": 0, \\"valid_loss\\": NaN}" >> "$3/events.jsonl"
sleep 0.3
echo "{\\"t\\": 1, \\"type\\": \\"end\\", \\"state\\": \\"done\\", \\"result\\": {\\"n\\": 1}}" >> "$3/events.jsonl"
echo "{\\"t\\": 1, \\"type\\": \\"log\\", \\"line\\": \\"$(date +%s%N)\\"}" >> "$3/events.jsonl"
"""
    jobs = Jobs(tmp_path, python=_fake_python(tmp_path, body))
    ids = [jobs.submit("issues", {"run": f"r{i}"})["id"] for i in range(3)]
    jobs.start()
    try:
        running = _wait_state(jobs, ids[0], "running")
        snaps = [jobs.wait(i, 30) for i in ids]
    finally:
        jobs.stop()
    assert running["started"] is not None and running["ended"] is None
    assert all(s["state"] == "done" and s["progress"] == 1.0 and s["result"] == {"n": 1} for s in snaps)
    assert snaps[0]["epochs"] == [{"epoch": 0, "valid_loss": None}]  # NaN is not JSON: it becomes null
    spans = [(int(s["log"][0]), int(s["log"][1])) for s in snaps]
    assert spans[0][1] < spans[1][0] and spans[1][1] < spans[2][0]  # one at a time, in order
    assert snaps[0]["seconds"] >= 0.3


def test_cancel_escalates_to_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_mod, "KILL_AFTER_S", 0.5)
    jobs = Jobs(tmp_path, python=_fake_python(tmp_path, "trap '' TERM\necho '{\"t\": 0, \"type\": \"stage\", \"stage\": \"stubborn\"}' >> \"$3/events.jsonl\"\nwhile true; do sleep 0.1; done"))
    jobs.start()
    try:
        job = jobs.submit("issues", {"run": "run"})["id"]
        _wait_state(jobs, job, "running")
        deadline = time.monotonic() + 10
        while jobs.get(job)["stage"] != "stubborn" and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        jobs.cancel(job)
        snap = jobs.wait(job, 20)
    finally:
        jobs.stop()
    assert snap["state"] == "cancelled" and snap["error"] == "cancelled" and 0.4 < time.monotonic() - t0 < 10


def test_a_running_job_is_adopted_by_the_next_table_and_a_dead_one_is_interrupted(tmp_path: Path) -> None:
    body = 'sleep 1.5\necho \'{"t": 1, "type": "end", "state": "done", "result": {"adopted": true}}\' >> "$3/events.jsonl"'
    python = _fake_python(tmp_path, body)
    first = Jobs(tmp_path, python=python)
    first.start()
    job = first.submit("export", {"run": "run"})["id"]
    _wait_state(first, job, "running")
    first.stop()  # the studio stops; its child runs on
    second = Jobs(tmp_path, python=python)
    assert second.get(job)["state"] == "running"
    second.start()
    try:
        snap = second.wait(job, 30)
    finally:
        second.stop()
    assert snap["state"] == "done" and snap["result"] == {"adopted": True}
    # a record of a running job whose process is gone: interrupted (or what its events say, when it ended unwatched)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    table = tmp_path / ".ursa" / "studio" / "jobs"
    for job_id, events in (("aaaaaaaaaaaa", ""), ("bbbbbbbbbbbb", '{"t": 1, "type": "end", "state": "failed", "error": "no run"}\n')):
        (table / job_id).mkdir()
        record = {**json.loads((table / job / "job.json").read_text()), "id": job_id, "state": "running", "pid": dead.pid, "pid_start": "1"}
        (table / job_id / "job.json").write_text(json.dumps(record))
        (table / job_id / "events.jsonl").write_text(events)
    third = Jobs(tmp_path)
    assert third.get("aaaaaaaaaaaa")["state"] == "interrupted" and "Start it again" in third.get("aaaaaaaaaaaa")["error"]
    assert third.get("bbbbbbbbbbbb")["state"] == "failed" and third.get("bbbbbbbbbbbb")["error"] == "no run"
    assert json.loads((table / "aaaaaaaaaaaa" / "job.json").read_text())["state"] == "interrupted"  # written back


# ---- real child processes: python -m ursa.tasks ------------------------------------------------------------


def test_train_then_issues_and_export_for_real(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "proj", classes=3, per_class=6, fmt="jpg")
    project = Project(root)
    jobs = Jobs(project.root)
    jobs.start()
    try:
        train = jobs.submit("train", {**TINY, "then": ["issues", "export"]})
        snap = jobs.wait(train["id"], 300)
        assert snap["state"] == "done", snap
        follow = [j for j in jobs.list() if j["id"] != train["id"]]
        done = [jobs.wait(j["id"], 300) for j in follow]
        again = jobs.wait(jobs.submit("export", {"run": snap["result"]["run"]})["id"], 120)
        missing = jobs.wait(jobs.submit("issues", {"run": "nope"})["id"], 120)
    finally:
        jobs.stop()
    run = snap["result"]["run"]
    assert run == "run" and snap["progress"] == 1.0 and snap["result"]["metrics"]["n_valid"] > 0
    assert [e["stage"] for e in snap["epochs"]] == ["head"] and "error_rate" in snap["epochs"][0]
    assert any("writing the run folder" in line for line in snap["log"])
    assert sorted((j["kind"], j["state"]) for j in done) == [("export", "done"), ("issues", "done")]
    issues = next(j for j in done if j["kind"] == "issues")
    assert issues["result"]["run"] == "run" and "counts" in issues["result"]
    for f in ("issues.csv", "confusion.png", "top_losses.png"):
        assert (root / "runs" / run / f).is_file()
    assert (root / "models" / run / "model.json").is_file() and project.summary()["runs"][0]["exported"]
    assert again["state"] == "done" and again["result"]["existing"] is True  # already exported: done at once
    assert missing["state"] == "failed" and "no finished run 'nope'" in missing["error"]
    assert [c["name"] for c in project.classes()] == ["bear", "cat", "dog"]  # runs/ and models/ are not classes
    table = Jobs(project.root)  # a restarted studio sees the same table
    assert {j["id"]: j["state"] for j in table.list()} == {j["id"]: j["state"] for j in [snap, *done, again, missing]}
    assert table.get(train["id"])["epochs"] == snap["epochs"]


def test_train_uses_cleaned_csv_and_failures_carry_the_message(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "proj", classes=2, per_class=5, fmt="jpg")
    names = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.jpg"))
    (root / "cleaned.csv").write_text("name,label\n" + "".join(f"{n},{n.split('/')[0]}\n" for n in names[:-2]))  # two images left out
    Project(root)
    jobs = Jobs(root)
    jobs.start()
    try:
        ok = jobs.wait(jobs.submit("train", {**TINY, "then": []})["id"], 300)
        (root / "cleaned.csv").write_text("name,label\nbear/000.jpg,bear\n")  # one image: training cannot split it
        bad = jobs.wait(jobs.submit("train", {**TINY, "then": []})["id"], 300)
    finally:
        jobs.stop()
    assert ok["state"] == "done", ok
    m = ok["result"]["metrics"]
    assert m["n_train"] + m["n_valid"] == len(names) - 2
    assert any("cleaned.csv" in line for line in ok["log"])
    assert bad["state"] == "failed" and bad["error"] and "Traceback" not in bad["error"]
    assert [j["kind"] for j in Jobs(root).list()] == ["train", "train"]  # no follow-ups with then=[]


def test_download_job_and_cancelling_a_running_child(tmp_path: Path, server) -> None:  # noqa: ANN001
    root = tmp_path / "proj"
    project = Project(root)
    project.add_class("cats")
    (root / "cleaned.csv").write_text("name,label\n")
    jobs = Jobs(project.root)
    jobs.start()
    try:
        urls = "\n".join([server.url("img/1"), server.url("img/2"), server.url("same/a"), server.url("status/404"), "not a url"]) + "\n"
        snap = jobs.wait(jobs.submit("download", {"class": "cats", "max": None}, files={"urls.txt": urls.encode()})["id"], 120)
        server.hang_s = 60.0
        slow = jobs.submit("download", {"class": "cats"}, files={"urls.txt": (server.url("hang") + "\n").encode()})["id"]
        _wait_state(jobs, slow, "running")
        deadline = time.monotonic() + 30
        while server.hits["/hang"] == 0 and time.monotonic() < deadline:  # the child is waiting on the server
            time.sleep(0.05)
        t0 = time.monotonic()
        jobs.cancel(slow)
        cancelled = jobs.wait(slow, 30)
    finally:
        jobs.stop()
    assert snap["state"] == "done", snap
    r = snap["result"]
    assert (r["ok"], r["failed"], r["skipped"], r["added"]) == (3, 1, 1, 3) and r["manifest"] == ".ursa/manifest.csv"
    assert any("404" in k for k in r["reasons"])
    assert (root / ".ursa" / "manifest.csv").is_file() and project.classes()[0]["count"] == 3
    assert len((root / "cleaned.csv").read_text().splitlines()) == 4  # the new images joined cleaned.csv
    assert cancelled["state"] == "cancelled" and time.monotonic() - t0 < KILL_BOUND
    last = json.loads((root / ".ursa/studio/jobs" / slow / "events.jsonl").read_text().splitlines()[-1])
    assert last["type"] == "end" and last["state"] == "cancelled"  # the child itself ended on SIGTERM, cleanly
    assert FINAL >= {cancelled["state"]}


KILL_BOUND = 4.5  # a cancelled child ends on SIGTERM, before the SIGKILL that follows after 5 s
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_two_tables_on_one_project_never_run_a_job_twice(tmp_path: Path) -> None:
    body = 'echo "$$" >> "$3/../../ran.txt"\necho \'{"t": 0, "type": "end", "state": "done", "result": {}}\' >> "$3/events.jsonl"'
    python = _fake_python(tmp_path, body)
    first = Jobs(tmp_path, python=python)
    job = first.submit("issues", {"run": "run"})["id"]
    second = Jobs(tmp_path, python=python)  # another studio on the same folder reads the same queued job
    first.start()
    try:
        assert first.wait(job, 30)["state"] == "done"
        second.start()  # waits for the first worker's lock: the job it read as queued never starts here
        time.sleep(1.0)
        assert second.get(job)["state"] == "queued"
        first.stop()  # the second takes over, reads the table again, and finds the job done
        deadline = time.monotonic() + 10
        while second.get(job)["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.get(job)["state"] == "done"
        time.sleep(0.5)
    finally:
        first.stop()
        second.stop()
    assert len((tmp_path / ".ursa" / "studio" / "ran.txt").read_text().split()) == 1


def test_tasks_usage_errors(tmp_path: Path) -> None:
    from ursa.tasks import main

    assert main([]) == 2
    assert main([str(tmp_path)]) == 2  # no job.json: not a job folder
    (tmp_path / "job.json").write_text(json.dumps({"kind": "sleep", "options": {}}))
    assert main([str(tmp_path)]) == 1
    end = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[-1])
    assert end["type"] == "end" and end["state"] == "failed" and "unknown job kind 'sleep'" in end["error"]
