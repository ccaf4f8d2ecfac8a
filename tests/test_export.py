"""Export folder, Predictor and the export / predict CLI: round trip, ONNX parity, preprocessing parity,
open set, tampered and foreign files, error paths."""

from __future__ import annotations

import csv
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import draw_example
from ursa import export as ex
from ursa.errors import BadImageError, ExportError, ImageTooLargeError, NotAnImageError
from ursa.export import run as export_steps
from ursa.export.artifact import content_sha256, sha256
from ursa.imageio import decode_image

if TYPE_CHECKING:
    from conftest import Built


@pytest.fixture
def fast_convert(built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-exports of the same run reuse the session's ONNX bytes instead of converting again (seconds each)."""
    monkeypatch.setattr(export_steps, "to_onnx", lambda *a, **k: built.onnx_bytes)


def copy_export(built: Built, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(built.export, dst)
    return dst


def write_meta(folder: Path, meta: dict) -> None:
    """Write an edited model.json with its content_sha256 recomputed (as someone hiding an edit would, or as
    an export of a model with that content), so the checks behind the hash are what is tested."""
    meta["content_sha256"] = content_sha256(meta)
    (folder / "model.json").write_text(json.dumps(meta))


def rewrite_hash(folder: Path, name: str) -> None:
    """Update model.json for a replaced file, as someone hiding a swap would."""
    meta = json.loads((folder / "model.json").read_text())
    data = (folder / name).read_bytes()
    meta["files"][name] = {"sha256": sha256(data), "bytes": len(data)}
    write_meta(folder, meta)


# ---- preprocessing ----


def _reference(path: Path, data_config: dict) -> np.ndarray:
    from ursa.imageio import eval_min_side
    from ursa.data.transforms import eval_transform, open_image

    return eval_transform(data_config)(open_image(path, min_side=eval_min_side(data_config))).numpy()[None]


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("kind", ["jpeg-500x375", "jpeg-big-draft", "jpeg-640x480", "png-rgba", "gray", "tiny", "palette"])
def test_preprocess_matches_training_eval_transform(tmp_path: Path, kind: str, size: int) -> None:
    dc = {"input_size": [3, size, size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "interpolation": "bicubic"}
    base = draw_example(1, 3, size=256)
    path = tmp_path / "x.png"
    if kind == "jpeg-500x375":
        path = tmp_path / "x.jpg"
        base.resize((500, 375)).save(path, quality=90)
    elif kind == "jpeg-big-draft":  # short side >= 2x the input: decoded at reduced scale in both paths
        path = tmp_path / "x.jpg"
        base.resize((1600, 1200)).save(path, quality=90)
    elif kind == "jpeg-640x480":  # short side under 2x the resize's 256: decoded whole in both paths
        path = tmp_path / "x.jpg"
        base.resize((640, 480)).save(path, quality=90)
    elif kind == "png-rgba":
        im = base.convert("RGBA")
        im.putalpha(128)
        im.save(path)
    elif kind == "gray":
        base.convert("L").save(path)
    elif kind == "tiny":
        base.resize((30, 20)).save(path)
    else:
        base.convert("P").save(path)
    from ursa.imageio import eval_min_side

    got = ex.preprocess(decode_image(path, min_side=eval_min_side(dc)), dc)
    ref = _reference(path, dc)
    assert got.shape == ref.shape == (1, 3, size, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(w=st.integers(8, 700), h=st.integers(8, 700), crop=st.sampled_from([0.875, 0.95, 1.0]), interp=st.sampled_from(["bicubic", "bilinear"]))
def test_preprocess_matches_eval_transform_for_any_size(w: int, h: int, crop: float, interp: str) -> None:
    from ursa.data.transforms import eval_transform

    dc = {"input_size": [3, 64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": crop, "interpolation": interp}
    rng = np.random.default_rng(w * 1000 + h)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    np.testing.assert_allclose(ex.preprocess(im, dc), eval_transform(dc)(im).numpy()[None], rtol=0, atol=1e-6)


def test_decode_errors(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(NotAnImageError, match="not an image"):
        decode_image(tmp_path / "a.txt")
    with pytest.raises(BadImageError, match="does not exist"):
        decode_image(tmp_path / "missing.jpg")
    good = tmp_path / "g.jpg"
    draw_example(0, 0, size=128).save(good)
    with pytest.raises(BadImageError, match="damaged or truncated"):
        decode_image(good.read_bytes()[:300])
    with pytest.raises(ImageTooLargeError, match="megapixels"):
        decode_image(good, max_pixels=100)


# ---- the export folder ----


def test_export_folder_is_plain_data_with_hashes(built: Built) -> None:
    names = sorted(p.name for p in built.export.iterdir())
    assert names == ["model.json", "model.onnx", "model.safetensors", "open_set.safetensors"]
    meta = json.loads((built.export / "model.json").read_text())
    assert meta["format"] == ex.FORMAT and meta["classes"] == ["bear", "cat", "dog"]
    assert meta["format_version"] == 3 and meta["content_sha256"] == content_sha256(meta) != content_sha256({**meta, "classes": ["bear", "cat", "eel"]})
    assert meta["preprocess"]["input_size"] == [3, 64, 64] and meta["timm_name"] == "tf_efficientnet_lite0"
    assert meta["preprocess"]["crop_mode"] == "center" and "center crop" in meta["preprocess"]["steps"]
    for name in ("model.onnx", "model.safetensors", "open_set.safetensors"):
        assert meta["files"][name]["sha256"] == sha256((built.export / name).read_bytes())
    assert 0 <= meta["onnx"]["max_abs_diff_logits"] <= ex.ONNX_TOLERANCE and meta["onnx"]["checked_images"] > 0
    assert {"torch", "onnxruntime", "timm", "python"} <= set(meta["versions"])
    assert meta["metrics"]["training"]["n_valid"] == meta["metrics"]["export_valid"]["n"]
    assert 1 / 3 <= meta["open_set"]["threshold"] <= 1 and meta["int8"] is None
    # The "same" padding of the tf_efficientnet convolutions is folded into the Conv nodes (speed).
    import onnx

    graph = onnx.load(str(built.export / "model.onnx")).graph
    assert not [n.name for n in graph.node if n.op_type in ("Pad", "Shape")]
    # The weights file holds tensors only: it loads with safetensors, no pickle involved.
    from safetensors import safe_open

    with safe_open(str(built.export / "model.safetensors"), "np") as f:
        assert f.metadata()["format"] == ex.FORMAT and "1.fc.weight" in set(f.keys())


def test_round_trip_equals_the_in_memory_model(built: Built) -> None:
    """export -> load -> predict gives the probabilities of the trained model on training's eval transform,
    at the temperature training fitted."""
    model = built.result.model.eval()
    dc = built.result.backbone.data_config
    paths = [built.photo, *sorted((built.data / "cat").iterdir())[:3]]
    t = json.loads((built.run / "metrics.json").read_text())["temperature"]
    with torch.inference_mode():
        ref = torch.cat([(model(torch.from_numpy(_reference(p, dc))) / t).softmax(-1) for p in paths]).numpy()
    for backend in ("onnx", "torch"):
        m = ex.load_model(built.export, backend=backend)
        got = np.stack([m.predict(p)[2] for p in paths])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5, err_msg=backend)


def test_onnx_and_torch_paths_give_the_same_probabilities(built: Built) -> None:
    a = ex.load_model(built.export, backend="onnx")
    b = ex.load_model(built.export, backend="torch")
    assert a.backend == "onnx" and b.backend == "torch"
    for src in (built.photo, built.photo.read_bytes(), Image.open(built.photo)):
        la, ia, pa = a.predict(src)
        lb, ib, pb = b.predict(src)
        assert (la, ia) == (lb, ib)
        np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-5)
        assert pa.shape == (3,) and abs(float(pa.sum()) - 1) < 1e-5


def test_load_model_from_the_package(built: Built) -> None:
    import ursa

    label, idx, probs = ursa.load_model(str(built.export)).predict(str(built.photo))
    assert label in ("bear", "cat", "dog", ex.NONE_OF_THESE) and isinstance(idx, int) and probs.dtype == np.float32


def test_open_set_threshold_is_calibrated_on_validation(built: Built) -> None:
    from ursa.data.split import load_split

    m = ex.load_model(built.export)
    split = load_split(built.run / "split.json")
    probs = np.stack([m.predict_image(split.root / it.name).probs for it in split.valid])
    y = split.label_ids(split.valid)
    correct_top = probs.max(1)[probs.argmax(1) == y]
    expected = float(np.quantile(correct_top, 0.05, method="lower"))
    assert m.threshold == pytest.approx(expected, abs=1e-6)
    # export scores validation in batches, this one image at a time: the float noise between the two (~1e-7)
    # must not decide whether the image the threshold was taken from passes it
    assert m.meta["open_set"]["valid_accepted"] == pytest.approx(float((probs.max(1) >= m.threshold - 1e-5).mean()), abs=1e-4)


def test_open_set_answers_none_of_these_when_unsure(built: Built) -> None:
    m = ex.load_model(built.export)
    m.threshold = 1.5  # above any probability
    pred = m.predict_image(built.photo)
    assert pred.rejected and pred.label == ex.NONE_OF_THESE and pred.index == -1 and pred.best in m.classes
    assert m.predict(built.photo)[:2] == (ex.NONE_OF_THESE, -1)
    assert ex.load_model(built.export, open_set=False).threshold == 0.0


def test_predict_image_reports_top_k_and_timings(built: Built) -> None:
    pred = ex.load_model(built.export).predict_image(built.photo, top_k=2)
    assert len(pred.top) == 2 and pred.top[0][1] >= pred.top[1][1] and pred.top[0][0] == pred.best
    assert set(pred.ms) == {"decode", "preprocess", "model", "total"}
    d = pred.to_dict()
    assert json.loads(json.dumps(d)) == d


# ---- refusing what is not ours ----


def test_altered_file_is_refused(built: Built, tmp_path: Path) -> None:
    folder = copy_export(built, tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    for backend in ("onnx", "torch"):  # a folder is refused whole, whichever file the backend uses
        with pytest.raises(ExportError, match="model.onnx does not match the sha256"):
            ex.load_model(folder, backend=backend)


def test_truncated_or_missing_file_is_refused(built: Built, tmp_path: Path) -> None:
    folder = copy_export(built, tmp_path)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ExportError, match="altered, truncated or replaced"):
        ex.load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="model.safetensors is missing"):
        ex.load_model(folder)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format="onnx-zoo"), "not an Ursa model description"),
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.pop("files"), "lists no file hashes"),
        (lambda m: m["preprocess"].update(crop_mode="zoom"), "crop_mode 'zoom'.*center, squash, border"),
    ],
)
def test_foreign_model_json_is_refused(built: Built, tmp_path: Path, edit, match: str) -> None:
    folder = copy_export(built, tmp_path)
    meta = json.loads((folder / "model.json").read_text())
    edit(meta)
    write_meta(folder, meta)
    with pytest.raises(ExportError, match=match):
        ex.load_model(folder)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m["open_set"].update(threshold=0.0), id="lowered-threshold"),
        pytest.param(lambda m: m["classes"].__setitem__(0, "grizzly"), id="renamed-class"),
        pytest.param(lambda m: m["files"]["model.onnx"].update(sha256="0" * 64), id="edited-file-hash"),
        pytest.param(lambda m: m.pop("content_sha256"), id="hash-removed"),
    ],
)
def test_edited_model_json_is_refused(built: Built, tmp_path: Path, edit) -> None:  # noqa: ANN001
    """Regression: lowering the open-set threshold or renaming a class in model.json was accepted. Its
    content is now hashed into content_sha256, so any edit is refused, however the file is laid out."""
    folder = copy_export(built, tmp_path)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(meta, indent=4, sort_keys=True))  # the same content, laid out anew
    assert ex.load_model(folder).classes == meta["classes"]
    edit(meta)
    (folder / "model.json").write_text(json.dumps(meta, indent=2))
    for backend in ("onnx", "torch"):
        with pytest.raises(ExportError, match=r"model.json was edited after export.*Export the run again"):
            ex.load_model(folder, backend=backend)


