"""The lesson's notebook names (ursa.notebook, re-exported by `ursa`): download_images and verify_images over the
collect and verify stages, vision_learner's NotebookLearner with export, load_learner and predict, and the
interpretation of a Learner with its image files. Real local server, tiny generated images, a tiny timm model."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset
from ursa.errors import BadImageError, CollectError, ExportError, InterpretError, NotAnImageError, UrsaError, VerifyError

if TYPE_CHECKING:
    from conftest import Built, FaultServer


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


# ---- the names, from `ursa` ----


def test_every_name_of_the_lesson_imports_from_ursa() -> None:
    import ursa

    lesson = ["download_images", "verify_images", "ImageDataLoaders", "aug_transforms", "vision_learner", "cnn_learner", "error_rate", "accuracy", "ClassificationInterpretation", "ImageCleaner", "load_learner", "load_model", "train_run"]
    assert set(lesson) <= set(ursa.__all__)
    for name in ursa.__all__:
        assert getattr(ursa, name) is not None, name
    from ursa import cnn_learner, vision_learner  # noqa: F401 - the import itself is the test

    assert cnn_learner is vision_learner


# ---- download_images ----


def test_download_images_from_a_list_keeps_max_pics(server: FaultServer, tmp_path: Path) -> None:
    from ursa import download_images

    urls = [server.url(f"img/{i}") for i in range(6)]
    report = download_images(urls, tmp_path / "bears" / "black", max_pics=3, max_workers=2, progress=False)
    assert len(_files(tmp_path / "bears" / "black")) == 3
    assert report.per_class["black"]["ok"] == 3 and report.manifest == tmp_path / "bears" / ".ursa" / "manifest.csv"
    assert report.manifest.is_file()
    # Running the line again resumes: the class is full, nothing is fetched again.
    hits = sum(server.hits.values())
    again = download_images(urls, tmp_path / "bears" / "black", max_pics=3, progress=False)
    assert sum(server.hits.values()) == hits and again.per_class["black"]["ok"] == 0
    assert len(_files(tmp_path / "bears" / "black")) == 3


def test_download_images_from_a_file_txt_and_csv(server: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ursa import download_images

    txt = tmp_path / "urls_grizzly.txt"
    txt.write_text("\n".join([server.url("img/1"), server.url("img/2"), server.url("status/404"), "data:image/png;base64,xx"]) + "\n")
    report = download_images(txt, tmp_path / "bears" / "grizzly")  # the path as a Path
    assert len(_files(tmp_path / "bears" / "grizzly")) == 2 and report.reasons["http 404"] == 1
    assert "grizzly: 2 new" in capsys.readouterr().out
    csv = tmp_path / "teddy.csv"
    csv.write_text("title,url\na," + server.url("png/3") + "\nb," + server.url("img/4") + "\n")
    download_images(str(csv), tmp_path / "bears" / "teddy", progress=False)  # the path as a str
    assert len(_files(tmp_path / "bears" / "teddy")) == 2
    # one URL as a string is a list of one
    download_images(server.url("img/9"), tmp_path / "bears" / "panda", progress=False)
    assert len(_files(tmp_path / "bears" / "panda")) == 1


def test_download_images_bad_input(tmp_path: Path) -> None:
    from ursa import download_images

    with pytest.raises(CollectError, match="max_workers"):
        download_images(["http://127.0.0.1:9/x.jpg"], tmp_path / "d" / "c", max_workers=0, progress=False)
    with pytest.raises(CollectError, match="max_pics"):
        download_images(["http://127.0.0.1:9/x.jpg"], tmp_path / "d" / "c", max_pics=-1, progress=False)
    with pytest.raises(CollectError, match="list of URL strings, not int"):
        download_images([1, 2], tmp_path / "d" / "c", progress=False)
    with pytest.raises(CollectError, match="no http"):
        download_images(["not a url"], tmp_path / "d" / "c", progress=False)
    with pytest.raises(CollectError, match="does not exist"):
        download_images(tmp_path / "missing.txt", tmp_path / "d" / "c", progress=False)
    assert not (tmp_path / "d").exists()


# ---- verify_images ----


def _dataset_with_a_broken_file(root: Path) -> Path:
    make_dataset(root, classes=2, per_class=3, size=32)
    (root / "bear" / "broken.jpg").write_bytes(b"this is not a picture")
    (root / "cat" / "broken.jpg").write_bytes(b"nor is this")
    return root


def test_verify_images_report_only_changes_nothing(tmp_path: Path, tree_digest: Any) -> None:
    from ursa import verify_images

    root = _dataset_with_a_broken_file(tmp_path / "data")
    before = tree_digest(root)
    bad = verify_images(root / "bear", delete=False, max_size=16, progress=False)
    assert bad == [root / "bear" / "broken.jpg"] and not bad.moved
    assert tree_digest(root) == before  # nothing moved, repaired or shrunk
    assert not (root / ".ursa" / "journal.jsonl").exists() and not (root / ".ursa" / "quarantine").exists()
    assert bad.report.count("unreadable") == 1
    # a class folder is checked alone: the other class's broken file is not in the report
    assert {r.file for r in bad.report.results} == {f"bear/{n}" for n in _files(root / "bear")}
    assert any(r.changes for r in bad.report.results if r.status == "ok")  # the shrink it would make, reported


def test_verify_images_delete_quarantines_with_a_journal(tmp_path: Path, journal: Any) -> None:
    from ursa import verify_images

    root = _dataset_with_a_broken_file(tmp_path / "data")
    bad = verify_images(root / "bear", delete=True, progress=False)
    assert bad == [root / "bear" / "broken.jpg"] and bad.moved
    assert not (root / "bear" / "broken.jpg").exists()
    assert (root / ".ursa" / "quarantine" / "bear" / "broken.jpg").read_bytes() == b"this is not a picture"  # moved, not unlinked
    assert not (root / "bear" / ".ursa").exists()  # the dataset's journal and quarantine, not the class folder's
    lines = journal(root)
    assert [(e["op"], e["file"]) for e in lines] == [("quarantine", "bear/broken.jpg")]
    assert (root / "cat" / "broken.jpg").exists()  # another class folder is left alone
    # the dataset folder checks every class
    assert verify_images(root, progress=False) == [root / "cat" / "broken.jpg"]
    assert verify_images(root / "bear", progress=False) == []


def test_verify_images_bad_input(tmp_path: Path) -> None:
    from ursa import verify_images

    with pytest.raises(VerifyError, match="does not exist"):
        verify_images(tmp_path / "nope", progress=False)
    root = make_dataset(tmp_path / "data", classes=1, per_class=2, size=32)
    with pytest.raises(VerifyError, match="max-size|max_size"):
        verify_images(root / "bear", max_size=4, progress=False)


def test_verify_folder_refuses_a_subfolder_outside_the_root(tmp_path: Path) -> None:
    from ursa.verify import verify_folder

    root = make_dataset(tmp_path / "data", classes=1, per_class=2, size=32)
    for sub in ("../data", ".ursa", "/etc", "missing"):
        with pytest.raises(VerifyError, match="not a folder under"):
            verify_folder(root, subfolder=sub)


# ---- the learner, its export, load_learner, predict ----


@dataclass
class Trained:
    root: Path
    learn: Any
    export: Path
    result: Any


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A NotebookLearner on a tiny timm model (resnet10t, random weights) over 3 classes x 8 images, exported once."""
    import torch

    from ursa import ImageDataLoaders, vision_learner

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("notebook")
    root = make_dataset(base / "data", classes=3, per_class=8, size=64, fmt="jpg")
    dls = ImageDataLoaders.from_folder(root, valid_pct=0.25, seed=0, arch="resnet10t", size=64, bs=8)
    learn = vision_learner(dls, "resnet10t", pretrained=False, path=base, progress=False)
    res = learn.export(base / "models" / "shapes", verbose=False)
    return Trained(root, learn, res.out, res)


