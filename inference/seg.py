"""DICOM Segmentation (SEG) of the lungs in a chest MRI series.

A BINARY SEG with one segment per lung, built with highdicom's
:class:`~highdicom.seg.Segmentation` from a label volume aligned with
:func:`inference.geometry.sort_series` order. The segments' tracking
identifiers and UIDs are the ones the lung report (:mod:`inference.sr.lung`)
gives each lung's measurements.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_ROOT_UID

from inference.codes import ANATOMICAL_STRUCTURE, LEFT_LUNG, RIGHT_LUNG
from inference.determinism import (
    ResultUIDs,
    pin_generated_values,
    resolve_datetime,
    slug,
    sop_kwargs,
)
from inference.geometry import sort_series
from inference.results import (
    LO_MAX,
    NOT_FOR_DIAGNOSIS,
    PIPELINE_LUNG_MRI,
    AlgorithmIdentity,
    LabelVolumeError,
)

__all__ = [
    "LEFT_LABEL",
    "LEFT_RGB",
    "LUNG_SEG_SERIES_NUMBER",
    "RIGHT_LABEL",
    "RIGHT_RGB",
    "lung_segmentation",
]

LUNG_SEG_SERIES_NUMBER = 9011
# Label values of the label volume, which are also the segment numbers.
LEFT_LABEL = 1
RIGHT_LABEL = 2
# Distinct display colours (sRGB) for the segments: blue left, orange right.
LEFT_RGB = (66, 135, 245)
RIGHT_RGB = (245, 150, 40)


def _check_labels(labels: np.ndarray, ordered: Sequence[Dataset]) -> np.ndarray:
    array = np.asarray(labels)
    expected = (len(ordered), int(ordered[0].Rows), int(ordered[0].Columns))
    if array.shape != expected:
        raise LabelVolumeError(
            f"label volume has shape {array.shape}, the series needs {expected} "
            "(slices, rows, columns)"
        )
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise LabelVolumeError(f"label volume must be integer, got {array.dtype}")
    unexpected = set(np.unique(array).tolist()) - {0, LEFT_LABEL, RIGHT_LABEL}
    if unexpected:
        raise LabelVolumeError(
            f"label volume may hold only 0 (background), 1 (left lung) and "
            f"2 (right lung), found {sorted(unexpected)}"
        )
    return array.astype(np.uint8)


def _lung_segment(
    number: int,
    code: Code,
    rgb: tuple[int, int, int],
    algorithm: AlgorithmIdentity,
    uids: ResultUIDs,
) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=code.meaning,
        segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.seg_identification(),
        tracking_uid=uids(f"tracking-{slug(code.meaning)}"),
        tracking_id=code.meaning,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )


def lung_segmentation(
    sources: Sequence[Dataset],
    labels: np.ndarray,
    algorithm: AlgorithmIdentity,
    *,
    pipeline: str = PIPELINE_LUNG_MRI,
    content_datetime: dt.datetime | None = None,
    series_number: int = LUNG_SEG_SERIES_NUMBER,
    uid_prefix: str = PYDICOM_ROOT_UID,
) -> hd.seg.Segmentation:
    """BINARY SEG with segments 1 "Left lung" and 2 "Right lung".

    ``labels`` is (slices, rows, columns) with 0 background, 1 left and 2 right
    lung, aligned with :func:`~inference.geometry.sort_series` order. Every slice
    gets a frame per segment, empty or not, so a viewer cannot shift the overlay.
    """
    ordered = sort_series(sources)
    label_volume = _check_labels(labels, ordered)
    uids = ResultUIDs(
        str(ordered[0].SeriesInstanceUID), pipeline, algorithm.version, uid_prefix
    )
    when = resolve_datetime(ordered[0], content_datetime)
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=label_volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _lung_segment(LEFT_LABEL, LEFT_LUNG, LEFT_RGB, algorithm, uids),
            _lung_segment(RIGHT_LABEL, RIGHT_LUNG, RIGHT_RGB, algorithm, uids),
        ],
        series_instance_uid=uids("seg-series"),
        series_number=series_number,
        sop_instance_uid=uids("seg-instance"),
        instance_number=1,
        omit_empty_frames=False,
        content_label="LUNGS",
        content_description=f"Automatic lung segmentation - {NOT_FOR_DIAGNOSIS}"[:LO_MAX],
        **sop_kwargs(algorithm, f"cradle AI: lung segmentation ({algorithm.version})", when),
    )
    pin_generated_values(seg, when, uids("seg-dimension-organization"))
    return seg