@pytest.mark.parametrize("name", ["evil.pkl", "README.txt", ".hidden", "model.int8.onnx"])
def test_a_foreign_file_in_the_folder_is_refused(built: Built, tmp_path: Path, name: str) -> None:
    """Regression: an extra evil.pkl in the folder was accepted although foreign files are refused. Any file
    model.json does not list is refused by name, with the fix, also a harmless-looking one or an int8 model
    that was not exported with the folder."""
    folder = copy_export(built, tmp_path)
    (folder / name).write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ExportError, match=rf"{re.escape(name)} is not part of this export.*Remove it from the folder"):
        ex.load_model(folder)
    (folder / name).unlink()
    (folder / "sub").mkdir()  # a folder is foreign too
    with pytest.raises(ExportError, match="sub is not part of this export"):
        ex.load_model(folder)
    (folder / "sub").rmdir()
    assert ex.load_model(folder).classes == ["bear", "cat", "dog"]


def test_a_missing_listed_file_is_refused_whatever_the_backend_reads(built: Built, tmp_path: Path) -> None:
    folder = copy_export(built, tmp_path)
    (folder / "model.onnx").unlink()
    for backend in ("onnx", "torch"):
        with pytest.raises(ExportError, match="model.onnx is missing.*export the run again"):
            ex.load_model(folder, backend=backend)
    with pytest.raises(ExportError, match="model.onnx is missing"):
        ex.read_export(folder, files=[])


