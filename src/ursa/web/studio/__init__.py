"""Ursa Studio: the whole flow (classes, photos, training, results, review, try it, export) in one local web app
over a project folder that the CLI and the notebook read and write too.

`project.Project` is the project folder (classes, images, runs, exports); `jobs.Jobs` the persistent table of
long work (train, issues, export, download), each job a child process (`python -m ursa.tasks`).
"""

from __future__ import annotations

__all__ = ["jobs", "project"]
