"""Calibration (ECE, temperature fitted out of fold) and the open-set detector: ursa.trust and ursa.train.trust."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from ursa.errors import UrsaError
from ursa.trust import OpenSetDetector, detector_from_bytes, detector_to_bytes, expected_calibration_error, fit_temperature, scaled_softmax

if TYPE_CHECKING:
    from conftest import Built


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident() -> None:
    # 10 rows at 0.8 confidence, 8 right: perfectly calibrated
    p = np.tile([[0.8, 0.2]], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-9)
    # 0.99 sure, right half the time: ECE 0.49
    p = np.tile([[0.99, 0.01]], (10, 1))
    y = np.array([0, 1] * 5)
    assert expected_calibration_error(p, y) == pytest.approx(0.49, abs=1e-6)
    assert np.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0, int)))


def test_temperature_undoes_a_known_scaling_and_lowers_ece() -> None:
    rng = np.random.default_rng(0)
    n, c = 4000, 5
    true_logits = rng.normal(size=(n, c)) * 2.0
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)  # a label drawn from each row's probabilities
    overconfident = true_logits * 3.0  # a model 3x too sure
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert expected_calibration_error(scaled_softmax(overconfident, t), y) < expected_calibration_error(scaled_softmax(overconfident), y) / 3
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_detector_scores_far_points_higher_and_round_trips(method: str) -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 4
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + rng.normal(size=(120, 16))
    det = OpenSetDetector.fit(x, y, n_classes=3, method=method)
    near = centres[[0, 1, 2]] + rng.normal(size=(3, 16)) * 0.5
    far = rng.normal(size=(3, 16)) * 4 + 20 * np.sign(rng.normal(size=(3, 16)))
    assert det.score(near).max() < det.score(far).min()
    det.threshold = float(det.score(near).max())
    again = detector_from_bytes(detector_to_bytes(det))
    assert again.method == method and again.threshold == pytest.approx(det.threshold)
    np.testing.assert_allclose(again.score(far), det.score(far), rtol=1e-3)


def test_detector_errors() -> None:
    with pytest.raises(UrsaError, match="unknown open-set detector"):
        OpenSetDetector.fit(np.zeros((4, 3)), np.zeros(4, int), n_classes=1, method="magic")
    with pytest.raises(UrsaError, match="at least 2"):
        OpenSetDetector.fit(np.zeros((1, 3)), np.zeros(1, int), n_classes=1)
    with pytest.raises(UrsaError, match="not a readable open-set detector"):
        detector_from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")


def test_a_run_records_temperature_and_ece_fitted_out_of_fold(built: Built) -> None:
    m = json.loads((built.run / "metrics.json").read_text())
    assert m["temperature"] > 0 and m["temperature"] != 1.0
    assert set(m["ece"]) == {"before", "after", "bins"} and m["ece"]["bins"] == 15
    assert 0 <= m["ece"]["after"] <= 1 and 0 <= m["ece"]["before"] <= 1
    assert "out-of-fold" in m["calibration"]
    assert m["open_set"]["method"] == "knn" and m["open_set"]["accept"] == 0.95
    assert (built.run / "models" / "open_set.safetensors").is_file()


def test_temperature_never_sees_the_validation_set(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression guard: fit_temperature gets the training images' out-of-fold logits, as many rows as training images."""
    import ursa.train.trust as tt

    seen: list[int] = []
    real = tt.fit_temperature
    monkeypatch.setattr(tt, "fit_temperature", lambda z, y: seen.append(len(y)) or real(z, y))
    from ursa.config import DataConfig, TrainConfig
    from ursa.train.features import cached_features, prepare_backbone

    train = TrainConfig(arch="efficientnet_lite0", size=64, epochs=2, views=2)
    fd = cached_features(built.result.split, prepare_backbone(train), train, DataConfig(seed=0))
    trust = tt.fit_trust(fd, built.result.model[1], n_classes=3)
    assert seen == [len(fd.train_names)]
    assert trust.detector is not None and np.isfinite(trust.detector.threshold)


def test_too_few_training_images_skip_calibration_with_a_note(tmp_path: Path) -> None:
    import torch

    from ursa.models import Head
    from ursa.train.features import FeatureData
    from ursa.train.trust import fit_trust

    fd = FeatureData(torch.randn(3, 8), torch.tensor([0, 1, 0]), ["a", "b", "c"], [torch.randn(2, 8)], torch.tensor([0, 1]), ["d", "e"], [], [0])
    trust = fit_trust(fd, Head(8, 2).eval(), n_classes=2)
    assert trust.temperature == 1.0 and trust.detector is None and "too few" in trust.info["calibration_note"]


# ---- the export carries them; the Predictor applies them with no torch --------------------------------