def test_an_export_of_format_version_1_is_refused_with_the_fix(built: Built, tmp_path: Path) -> None:
    """Exports made before model.json was hashed are refused, not read with the old rules: otherwise writing
    "format_version": 1 would switch every new check off."""
    folder = copy_export(built, tmp_path)
    meta = json.loads((folder / "model.json").read_text())
    del meta["content_sha256"]
    meta["format_version"] = 1
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"earlier Ursa \(format version 1\).*Export the run again with this Ursa: ursa export"):
        ex.load_model(folder)


def test_a_drafted_jpeg_is_never_enlarged_again(built: Built, tmp_path: Path) -> None:
    """Regression: JPEGs were draft-decoded down to the input side (64 here) although evaluation resizes the
    short side to 73, so a 180x140 photo was decoded at 90x70 and enlarged; a 640x480 photo for a 224 model
    likewise (blurred edges, up to ~50 levels). Now the draft stops at the resize's short side."""
    photo = tmp_path / "p.jpg"
    draw_example(0, 9, size=256).resize((180, 140)).save(photo, quality=95)
    model = ex.load_model(built.export)
    whole = ex.preprocess(decode_image(photo), model.data_config)  # decoded at full size, no draft
    np.testing.assert_array_equal(model.load(photo), whole)
    assert np.abs(ex.preprocess(decode_image(photo, min_side=64), model.data_config) - whole).max() > 0.05  # the old rule's input


