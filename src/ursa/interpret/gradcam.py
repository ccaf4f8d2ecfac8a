"""Why the model answered as it did: Grad-CAM heat maps on the backbone's last convolutional stage.

Grad-CAM (Selvaraju et al. 2017): the gradient of a class's logit with respect to the last feature map
(n, C, h, w), averaged over h x w, weights the C channels; their weighted sum, through a ReLU, is where
the evidence for that class lies. With Ursa's head (global pooling, then BatchNorm and a linear layer)
it equals the class-activation map the export computes from its "feature_map" output and the head's
weights (`ursa.trust.class_activation_map`); here it runs in torch through autograd, so it holds for
any head.

`load_run_model(run)` rebuilds a run's network from its safetensors weights; `grad_cam(model, x, cls)`
gives the maps; `ClassificationInterpretation.plot_top_loss_heatmaps` draws the top losses with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ursa.errors import InterpretError
from ursa.interpret.runs import read_run

__all__ = ["grad_cam", "load_run_model", "heatmap_overlays"]


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(nn.Sequential(backbone, Head) in eval mode with the run's weights, the run's data_config), from
    `run_dir`'s config.json and models/model.safetensors (tensors only, never unpickled)."""
    from safetensors.torch import load_file

    from ursa.models import Head, create_backbone

    rf = read_run(run_dir, weights=True, split=False)
    cfg, weights = rf.config, rf.weights
    try:
        state = load_file(str(weights))
    except Exception as exc:  # SafetensorError and OSError
        raise InterpretError(f"{weights} is not a readable safetensors file ({exc}). Train the run again.") from None
    n_classes, n_features = (int(s) for s in state["1.fc.weight"].shape) if "1.fc.weight" in state else (0, 0)
    if not n_classes:
        raise InterpretError(f"{weights} has no classifier head (1.fc.weight). Train the run again.")
    bb = create_backbone(cfg.get("timm_name") or cfg["arch"], pretrained=False)
    model = nn.Sequential(bb.model, Head(n_features, n_classes, dropout=0.0))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InterpretError(f"the weights in {weights} do not fit {cfg.get('timm_name')}: {str(exc).splitlines()[0]}. Train the run again.") from None
    return model.eval(), dict(cfg["data_config"])


def grad_cam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor | list[int]) -> np.ndarray:
    """Grad-CAM of `model` (nn.Sequential(timm backbone, head)) for a (n, 3, S, S) batch `x` and one class
    index per image: (n, h, w) float32, each map scaled to [0, 1] (all zero when no evidence). Raises
    InterpretError for a backbone whose last stage is not a spatial feature map (a vision transformer)."""
    body, head = model[0], model[1]
    cls = torch.as_tensor(classes, dtype=torch.long)
    with torch.enable_grad():
        fmap = body.forward_features(x)
        if fmap.ndim != 4:
            raise InterpretError(f"the backbone's last stage gives {tuple(fmap.shape)}, not a (n, C, h, w) feature map; Grad-CAM needs a convolutional backbone.")
        fmap = fmap.detach().requires_grad_(True)
        logits = head(body.forward_head(fmap))
        logits.gather(1, cls[:, None]).sum().backward()
    weights = fmap.grad.mean((2, 3), keepdim=True)  # (n, C, 1, 1): the channels' share of the evidence
    cam = torch.relu((weights * fmap).sum(1)).detach()
    top = cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return (cam / top).numpy().astype(np.float32)


def heatmap_overlays(model: nn.Module, data_config: dict[str, Any], paths: list[Path], classes: list[int], *, batch_size: int = 16) -> list[np.ndarray]:
    """For each image file, (S, S, 3) uint8: the model's input crop with the Grad-CAM of its class drawn on.
    A file that cannot be read gives a grey tile."""
    from PIL import Image

    from ursa.data.transforms import eval_transform, open_image
    from ursa.errors import BadImageError
    from ursa.imageio import eval_min_side
    from ursa.trust import overlay

    tf = eval_transform(data_config)
    size = int(data_config["input_size"][-1])
    mean, std = np.asarray(data_config["mean"], np.float32), np.asarray(data_config["std"], np.float32)
    out: list[np.ndarray] = []
    for s in range(0, len(paths), batch_size):
        xs, ok = [], []
        for p in paths[s : s + batch_size]:
            try:
                xs.append(tf(open_image(p, min_side=eval_min_side(data_config))))
                ok.append(True)
            except BadImageError:
                xs.append(torch.zeros(3, size, size))
                ok.append(False)
        x = torch.stack(xs)
        cams = grad_cam(model, x, classes[s : s + batch_size])
        for xi, cam, good in zip(x.numpy(), cams, ok):
            if not good:
                out.append(np.full((size, size, 3), 200, np.uint8))
                continue
            crop = np.clip((xi.transpose(1, 2, 0) * std + mean) * 255, 0, 255).astype(np.uint8)
            out.append(np.asarray(overlay(Image.fromarray(crop, "RGB"), cam)))
    return out
