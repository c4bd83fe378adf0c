"""Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage of a timm classifier.

The classifier's forward is split where timm splits it: ``forward_features`` (the convolutional
stages) and ``forward_head`` (pooling + linear). The pipeline keeps the last stage's activations
from its inference pass; Grad-CAM then only needs the gradient of the logit with respect to those
activations, i.e. a backward pass through the head (no second forward of the backbone, no hooks).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from inference.preprocess import Letterbox

__all__ = ["HeatMap", "grad_cam", "heat_map_png", "hot_spot_polygon", "upsample"]

HOT_SPOT_FRACTION = 0.5
"""The hot spot is where the heat map reaches this fraction of its maximum."""


@dataclass(frozen=True)
class HeatMap:
    """A Grad-CAM map on the model's input grid, scaled to [0, 1]."""

    values: np.ndarray  # (size, size) float32
    letterbox: Letterbox


def grad_cam(model: nn.Module, features: torch.Tensor, output_index: int = 0) -> np.ndarray:
    """Grad-CAM of one image: ReLU of the activations weighted by their spatially averaged gradient.

    ``features`` is the (1, C, h, w) output of ``model.forward_features`` (an inference-mode tensor
    is fine: it is cloned into autograd here). Returns an (h, w) map scaled to [0, 1].
    """
    with torch.inference_mode(False), torch.enable_grad():
        activations = features.detach().clone().requires_grad_(True)
        logit = model.forward_head(activations)[:, output_index].sum()
        (gradient,) = torch.autograd.grad(logit, activations)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations.detach()).sum(dim=1))[0].float().cpu().numpy()
    peak = float(cam.max())
    return (cam / peak).astype(np.float32) if peak > 0 else np.zeros_like(cam, dtype=np.float32)


def upsample(cam: np.ndarray, box: Letterbox) -> HeatMap:
    """The coarse map on the model's input grid (bilinear), zero outside the image."""
    values = cv2.resize(cam, (box.size, box.size), interpolation=cv2.INTER_LINEAR)
    inside = np.zeros_like(values)
    inside[box.offset_rows:box.offset_rows + box.rows, box.offset_columns:box.offset_columns + box.columns] = 1
    return HeatMap(np.clip(values * inside, 0.0, 1.0).astype(np.float32), box)


def hot_spot_polygon(heat: HeatMap, fraction: float = HOT_SPOT_FRACTION) -> np.ndarray | None:
    """Closed outline (N, 2) of the largest region above ``fraction`` of the peak, in (column, row)
    coordinates of the source image; None when there is no such region."""
    mask = (heat.values >= fraction * max(float(heat.values.max()), 1e-6)).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea)
    simplified = cv2.approxPolyDP(largest, 0.01 * cv2.arcLength(largest, True), True).reshape(-1, 2)
    if len(simplified) < 3:
        simplified = largest.reshape(-1, 2)
    points = heat.letterbox.to_source(simplified.astype(np.float64) + 0.5)  # pixel centres
    if len(np.unique(np.round(points, 3), axis=0)) < 3:
        return None
    return np.vstack([points, points[:1]]).astype(np.float32)


def heat_map_png(image: np.ndarray, heat: HeatMap) -> bytes:
    """The model input with the heat map blended over it (JET), cropped to the image, as PNG."""
    box = heat.letterbox
    grey = np.round(np.clip(box.crop(image), 0, 1) * 255).astype(np.uint8)
    colour = cv2.applyColorMap(np.round(box.crop(heat.values) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), 0.6, colour, 0.4, 0.0)
    ok, encoded = cv2.imencode(".png", blended)
    if not ok:
        raise RuntimeError("PNG encoding of the heat map failed")
    return encoded.tobytes()
