"""From DICOM pixel data to the tensors the models were trained on.

Radiographs (PedXnet recipe): decode (any transfer syntax pydicom's pylibjpeg plugins read), apply
the Modality LUT, invert MONOCHROME1 so that dense tissue is bright, min-max with 0.5 % clipping,
resize keeping the aspect ratio and pad to a square, optional CLAHE. The same functions serve MR
volumes, normalised once per volume. Training (``training/``) uses these functions too, so that a
model sees the same numbers in production as in training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut

__all__ = [
    "CLIP_PERCENT",
    "NORMALISATIONS",
    "Letterbox",
    "PixelDataError",
    "apply_clahe",
    "letterbox",
    "modality_values",
    "normalise",
    "prepare_radiograph",
]

CLIP_PERCENT = 0.5
"""Percent of the darkest and of the brightest values clipped before min-max scaling."""


class PixelDataError(ValueError):
    """The dataset's pixel data cannot be used (missing, colour, multi-frame where one is expected)."""


def modality_values(ds: Dataset) -> np.ndarray:
    """The image in Modality LUT output units (float32), MONOCHROME1 inverted.

    After this, larger values are always brighter on a display, whatever the photometric
    interpretation. Inverting by negation is exact for any later min-max scaling.
    """
    if "PixelData" not in ds:
        raise PixelDataError("the dataset has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PixelDataError(f"expected a greyscale image, got PhotometricInterpretation {photometric}")
    stored = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise PixelDataError("expected a single-frame image")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    return -values if photometric == "MONOCHROME1" else values


def _minmax(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((np.clip(values, low, high) - low) / (high - low)).astype(np.float32)


def minmax_clipped(values: np.ndarray, percent: float = CLIP_PERCENT) -> np.ndarray:
    """Scale to [0, 1] between the ``percent`` and ``100 - percent`` percentiles (clipping outside)."""
    low, high = np.percentile(values, (percent, 100.0 - percent))
    return _minmax(values, float(low), float(high))


def minmax(values: np.ndarray) -> np.ndarray:
    return _minmax(values, float(values.min()), float(values.max()))


def zscore(values: np.ndarray) -> np.ndarray:
    std = float(values.std())
    return ((values - values.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


NORMALISATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "minmax_0.5pct": minmax_clipped,
    "minmax": minmax,
    "zscore": zscore,
}


def normalise(values: np.ndarray, method: str) -> np.ndarray:
    """Apply the named normalisation of an :class:`~inference.registry.InputSpec` to an image or volume."""
    if method not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {method!r}; known: {', '.join(NORMALISATIONS)}")
    return NORMALISATIONS[method](values)


@dataclass(frozen=True)
class Letterbox:
    """Where a source image lies inside the square model input: ``input = source * scale + offset``."""

    source_rows: int
    source_columns: int
    size: int
    scale_rows: float
    scale_columns: float
    offset_rows: int
    offset_columns: int
    rows: int
    columns: int

    def to_source(self, points_xy: np.ndarray) -> np.ndarray:
        """Model-input (column, row) coordinates → source image (column, row) coordinates."""
        points = np.asarray(points_xy, dtype=np.float64)
        columns = (points[:, 0] - self.offset_columns) / self.scale_columns
        rows = (points[:, 1] - self.offset_rows) / self.scale_rows
        return np.stack([np.clip(columns, 0, self.source_columns), np.clip(rows, 0, self.source_rows)], axis=1)

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The part of a model-sized image that shows the source (padding removed)."""
        return image[..., self.offset_rows:self.offset_rows + self.rows,
                     self.offset_columns:self.offset_columns + self.columns]

    def unpad_resize(self, image: np.ndarray) -> np.ndarray:
        """A model-sized 2D map brought back onto the source pixel grid (bilinear)."""
        cropped = np.ascontiguousarray(self.crop(image), dtype=np.float32)
        return cv2.resize(cropped, (self.source_columns, self.source_rows), interpolation=cv2.INTER_LINEAR)


def fit_letterbox(rows: int, columns: int, size: int, keep_aspect: bool = True) -> Letterbox:
    if not keep_aspect:
        return Letterbox(rows, columns, size, size / rows, size / columns, 0, 0, size, size)
    scale = size / max(rows, columns)
    new_rows = max(1, min(size, round(rows * scale)))
    new_columns = max(1, min(size, round(columns * scale)))
    return Letterbox(rows, columns, size, new_rows / rows, new_columns / columns,
                     (size - new_rows) // 2, (size - new_columns) // 2, new_rows, new_columns)


def _resize(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    shrinking = rows < image.shape[0] or columns < image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image, dtype=np.float32), (columns, rows), interpolation=interpolation)


def apply_clahe(image: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] image (16-bit precision)."""
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
    as_uint16 = np.round(np.clip(image, 0.0, 1.0) * 65535).astype(np.uint16)
    return clahe.apply(as_uint16).astype(np.float32) / 65535.0


def letterbox(image: np.ndarray, size: int, *, keep_aspect: bool = True, clahe: bool = False,
              fill: float = 0.0) -> tuple[np.ndarray, Letterbox]:
    """Resize a 2D image into a ``size`` × ``size`` square, keeping aspect (pad with ``fill``)."""
    box = fit_letterbox(image.shape[0], image.shape[1], size, keep_aspect)
    resized = _resize(image, box.rows, box.columns)
    if clahe:
        resized = apply_clahe(resized)
    out = np.full((size, size), fill, dtype=np.float32)
    out[box.offset_rows:box.offset_rows + box.rows, box.offset_columns:box.offset_columns + box.columns] = resized
    return out, box


def prepare_radiograph(ds: Dataset, image_size: int, *, normalisation: str = "minmax_0.5pct",
                       keep_aspect: bool = True, clahe: bool = False) -> tuple[np.ndarray, Letterbox]:
    """One CR/DX image as the model's (size, size) float32 input and its letterbox geometry."""
    values = normalise(modality_values(ds), normalisation)
    return letterbox(values, image_size, keep_aspect=keep_aspect, clahe=clahe)