@pytest.mark.parametrize("mode", ["squash", "border"])
def test_predictor_follows_the_crop_mode_in_model_json(built: Built, tmp_path: Path, mode: str) -> None:
    """A backbone whose timm config evaluates with another crop mode is served with that mode, the same
    tensor as training's evaluation transform; an older model.json without the key means center."""
    folder = copy_export(built, tmp_path)
    meta = json.loads((folder / "model.json").read_text())
    meta["preprocess"]["crop_mode"] = mode
    write_meta(folder, meta)
    photo = tmp_path / "wide.jpg"
    draw_example(2, 7, size=256).resize((300, 120)).save(photo, quality=95)
    got = ex.load_model(folder).load(photo)
    np.testing.assert_array_equal(got, _reference(photo, meta["preprocess"]))
    assert np.abs(got - ex.load_model(built.export).load(photo)).max() > 0.1  # not the center crop
    del meta["preprocess"]["crop_mode"]
    write_meta(folder, meta)
    np.testing.assert_array_equal(ex.load_model(folder).load(photo), ex.load_model(built.export).load(photo))


def test_not_an_export_folder(built: Built, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        ex.load_model(tmp_path / "nope")
    (tmp_path / "loose").mkdir()
    shutil.copy(built.export / "model.onnx", tmp_path / "loose" / "model.onnx")
    with pytest.raises(ExportError, match="no model.json"):
        ex.load_model(tmp_path / "loose")
    folder = copy_export(built, tmp_path)
    (folder / "model.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        ex.load_model(folder)


def test_pickle_in_place_of_weights_is_never_unpickled(built: Built, tmp_path: Path) -> None:
    """Even with its hash forged into model.json, a pickle is refused by the safetensors reader, unrun."""
    folder = copy_export(built, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # what a malicious pickle does on load
            return (Path.write_text, (marker, "ran"))

    (folder / "model.safetensors").write_bytes(pickle.dumps({"1.fc.weight": Payload()}))
    rewrite_hash(folder, "model.safetensors")
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        ex.load_model(folder, backend="torch")
    assert not marker.exists()


def test_weights_of_another_model_are_refused(built: Built, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = copy_export(built, tmp_path)
    save_file({"1.fc.weight": torch.zeros(5, 7), "1.fc.bias": torch.zeros(5)}, str(folder / "model.safetensors"))
    rewrite_hash(folder, "model.safetensors")
    with pytest.raises(ExportError, match="classifier head|do not fit"):
        ex.load_model(folder, backend="torch")


def test_onnx_of_another_model_is_refused(built: Built, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    folder = copy_export(built, tmp_path)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    (folder / "model.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    assert onnx.load(str(folder / "model.onnx"))
    rewrite_hash(folder, "model.onnx")
    with pytest.raises(ExportError, match="not the"):
        ex.load_model(folder)


def test_bad_options(built: Built) -> None:
    with pytest.raises(ExportError, match="backend must be"):
        ex.load_model(built.export, backend="tensorrt")
    with pytest.raises(ExportError, match="no int8 model"):
        ex.load_model(built.export, precision="int8")
    with pytest.raises(ExportError, match="ONNX Runtime only"):
        ex.load_model(built.export, backend="torch", precision="int8")


# ---- export_run: error paths, parity failure, int8 ----


def test_export_never_overwrites(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "models" / "bears"
    out.mkdir(parents=True)
    (out / "model.json").write_text("{}")
    with pytest.raises(ExportError, match=r"already exists.*--out .*bears-2"):
        ex.export_run(built.run, out)
    assert (out / "model.json").read_text() == "{}"


def test_export_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        ex.export_run(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a finished training run"):
        ex.export_run(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_when_the_dataset_moved(built: Built, tmp_path: Path, fast_convert: None) -> None:
    run = tmp_path / "run"
    shutil.copytree(built.run, run)
    split = json.loads((run / "split.json").read_text())
    split["root"] = str(tmp_path / "gone")
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(ExportError, match="--data"):
        ex.export_run(run, tmp_path / "out")
    res = ex.export_run(run, tmp_path / "out", data_root=built.data)
    assert res.meta["metrics"]["export_valid"]["n"] > 0 and not list(tmp_path.glob(".out.*"))


def test_export_fails_when_onnx_differs_from_pytorch(built: Built, tmp_path: Path, fast_convert: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export_steps, "ONNX_TOLERANCE", -1.0)  # the limit export_run checks
    with pytest.raises(ExportError, match="differs from PyTorch"):
        ex.export_run(built.run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- CLI ----


def test_cli_export_int8_predict_csv(run_cli, built: Built, tmp_path: Path, fast_convert: None) -> None:
    out = tmp_path / "models" / "bears"
    code, stdout, err = run_cli("export", built.run, "--out", out, "--int8")
    assert code == 0, err
    assert "max |logit difference|" in stdout and "int8" in stdout and "model.int8.onnx" in stdout
    meta = json.loads((out / "model.json").read_text())
    q = meta["int8"]
    assert q["calibration_images"] > 0 and q["accuracy_change"] == pytest.approx(q["valid_accuracy_int8"] - q["valid_accuracy_fp32"], abs=1e-4)
    label, _, probs = ex.load_model(out, precision="int8").predict(built.photo)
    assert probs.shape == (3,)
    # The stem, the first blocks and the classifier stay float32; the rest of the network is int8.
    import onnx

    graph = onnx.load(str(out / "model.int8.onnx")).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    weights = {n.name: n.input[1] for n in graph.node if n.op_type in ("Conv", "Gemm")}
    kept = q["float32_nodes"]
    assert any(k.endswith("/conv_stem/Conv") for k in kept) and any(k.endswith("/fc/Gemm") for k in kept) and len(kept) < len(weights) / 3
    assert all(weights[name] not in dequantized for name in kept)
    assert all(w in dequantized for name, w in weights.items() if name not in kept)

    code, _, err = run_cli("export", built.run, "--out", out)
    assert code == 2 and "already exists" in err

    more = tmp_path / "more"
    more.mkdir()
    for i in range(2):
        draw_example(1, 50 + i, size=200).save(more / f"{i}.jpg")
    (more / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    csv_path = tmp_path / "preds.csv"
    code, stdout, err = run_cli("predict", out, built.photo, str(more / "*.jpg"), tmp_path / "missing.png", "--csv", csv_path, "--int8")
    assert code == 0, err
    assert "wrote" in stdout and "2 of 5 image(s) could not be read" in err
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error", "error"]
    assert rows[3]["path"].endswith("broken.jpg") and "not an image" in rows[3]["error"]
    assert "does not exist" in rows[4]["error"] and {"p_bear", "p_cat", "p_dog"} <= set(rows[0])
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in ("bear", "cat", "dog")) - 1) < 1e-4


def test_cli_predict_folder_and_errors(run_cli, built: Built, tmp_path: Path) -> None:
    code, stdout, _ = run_cli("predict", built.export, built.data / "dog", "--top-k", "2", "--no-open-set")
    assert code == 0 and stdout.count("dog") >= 8
    code, _, err = run_cli("predict", tmp_path / "nope", built.photo)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli("predict", built.export, built.photo, "--top-k", "0")
    assert code == 2 and "--top-k" in err
