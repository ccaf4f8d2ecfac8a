"""From an empty project to a trained model through Ursa Studio's API, with `ursa train` as the baseline, in
one run.

The studio is the real command (`python -m ursa studio PROJECT --no-browser --port P`) in its own process;
the client is httpx on 127.0.0.1. Steps, each timed on the client's wall clock:

1. `start`: the server answers GET /api/project (the empty project folder is created);
2. `classes`: POST /api/classes x 3;
3. `upload`: 3 classes x 30 real photos (monkey10 training/n0..n2, the first 30 of each by name) as
   multipart uploads of 10 files per request;
4. `train`: POST /api/train with the default options, until its job is done (the studio's training job
   runs `train_run`, the function `ursa train` runs, in a child process);
5. `predict`: until the first POST /api/predict of a validation photo answers 200 (the export job the
   studio queues after training makes the model it answers with), then the median of 20 more predictions.

Baseline: `python -m ursa train PROJECT --out ...` on the folder the studio filled, as a process, timed the
same way, twice (their mean is the baseline). Every run starts with a cold feature cache
(URSA_CACHE_DIR set to a fresh folder for each), so the studio's training is compared with a CLI training
that does the same work. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _machine import cpu_flags
from _model import DATA

CLASSES = ("n0", "n1", "n2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def photos(cls: str, n: int) -> list[Path]:
    return sorted(p for p in (DATA / "training" / cls).iterdir() if p.is_file())[:n]


def cold_env(tmp: Path, tag: str) -> dict[str, str]:
    cache = tmp / f"cache-{tag}"
    cache.mkdir()
    return {**os.environ, "URSA_CACHE_DIR": str(cache)}


def cli_train(project: Path, out: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ursa", "train", str(project), "--out", str(out)], env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"ursa train failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return wall


def wait_job(client: httpx.Client, job: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        snap = client.get(f"/api/jobs/{job}").json()
        if snap["state"] not in ("queued", "running"):
            return snap
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job} did not finish in {timeout} s: {snap}")
        time.sleep(0.1)


def studio_flow(project: Path, env: dict[str, str], log: Path, per_class: int) -> dict:
    port = free_port()
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ursa", "studio", str(project), "--no-browser", "--port", str(port)], stdout=err, stderr=err, env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        while True:
            try:
                if client.get("/api/project").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise SystemExit(f"studio did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        steps["start"] = time.perf_counter() - t0

        t = time.perf_counter()
        for cls in CLASSES:
            r = client.post("/api/classes", json={"name": cls})
            r.raise_for_status()
        steps["classes"] = time.perf_counter() - t

        t = time.perf_counter()
        stored = 0
        for cls in CLASSES:
            files = photos(cls, per_class)
            for i in range(0, len(files), 10):
                batch = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in files[i : i + 10]]
                r = client.post(f"/api/classes/{cls}/images", files=batch)
                r.raise_for_status()
                stored += sum(row["status"] == "ok" for row in r.json()["results"])
        steps["upload"] = time.perf_counter() - t

        t = time.perf_counter()
        r = client.post("/api/train", json={})
        r.raise_for_status()
        job = wait_job(client, r.json()["job"])
        steps["train"] = time.perf_counter() - t
        if job["state"] != "done":
            raise SystemExit(f"training job ended {job['state']}: {job.get('error')}")
        metrics = job["result"]["metrics"]

        t = time.perf_counter()
        photo = sorted((DATA / "validation" / CLASSES[0]).iterdir())[0].read_bytes()
        while True:
            r = client.post("/api/predict", files={"file": ("photo.jpg", photo, "image/jpeg")})
            if r.status_code == 200:
                break
            if r.status_code != 409 or time.perf_counter() - t > 300:
                raise SystemExit(f"predict failed: {r.status_code} {r.text[:500]}")
            time.sleep(0.1)
        steps["predict"] = time.perf_counter() - t
        first = r.json()
        times = []
        for _ in range(20):
            s = time.perf_counter()
            client.post("/api/predict", files={"file": ("photo.jpg", photo, "image/jpeg")}).raise_for_status()
            times.append(1000 * (time.perf_counter() - s))
        steps["total"] = sum(steps[k] for k in ("classes", "upload", "train", "predict"))
        return {
            "steps_s": {k: round(v, 2) for k, v in steps.items()},
            "stored": stored,
            "error_rate": metrics["error_rate"],
            "train_job_s": job["seconds"],
            "first_prediction": {"label": first["label"], "prob": round(first["prob"], 3)},
            "predict_ms_median": round(statistics.median(times), 1),
        }
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=30)
    args = ap.parse_args()
    if not (DATA / "training").is_dir():
        raise SystemExit(f"needs the monkey10 photos at {DATA}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        project = tmp / "project"
        studio = studio_flow(project, cold_env(tmp, "studio"), tmp / "studio.log", args.per_class)
        first = cli_train(project, tmp / "cli" / "a", cold_env(tmp, "cli-a"))
        second = cli_train(project, tmp / "cli" / "b", cold_env(tmp, "cli-b"))
    baseline = (first + second) / 2
    ratio = studio["steps_s"]["train"] / baseline
    out = {
        "benchmark": "studio_flow",
        "data": f"monkey10 training {'/'.join(CLASSES)} x {args.per_class}",
        **studio,
        "baseline_ursa_train_s": {"runs": [round(first, 2), round(second, 2)], "mean": round(baseline, 2)},
        "train_vs_cli": round(ratio, 2),
        "targets_met": studio["steps_s"]["total"] < 45 and ratio <= 1.2,
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
