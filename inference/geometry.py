"""Source images and their geometry, as the result objects need them.

Validation of a source image or a single-frame series (the attributes a result
must reference), slice order along the normal, region polygons and outlines in
DICOM image coordinates, and pixel areas.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from pydicom import Dataset

from inference.results import RegionError, SourceImageError

__all__ = [
    "check_source_image",
    "closed_polygon",
    "largest_outline",
    "mask_parts",
    "outline_points",
    "pixel_area_mm2",
    "polygon_area",
    "sort_series",
]

_IMAGE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
)
_SLICE_ATTRIBUTES = (
    "FrameOfReferenceUID",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
)
_REGION_TOLERANCE_PX = 1.0


def _require(ds: Dataset, keywords: Sequence[str], what: str) -> None:
    missing = [kw for kw in keywords if ds.get(kw) in (None, "")]
    if missing:
        raise SourceImageError(f"{what} lacks {', '.join(missing)}")


def check_source_image(source: Dataset) -> None:
    """A single-frame pydicom Dataset with the attributes a result must reference."""
    if not isinstance(source, Dataset):
        raise SourceImageError(f"source must be a pydicom Dataset, got {type(source)}")
    _require(source, _IMAGE_ATTRIBUTES, "source image")
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise SourceImageError("multi-frame source images are not supported")


def _slice_normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    if iop.shape != (6,):
        raise SourceImageError("ImageOrientationPatient must have 6 values")
    return np.cross(iop[:3], iop[3:])


def _check_one_series(sources: Sequence[Dataset]) -> None:
    """Slices of one study, series, frame of reference, matrix and orientation."""
    for ds in sources:
        check_source_image(ds)
        _require(ds, _SLICE_ATTRIBUTES, f"slice {ds.SOPInstanceUID}")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if len({str(ds.get(keyword)) for ds in sources}) != 1:
            raise SourceImageError(f"source slices differ in {keyword}")
    if len({(int(ds.Rows), int(ds.Columns)) for ds in sources}) != 1:
        raise SourceImageError("source slices differ in Rows/Columns")
    if len({str(ds.SOPInstanceUID) for ds in sources}) != len(sources):
        raise SourceImageError("source series repeats a SOP Instance UID")
    iop = np.asarray(sources[0].ImageOrientationPatient, dtype=float)
    for ds in sources[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-4):
            raise SourceImageError("source slices differ in ImageOrientationPatient")


def sort_series(sources: Sequence[Dataset]) -> list[Dataset]:
    """Validate one single-frame series and sort it along the slice normal.

    Slices are ordered by increasing position of ImagePositionPatient along the
    normal of ImageOrientationPatient; the label volume of
    :func:`inference.seg.lung_segmentation` is aligned with this order.
    """
    sources = list(sources)
    if not sources:
        raise SourceImageError("the source series is empty")
    _check_one_series(sources)
    normal = _slice_normal(sources[0])
    positions = np.array(
        [float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for ds in sources]
    )
    order = np.argsort(positions, kind="stable")
    if len(sources) > 1 and np.min(np.diff(positions[order])) < 1e-3:
        raise SourceImageError("two source slices share one position along the normal")
    return [sources[i] for i in order]


def closed_polygon(region: np.ndarray, image: Dataset) -> np.ndarray:
    """A closed (first point repeated) polygon inside the image, as float32.

    Consecutive repeated points are dropped; a region that is not a polygon (fewer than
    three distinct points, or no area, once clipped to the image) is refused: viewers
    cannot draw it as a region.
    """
    points = np.asarray(region, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise RegionError(f"region must have shape (N, 2), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise RegionError("region holds non-finite coordinates")
    columns, rows = int(image.Columns), int(image.Rows)
    tolerance = _REGION_TOLERANCE_PX
    if (
        points[:, 0].min() < -tolerance
        or points[:, 1].min() < -tolerance
        or points[:, 0].max() > columns + tolerance
        or points[:, 1].max() > rows + tolerance
    ):
        raise RegionError(
            f"region lies outside the {columns}x{rows} image (column, row order)"
        )
    # Rounding in a resampling (e.g. a Grad-CAM hot spot mapped back) may overshoot.
    points[:, 0] = np.clip(points[:, 0], 0, columns)
    points[:, 1] = np.clip(points[:, 1], 0, rows)
    points = _without_repeats(points)
    if len(np.unique(points, axis=0)) < 3 or polygon_area(points) == 0.0:
        raise RegionError("region needs at least three distinct points enclosing an area")
    return np.vstack([points, points[:1]]).astype(np.float32)


def _without_repeats(points: np.ndarray) -> np.ndarray:
    """The ring of ``points`` (closing point dropped) without consecutive repeats."""
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    keep[0] = True
    ring = points[keep]
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    return ring


def polygon_area(points: np.ndarray) -> float:
    """Absolute area of the polygon through ``points`` (shoelace)."""
    x, y = points[:, 0], points[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


def outline_points(contour: np.ndarray) -> np.ndarray:
    """Outline (N, 2) of one connected part of a mask from its OpenCV contour, in image
    coordinates ((0, 0) is the top-left corner of the top-left pixel).

    The outline runs through the centres of the part's boundary pixels; for a part whose
    centres enclose no area (one pixel, or a line one pixel wide) it is the rectangle around
    its pixels instead, so that every part, however small, has an outline a viewer can draw.
    """
    points = contour.reshape(-1, 2).astype(np.float64) + 0.5
    if len(np.unique(points, axis=0)) >= 3 and polygon_area(points) > 0.0:
        return points
    x, y, w, h = cv2.boundingRect(contour.reshape(-1, 1, 2).astype(np.int32))
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)


def mask_parts(mask: np.ndarray) -> list[np.ndarray]:
    """OpenCV contours of every connected part of a 2D mask, the largest first."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    def size(contour: np.ndarray) -> tuple[float, int]:
        _, _, width, height = cv2.boundingRect(contour)
        return cv2.contourArea(contour), width * height  # a one-pixel-wide part has no area

    return sorted(contours, key=size, reverse=True)


def largest_outline(mask: np.ndarray) -> np.ndarray | None:
    """Closed outline of the largest connected part of a 2D mask (see :func:`outline_points`),
    as float32; None for an empty mask."""
    parts = mask_parts(mask)
    if not parts:
        return None
    points = outline_points(parts[0])
    return np.vstack([points, points[:1]]).astype(np.float32)


def pixel_area_mm2(image: Dataset) -> float:
    """Area of one pixel of a cross-sectional image (PixelSpacing), in mm²."""
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    return row_spacing * column_spacing
