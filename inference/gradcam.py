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

from inference.geometry import mask_parts, outline_points, polygon_area
from inference.preprocess import Letterbox

__all__ = ["HeatMap", "grad_cam", "heat_map_png", "hot_spot_polygon", "hot_spot_polygons", "upsample"]

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


def _part_outline(contour: np.ndarray) -> np.ndarray:
    """A part's outline simplified to 1 % of its length; unsimplified when that leaves no area."""
    simplified = cv2.approxPolyDP(contour, 0.01 * cv2.arcLength(contour, True), True)
    if polygon_area(simplified.reshape(-1, 2).astype(np.float64)) > 0:
        return outline_points(simplified)
    return outline_points(contour)


def hot_spot_polygons(heat: HeatMap, fraction: float = HOT_SPOT_FRACTION) -> list[np.ndarray]:
    """Closed outlines (N, 2) of every region above ``fraction`` of the peak, the largest first,
    in (column, row) coordinates of the source image; empty when the map is zero everywhere.

    An untrained or unsure model gives maps with several parts, parts of one or two cells and
    parts at the image's edge: each part gets an outline with an area (simplified, or the
    rectangle around a part too thin to outline, see :func:`inference.geometry.outline_points`),
    clipped to the image.
    """
    peak = float(heat.values.max())
    if peak <= 0:
        return []
    mask = heat.values >= fraction * peak
    polygons = []
    for contour in mask_parts(mask):
        source = heat.letterbox.to_source(_part_outline(contour))
        polygons.append(np.vstack([source, source[:1]]).astype(np.float32))
    return polygons


def hot_spot_polygon(heat: HeatMap, fraction: float = HOT_SPOT_FRACTION) -> np.ndarray | None:
    """Closed outline of the largest region above ``fraction`` of the peak (see
    :func:`hot_spot_polygons`); None when the map is zero everywhere."""
    polygons = hot_spot_polygons(heat, fraction)
    return polygons[0] if polygons else None


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
