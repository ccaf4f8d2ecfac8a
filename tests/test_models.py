"""Backbone registry: the packaged weights map correctly (real photos), and bad weights are refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ursa.errors import ModelError
from ursa.models import create_backbone, imagenet_head, load_state_dict_file, map_lite_keys


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


@pytest.mark.parametrize("photo,wanted", [("chelsea", {281, 282, 285}), ("coffee", {967, 968, 504})])
def test_packaged_weights_recognise_real_photos(lite0, photo: str, wanted: set[int]) -> None:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    from ursa.data.transforms import eval_transform

    x = eval_transform(lite0.data_config)(Image.fromarray(getattr(skdata, photo)())).unsqueeze(0)
    with torch.inference_mode():
        probs = imagenet_head()(lite0.model.eval()(x)).softmax(-1)[0]
    top = int(probs.argmax())
    assert top in wanted, f"{photo}: top ImageNet class {top} (p={probs.max():.2f})"
    assert probs[sorted(wanted)].sum() > 0.5


def test_data_config_is_the_models_own(lite0) -> None:
    cfg = lite0.data_config
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert tuple(cfg["input_size"]) == (3, 224, 224) and lite0.num_features == 1280


def test_key_mapping_refuses_mismatched_shapes(lite0) -> None:
    target = lite0.model.state_dict()
    src = {f"_k{i}": v.clone() for i, v in enumerate(target.values())}
    assert len(map_lite_keys(src, target)) == len(target)
    first = next(iter(src))
    src[first] = torch.zeros(1)
    with pytest.raises(ModelError, match="does not fit"):
        map_lite_keys(src, target)


def test_weights_file_for_other_timm_model(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    donor = create_backbone("resnet10t", pretrained=False)
    f = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in donor.model.state_dict().items()}, str(f))
    bb = create_backbone("resnet10t", weights=f)
    assert torch.equal(bb.model.state_dict()["conv1.0.weight"], donor.model.state_dict()["conv1.0.weight"])
    with pytest.raises(ModelError, match="do not fit this architecture.*--arch"):
        create_backbone("efficientnet_lite0", weights=f)


def test_bad_weights_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="could not read weights"):
        load_state_dict_file(junk)
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict_file(tmp_path / "absent.safetensors")


def test_unknown_arch_and_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelError, match="unknown architecture"):
        create_backbone("not_a_model_xyz")
    import timm

    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kw):  # noqa: ANN003, ANN202
        if pretrained:
            raise OSError("network is unreachable")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match="--weights FILE"):
        create_backbone("resnet10t")
