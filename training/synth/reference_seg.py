"""Reference lung segmentations "made by a reviewer": DICOM SEG (BINARY) over an MR series.

highdicom fills a few values from the clock and from random UIDs; they are pinned here
(`_make_reproducible`) so the same series gives the same bytes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from inference.determinism import pin_generated_values
from training.synth.attributes import INSTITUTION_NAME, MANUFACTURER, SOFTWARE_VERSION, SYNTHETIC_COMMENT
from training.synth.mri import LEFT_LUNG, RIGHT_LUNG
from training.synth.patients import synth_uid

_ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
_LUNG_SEGMENTS = ((LEFT_LUNG, "Left lung", "44029006"), (RIGHT_LUNG, "Right lung", "3341006"))


def _segment_descriptions() -> list[hd.seg.SegmentDescription]:
    category = hd.sr.CodedConcept(_ANATOMICAL_STRUCTURE[0], "SCT", _ANATOMICAL_STRUCTURE[1])
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, label, code in _LUNG_SEGMENTS
    ]


def make_reference_seg(series: Sequence[Dataset], labels: np.ndarray) -> hd.seg.Segmentation:
    """A reviewer's lung mask as BINARY SEG (one frame per slice and segment, empties kept).

    UIDs and dates derive from the source series, so the same input gives the same bytes.
    """
    first = series[0]
    if labels.shape != (len(series), first.Rows, first.Columns):
        expected = (len(series), first.Rows, first.Columns)
        raise ValueError(f"labels {labels.shape} do not match the series {expected}")
    source_uid = first.SeriesInstanceUID
    reviewed = dt.datetime.strptime(first.StudyDate + first.StudyTime[:6], "%Y%m%d%H%M%S") + dt.timedelta(days=1)
    seg = hd.seg.Segmentation(
        source_images=list(series),
        pixel_array=labels.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(),
        series_instance_uid=synth_uid(source_uid, "reference-seg", "series"),
        series_number=900,
        sop_instance_uid=synth_uid(source_uid, "reference-seg", "instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="synth-reviewer",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="SYN-SEG",
        content_description="Reference lung segmentation",
        content_creator_name="Reviewer^Synthetic",
        content_label="LUNGS",
        omit_empty_frames=False,
        series_description="Reference lung segmentation (synthetic)",
        institution_name=INSTITUTION_NAME,
        content_date=reviewed.date(),
        content_time=reviewed.time(),
        series_date=reviewed.date(),
        series_time=reviewed.time(),
    )
    pin_generated_values(seg, reviewed, synth_uid(source_uid, "reference-seg", "dimension-organization"))
    seg.ImageComments = SYNTHETIC_COMMENT
    return seg