def test_the_export_stores_temperature_and_detector_listed_and_hashed(built: Built) -> None:
    from ursa.export.artifact import sha256

    meta = json.loads((built.export / "model.json").read_text())
    run_metrics = json.loads((built.run / "metrics.json").read_text())
    assert meta["format_version"] == 3
    assert meta["calibration"]["temperature"] == pytest.approx(run_metrics["temperature"])
    det = meta["open_set"]["detector"]
    assert det["file"] == "open_set.safetensors" and det["method"] == "knn"
    data = (built.export / "open_set.safetensors").read_bytes()
    assert meta["files"]["open_set.safetensors"] == {"sha256": sha256(data), "bytes": len(data)}
    assert meta["outputs"] == {"logits": "logits", "embedding": "embedding", "feature_map": "feature_map"}


def test_predictor_applies_the_temperature(built: Built) -> None:
    from ursa.export import load_model

    m = load_model(built.export)
    assert m.temperature == pytest.approx(json.loads((built.run / "metrics.json").read_text())["temperature"], rel=1e-5)
    x = m.load(built.photo)
    np.testing.assert_allclose(m.probs(x), scaled_softmax(m.logits(x), m.temperature), atol=1e-6)
    pred = m.predict_image(built.photo)
    np.testing.assert_allclose(pred.probs, m.probs(x)[0], atol=1e-6)


def test_reasons_unfamiliar_before_unsure(built: Built) -> None:
    from ursa.export import NONE_OF_THESE, load_model

    m = load_model(built.export)
    assert m.detector is not None
    emb = m.run(m.load(built.photo), embedding=True)[1][0]
    probs = np.array([0.5, 0.3, 0.2], np.float32)
    m.threshold, m.detector.threshold = 0.0, float("inf")
    assert m.interpret(probs, embedding=emb).reason is None
    m.threshold = 0.6  # under the softmax threshold: unsure between the two most probable classes
    p = m.interpret(probs, embedding=emb)
    assert p.label == NONE_OF_THESE and p.reason == f"unsure between {m.classes[0]} and {m.classes[1]}"
    m.detector.threshold = -1.0  # every photo beyond the detector's threshold: unfamiliar wins
    p = m.interpret(probs, embedding=emb)
    assert p.rejected and p.reason == "unfamiliar" and p.to_dict()["reason"] == "unfamiliar" and p.unfamiliarity is not None


def test_open_set_false_disables_the_detector_too(built: Built) -> None:
    from ursa.export import load_model

    m = load_model(built.export, open_set=False)
    assert m.detector is None and m.threshold == 0.0 and m.predict_image(built.photo).reason is None


