"""The plan of `ursa next --plan` (ursa.interpret.plan): learning curve, power law, counts and queries, downloads."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from ursa.collect.search import SearchResult
from ursa.errors import InterpretError
from ursa.interpret.plan import ClassPlan, CurvePoint, Plan, _queries, download_plan, fit_power_law, make_plan


def _data(n_per: int, n_valid_per: int = 30, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Three overlapping Gaussian classes: the error falls as the training set grows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d)) * 0.9
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(3), n_per)
    xv = np.concatenate([c + rng.normal(size=(n_valid_per, d)) for c in centres]).astype(np.float32)
    return x[None], y, [xv], np.repeat(np.arange(3), n_valid_per)


def test_fit_power_law_recovers_the_exponent() -> None:
    curve = [CurvePoint(f, n, 2.0 * n**-0.5) for f, n in ((0.25, 25), (0.5, 50), (0.75, 75), (1.0, 100))]
    a, b = fit_power_law(curve, floor=1e-6)
    assert a == pytest.approx(2.0, rel=1e-6) and b == pytest.approx(0.5, rel=1e-6)


def test_make_plan_counts_and_queries() -> None:
    x, y, xv, yv = _data(20)
    plan = make_plan(x, y, xv, yv, ["grizzly_bear", "black", "teddy"], [("grizzly_bear", "black", 3), ("black", "grizzly_bear", 1)], seed=0)
    assert [p.fraction for p in plan.curve] == [0.25, 0.5, 0.75, 1.0]
    assert [p.n_train for p in plan.curve] == [15, 30, 45, 60]
    assert plan.target_error == pytest.approx(plan.current_error / 2)
    g = plan.classes[0]
    assert g.have == 20 and g.confused_with == [("black", 3)]
    if plan.needed_train is not None and not plan.note:
        assert g.need == -(-plan.needed_train // 3) and g.add == max(0, g.need - 20)
    if g.add:
        assert g.queries[0]["query"] == "grizzly bear" and sum(q["count"] for q in g.queries) <= g.add + 1
        assert any(q["query"] == "grizzly bear -black" for q in g.queries) or g.add == 1
    assert plan.classes[2].confused_with == []
    d = plan.to_dict()
    assert d["curve"][0]["fraction"] == 0.25 and d["classes"][0]["label"] == "grizzly_bear"


def test_make_plan_already_at_target_and_bad_target() -> None:
    x, y, xv, yv = _data(20)
    plan = make_plan(x, y, xv, yv, ["a", "b", "c"], [], target=0.99)
    assert "no more images are needed" in plan.note and all(c.add == 0 for c in plan.classes)
    with pytest.raises(InterpretError, match="target"):
        make_plan(x, y, xv, yv, ["a", "b", "c"], [], target=1.5)


def test_queries_split_the_count() -> None:
    assert _queries("teddy", [], 10) == [{"query": "teddy", "count": 10}]
    q = _queries("grizzly", [("black", 3), ("teddy", 1)], 10)
    assert q[0] == {"query": "grizzly", "count": 5} and {"query": "grizzly -black", "count": 4} in q and {"query": "grizzly -teddy", "count": 1} in q
    assert _queries("x", [("y", 1)], 0) == []


class FakeProvider:
    name = "fake"

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def search(self, query: str, *, max_results: int) -> list[SearchResult]:
        self.asked.append((query, max_results))
        slug = query.replace(" ", "_")
        return [SearchResult(url=f"http://images.test/{slug}/{i}.png", source="http://images.test/page") for i in range(max_results)]


def test_download_plan_runs_the_queries_into_the_class_folders(tmp_path, make_png) -> None:  # noqa: ANN001
    root = tmp_path / "data"
    for cl in ("grizzly", "black"):
        (root / cl).mkdir(parents=True)
    plan = Plan([], 1.0, 0.5, 0.2, 0.1, 100, [ClassPlan("grizzly", 10, 13, 3, [("black", 2)], _queries("grizzly", [("black", 2)], 3)), ClassPlan("black", 10, 10, 0)])
    served = iter(range(1000))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=make_png(next(served)), headers={"Content-Type": "image/png"})

    provider = FakeProvider()
    report = download_plan(plan, root, provider=provider, transport=httpx.MockTransport(handler))
    assert provider.asked == [("grizzly", 2), ("grizzly -black", 1)]
    assert len(list((root / "grizzly").iterdir())) == 3 and not list((root / "black").iterdir())
    assert report is not None
    assert download_plan(Plan([], 1.0, 0.5, 0.2, 0.1, 100, [ClassPlan("black", 10, 10, 0)]), root, provider=provider) is None


def test_most_confused_of_a_run_matches_the_interpretation(tmp_path) -> None:  # noqa: ANN001
    from ursa.interpret.analysis import ClassificationInterpretation
    from ursa.interpret.plan import _most_confused

    rows = [("a", "b"), ("a", "b"), ("b", "a"), ("c", "c"), ("c", "a")]
    lines = ["name,label,pred,prob,p_a,p_b,p_c"] + [f"{i}.png,{t},{p},0.9," + ",".join("0.9" if k == p else "0.05" for k in "abc") for i, (t, p) in enumerate(rows)]
    (tmp_path / "predictions.csv").write_text("\n".join(lines) + "\n")
    assert _most_confused(tmp_path / "predictions.csv") == ClassificationInterpretation.from_run(tmp_path).most_confused(1) == [("a", "b", 2), ("b", "a", 1), ("c", "a", 1)]
    assert _most_confused(tmp_path / "missing.csv") == []