def test_vision_learner_is_a_notebook_learner(trained: Trained) -> None:
    from ursa.notebook import NotebookLearner
    from ursa.train.learner import Learner

    assert isinstance(trained.learn, NotebookLearner) and isinstance(trained.learn, Learner)
    assert trained.learn.frozen_to > 0  # frozen to start, as training's vision_learner builds it


def test_learn_export_writes_the_export_folder(trained: Trained) -> None:
    meta = json.loads((trained.export / "model.json").read_text())
    assert sorted(os.listdir(trained.export)) == ["model.json", "model.onnx", "model.safetensors"]
    assert meta["classes"] == trained.learn.classes and meta["timm_name"] == "resnet10t"
    assert meta["source"]["run"] is None and meta["source"]["dataset"] == str(trained.root.resolve())
    assert meta["onnx"]["max_abs_diff_logits"] <= meta["onnx"]["tolerance"] and meta["onnx"]["checked_images"] > 0
    assert meta["metrics"]["training"]["n_valid"] == len(trained.learn.dls.split.valid)
    assert meta["preprocess"]["input_size"] == [3, 64, 64]
    assert not [p for p in trained.export.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert "ExportResult(" in repr(trained.result) and len(repr(trained.result)) < 300


def test_learn_export_leaves_the_learner_as_it_was(trained: Trained) -> None:
    learn = trained.learn
    assert learn.frozen_to > 0 and all(not p.requires_grad for p in learn.groups[0] if p.dim() > 1)


def test_load_learner_predicts_a_path_bytes_and_a_pil_image(trained: Trained) -> None:
    from ursa import load_learner
    from ursa.export import Predictor

    photo = trained.root / "cat" / "003.jpg"
    learner = load_learner(trained.export, open_set=False)
    assert isinstance(learner, Predictor)
    got = [learner.predict(photo), learner.predict(photo.read_bytes()), learner.predict(Image.open(photo))]
    for pred_class, pred_idx, outputs in got:
        assert pred_class == trained.learn.classes[pred_idx] and outputs.shape == (3,)
        np.testing.assert_allclose(outputs, got[0][2], atol=1e-6)
    # the exported model answers as the learner in memory does (same weights, same preprocessing)
    label, idx, probs = trained.learn.predict(photo)
    assert (label, idx) == got[0][:2]
    np.testing.assert_allclose(got[0][2], probs.numpy(), atol=1e-4)
    pred_class, pred_idx, outputs = load_learner(trained.export).predict(photo)  # with the open-set threshold
    assert isinstance(pred_class, str) and isinstance(pred_idx, int) and outputs.shape == (3,)


def test_predict_refuses_what_is_not_an_image(trained: Trained, tmp_path: Path) -> None:
    from ursa import load_learner

    learner = load_learner(trained.export)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with pytest.raises(NotAnImageError, match="not an image"):
        learner.predict(text)
    with pytest.raises(NotAnImageError):
        learner.predict(b"plain bytes")
    with pytest.raises(BadImageError, match="file path, the bytes of an image file or a PIL image, not int"):
        learner.predict(42)
    with pytest.raises(BadImageError, match="not ndarray.*fromarray"):
        learner.predict(np.zeros((8, 8, 3), np.uint8))
    assert issubclass(BadImageError, UrsaError)


def test_export_into_a_non_empty_folder_is_refused(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "models" / "bears"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"already exists and is not empty.*learn\.export\('.*bears-2'\)"):
        trained.learn.export(out, verbose=False)
    assert _files(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bears"]  # nothing beside it either


def test_a_failed_export_writes_nothing(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ursa.export import run as export_steps

    monkeypatch.setattr(export_steps, "to_onnx", lambda *a, **k: (trained.export / "model.onnx").read_bytes())
    monkeypatch.setattr(export_steps, "ONNX_TOLERANCE", -1.0)  # the parity check fails, after the conversion
    with pytest.raises(ExportError, match="differs from PyTorch"):
        trained.learn.export(tmp_path / "models" / "bears", verbose=False)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_export_learner_and_export_run_share_one_path(trained: Trained, built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both front doors hand an ExportSource to the same `_export`: a run folder is one way to find one."""
    from ursa.export import run as export_steps

    seen: list[Any] = []
    monkeypatch.setattr(export_steps, "_export", lambda src, out, **kw: seen.append((src, kw)))
    export_steps.export_learner(trained.learn, tmp_path / "a")
    export_steps.export_run(built.run, tmp_path / "b")
    (learner, kw_learner), (run, kw_run) = seen
    assert isinstance(learner, export_steps.ExportSource) and isinstance(run, export_steps.ExportSource)
    assert learner.split is trained.learn.dls.split and learner.state.keys() == trained.learn.model.state_dict().keys()
    assert set(learner.config) <= set(run.config) and set(learner.source) >= {"run", "dataset"} and set(run.source) == {"run", "dataset"}
    assert {k for k in kw_learner if k != "retry"} == {k for k in kw_run if k != "retry"}


def test_export_of_a_learner_without_images_is_refused(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from ursa.notebook import NotebookLearner

    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    learn = NotebookLearner(nn.Linear(4, 2), [(x, y)], [(x, y)], classes=["a", "b"], progress=False)
    with pytest.raises(ExportError, match="only an image learner made by vision_learner"):
        learn.export(tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_load_learner_on_a_folder_that_is_not_an_export(tmp_path: Path) -> None:
    from ursa import load_learner

    with pytest.raises(ExportError, match="does not exist.*learn.export"):
        load_learner(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="not an Ursa export folder.*learn.export"):
        load_learner(tmp_path / "run")


# ---- interpretation of a Learner ----


def test_interpretation_from_a_learner_has_the_image_files(trained: Trained) -> None:
    import matplotlib

    from ursa import ClassificationInterpretation

    assert matplotlib.get_backend().lower() == "agg"
    interp = ClassificationInterpretation.from_learner(trained.learn)
    split = trained.learn.dls.split
    assert interp.names == [it.name for it in split.valid] and interp.root == split.root
    assert [interp.classes[t] for t in interp.targets] == [it.label for it in split.valid]
    fig = interp.plot_top_losses(4, figsize=(8, 7))
    assert tuple(fig.get_size_inches()) == (8, 7) and len([a for a in fig.axes if a.images]) == 4
    # the titles name the files' true classes: the grid shows the images behind the losses
    _, idx = interp.top_losses(4)
    assert [a.get_title().split("\n")[0].split("/")[1] for a in fig.axes if a.images] == [split.valid[i].label for i in idx]
    cm = interp.plot_confusion_matrix(figsize=(5, 5))
    assert tuple(cm.get_size_inches()) == (5, 5)
    assert all(n >= 2 for _, _, n in interp.most_confused(min_val=2))
    with pytest.raises(InterpretError, match="figsize"):
        interp.plot_confusion_matrix(figsize=(0, 5))


def test_interpretation_of_another_loader_has_no_files(trained: Trained) -> None:
    from ursa import ClassificationInterpretation

    interp = ClassificationInterpretation.from_learner(trained.learn, trained.learn.dls.valid)
    assert interp.names is None
    with pytest.raises(InterpretError, match="from_learner"):
        interp.plot_top_losses(2)


def test_plot_top_losses_writes_a_png(trained: Trained, tmp_path: Path) -> None:
    from ursa import ClassificationInterpretation

    out = tmp_path / "top.png"
    ClassificationInterpretation.from_learner(trained.learn).plot_top_losses(3, figsize=(6, 3), out=out)
    with Image.open(io.BytesIO(out.read_bytes())) as im:
        assert im.size[0] > im.size[1]  # the figsize was applied before the file was written