def _as_version_2(built: Built, tmp_path: Path) -> Path:
    """The export as the previous format wrote it: logits only, no temperature, no detector."""
    import shutil

    import onnx

    from ursa.export.artifact import content_sha256, sha256

    dst = tmp_path / "v2"
    shutil.copytree(built.export, dst)
    (dst / "open_set.safetensors").unlink()
    proto = onnx.load(str(dst / "model.onnx"))
    keep = [o for o in proto.graph.output if o.name == "logits"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    (dst / "model.onnx").write_bytes(proto.SerializeToString())
    meta = json.loads((dst / "model.json").read_text())
    for key in ("outputs", "calibration"):
        meta.pop(key)
    meta["open_set"].pop("detector")
    meta["format_version"] = 2
    del meta["files"]["open_set.safetensors"]
    data = (dst / "model.onnx").read_bytes()
    meta["files"]["model.onnx"] = {"sha256": sha256(data), "bytes": len(data)}
    meta["content_sha256"] = content_sha256(meta)
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def test_an_export_of_format_version_2_still_loads_without_the_new_parts(built: Built, tmp_path: Path, run_cli) -> None:  # noqa: ANN001
    from ursa.errors import ExportError
    from ursa.export import load_model

    v2 = _as_version_2(built, tmp_path)
    m = load_model(v2)
    assert m.temperature == 1.0 and m.detector is None
    pred = m.predict_image(built.photo)
    assert pred.reason in (None, f"unsure between {pred.top[0][0]} and {pred.top[1][0]}")
    with pytest.raises(ExportError, match="no feature_map output.*ursa export"):
        m.explain(built.photo)
    code, _, err = run_cli("predict", str(v2), str(built.photo), "--explain", str(tmp_path / "h.png"))
    assert code == 2 and "no feature_map output" in err and not (tmp_path / "h.png").exists()


def test_explain_writes_a_heat_map_png(built: Built, tmp_path: Path, run_cli) -> None:  # noqa: ANN001
    from PIL import Image

    from ursa.export import load_model

    m = load_model(built.export)
    pred, cam, picture = m.explain(built.photo)
    assert cam.ndim == 2 and 0.0 <= cam.min() and cam.max() <= 1.0 and picture.size == (m.size, m.size)
    torch_cam = load_model(built.export, backend="torch").explain(built.photo)[1]
    np.testing.assert_allclose(torch_cam, cam, atol=1e-3)
    out = tmp_path / "why.png"
    code, stdout, _ = run_cli("predict", str(built.export), str(built.photo), "--explain", str(out))
    assert code == 0 and "wrote" in stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (m.size, m.size)


@pytest.mark.parametrize("args, match", [(["--explain", "x.jpg"], "must be a .png"), (["EXTRA", "--explain", "x.png"], "exactly one image")])
def test_explain_bad_requests_exit_2(built: Built, tmp_path: Path, run_cli, args: list[str], match: str) -> None:  # noqa: ANN001
    args = [str(built.photo) if a == "EXTRA" else (str(tmp_path / a) if a.startswith("x.") else a) for a in args]
    code, _, err = run_cli("predict", str(built.export), str(built.photo), *args)
    assert code == 2 and match in " ".join(err.split())


def test_onnx_explain_and_detector_need_no_torch(built: Built) -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ursa.export import load_model\n"
        f"m = load_model({str(built.export)!r})\n"
        f"p, cam, im = m.explain({str(built.photo)!r})\n"
        "assert m.detector is not None and p.unfamiliarity is not None\n"
        "print(sorted(x for x in sys.modules if x.startswith(('torch', 'timm', 'ursa.train'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_serve_answers_with_the_reason(built: Built) -> None:
    from fastapi.testclient import TestClient

    from ursa.web.predict_app import create_predict_app

    c = TestClient(create_predict_app(built.export), base_url="http://127.0.0.1")
    body = c.post("/predict", content=built.photo.read_bytes()).json()
    assert "reason" in body and "unfamiliarity" in body
    assert (body["reason"] is None) == (not body["rejected"])
    assert "reason" in c.get("/openapi.json").json()["components"]["schemas"]["PredictionOut"]["properties"]


# ---- why: Grad-CAM in interpret and report ------------------------------------------------------------


def _copy_run(built: Built, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(built.run, dst)
    return dst


def test_torch_grad_cam_equals_the_exports_class_activation_map(built: Built) -> None:
    import torch

    from ursa.export import load_model
    from ursa.interpret.gradcam import grad_cam, load_run_model

    model, dc = load_run_model(built.run)
    m = load_model(built.export)
    x = m.load(built.photo)
    pred, cam, _ = m.explain(built.photo)
    got = grad_cam(model, torch.from_numpy(x), [m.classes.index(pred.best)])[0]
    np.testing.assert_allclose(got, cam, atol=1e-3)
    assert dc["input_size"] == [3, 64, 64]


def test_interpret_heatmaps_writes_the_png_and_the_report_shows_it(built: Built, tmp_path: Path, run_cli) -> None:  # noqa: ANN001
    from PIL import Image

    run = _copy_run(built, tmp_path)
    code, out, _ = run_cli("interpret", str(run), "--heatmaps", "--top", "4")
    assert code == 0 and "heatmaps.png" in out
    with Image.open(run / "heatmaps.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    from ursa.report import render_report

    page = render_report(run)
    assert "where the model looked (Grad-CAM)" in page and "Calibration and open set" in page


def test_interpret_heatmaps_without_weights_is_a_clear_error(built: Built, tmp_path: Path, run_cli) -> None:  # noqa: ANN001
    run = _copy_run(built, tmp_path)
    (run / "models" / "model.safetensors").unlink()
    code, _, err = run_cli("interpret", str(run), "--heatmaps")
    assert code == 2 and "not a finished training run" in " ".join(err.split())


def test_serve_returns_the_heat_map_when_asked_and_refuses_it_for_an_old_export(built: Built, tmp_path: Path) -> None:
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from ursa.web.predict_app import create_predict_app

    c = TestClient(create_predict_app(built.export), base_url="http://127.0.0.1")
    assert c.post("/predict", content=built.photo.read_bytes()).json()["heatmap"] is None
    body = c.post("/predict?heatmap=true", content=built.photo.read_bytes()).json()
    assert body["heatmap"].startswith("data:image/png;base64,") and body["ms"]["total"] > 0
    with Image.open(io.BytesIO(base64.b64decode(body["heatmap"].split(",", 1)[1]))) as im:
        assert im.size == (64, 64)
    assert 'data-explain="yes"' in c.get("/").text
    old = TestClient(create_predict_app(_as_version_2(built, tmp_path)), base_url="http://127.0.0.1")
    r = old.post("/predict?heatmap=true", content=built.photo.read_bytes())
    assert r.status_code == 422 and "Export it again" in r.json()["detail"]
    assert 'data-explain="no"' in old.get("/").text


def test_a_fine_tuned_run_is_not_calibrated_and_says_why() -> None:
    import torch

    from ursa.train.recipe import _trust_metrics

    probs, y = torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0])
    m = _trust_metrics(None, probs, y, fine_tuned=True)
    assert m["temperature"] == 1.0 and m["ece"]["before"] == m["ece"]["after"] and "fine-tuned" in m["calibration_note"]
