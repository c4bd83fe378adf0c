"""TID 1500 report of the lung volumes of a chest MRI series, referencing its SEG.

Viewer compatibility (OHIF 3.13, see :mod:`inference.sr.tid1500`): per lung, the
TID 1411 volumetric group (SEG segment, volume) and the TID 1410 planar group
(outline on the lung's largest slice, area on that slice) carry the same
tracking identifier and UID as the SEG segment: one tracked entity, drawn as one
outline labelled "Volume: 44.36 mL". A lung the model did not find (its segment
is empty on every slice) has neither group: the report says so in words, in
"Qualitative Evaluations", and gives it no volume.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_ROOT_UID

from inference.codes import (
    ANATOMICAL_STRUCTURE,
    AREA,
    COMMENT,
    LEFT_LUNG,
    MILLILITER,
    MRI_OF_CHEST,
    RIGHT_LUNG,
    SQUARE_MILLIMETER,
    VOLUME,
)
from inference.determinism import ResultUIDs, resolve_datetime
from inference.geometry import largest_outline, pixel_area_mm2, sort_series
from inference.results import PIPELINE_LUNG_MRI, AlgorithmIdentity, LungVolumes, WriterInputError
from inference.sr.tid1500 import comprehensive_3d_sr, measurement, tracking

__all__ = ["LUNG_SR_SERIES_NUMBER", "NOT_FOUND_TEXT", "lung_report"]

LUNG_SR_SERIES_NUMBER = 9012
NOT_FOUND_TEXT = "{lung}: not found by the segmentation model (empty segment); no outline or volume"
"""What the report says of a lung the model did not find."""


def _segment_number(segmentation: hd.seg.Segmentation, code: Code) -> int:
    numbers = segmentation.get_segment_numbers(segmented_property_type=code)
    if len(numbers) != 1:
        raise WriterInputError(
            f"segmentation must hold exactly one {code.meaning!r} segment, found {numbers}"
        )
    return numbers[0]


def _segment_tracking_uid(segmentation: hd.seg.Segmentation, number: int) -> str | None:
    for item in segmentation.SegmentSequence:
        if item.SegmentNumber == number:
            return item.get("TrackingUID")
    return None


def _check_segmentation_matches(segmentation: Dataset, ordered: Sequence[Dataset]) -> None:
    if not isinstance(segmentation, hd.seg.Segmentation):
        raise WriterInputError(
            "segmentation must be a highdicom Segmentation (e.g. from "
            f"lung_segmentation or highdicom.seg.segread), got {type(segmentation)}"
        )
    referenced = {
        str(item.SeriesInstanceUID)
        for item in segmentation.get("ReferencedSeriesSequence", [])
    }
    if referenced != {str(ordered[0].SeriesInstanceUID)}:
        raise WriterInputError("segmentation does not reference the source series")
    if str(segmentation.StudyInstanceUID) != str(ordered[0].StudyInstanceUID):
        raise WriterInputError("segmentation belongs to another study")


def _volume_group(
    tracking_identifier: hd.sr.TrackingIdentifier,
    number: int,
    code: Code,
    volume_ml: float,
    ordered: Sequence[Dataset],
    segmentation: hd.seg.Segmentation,
    algorithm: AlgorithmIdentity,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group of a lung: its SEG segment and its volume."""
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking_identifier,
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID,
            sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(
                str(ordered[0].SeriesInstanceUID)
            ),
        ),
        finding_type=code,
        finding_category=ANATOMICAL_STRUCTURE,
        algorithm_id=algorithm.sr_identification(),
        measurements=[measurement(VOLUME, volume_ml, MILLILITER)],
    )


def _outline_group(
    tracking_identifier: hd.sr.TrackingIdentifier,
    code: Code,
    masks: np.ndarray,
    ordered: Sequence[Dataset],
    algorithm: AlgorithmIdentity,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of a lung found by the model: its outline and area on the slice where
    it is largest (however small, it has an outline: :func:`largest_outline`)."""
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    index = int(np.argmax(areas))
    image = ordered[index]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=largest_outline(masks[index]),
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking_identifier,
        referenced_region=region,
        finding_type=code,
        finding_category=ANATOMICAL_STRUCTURE,
        finding_sites=[hd.sr.FindingSite(anatomic_location=code)],
        algorithm_id=algorithm.sr_identification(),
        measurements=[
            measurement(AREA, areas[index] * pixel_area_mm2(image), SQUARE_MILLIMETER),
        ],
    )


def _not_found(code: Code, volume_ml: float) -> Dataset:
    """The statement, in words, that the model did not find a lung."""
    if volume_ml > 0:
        raise WriterInputError(
            f"{code.meaning}: volume {volume_ml} mL, but its segment is empty on every slice"
        )
    return hd.sr.TextContentItem(
        name=COMMENT,
        value=NOT_FOUND_TEXT.format(lung=code.meaning),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _lung_groups(
    number: int,
    code: Code,
    volume_ml: float,
    masks: np.ndarray,
    ordered: Sequence[Dataset],
    segmentation: hd.seg.Segmentation,
    algorithm: AlgorithmIdentity,
    uids: ResultUIDs,
) -> list[Dataset]:
    """TID 1411 volume group for a lung the model found, plus its outline as a TID 1410 group;
    none for a lung it did not find.

    Both groups carry the tracking identifier and UID of the SEG segment: they
    describe one tracked entity, and a viewer that merges groups by tracking UID
    (OHIF) draws the outline labelled with the volume. The outline is on the
    slice where the lung's area is largest, with that slice's area.
    """
    if not masks.any():
        return []
    identifier = tracking(uids, code.meaning, _segment_tracking_uid(segmentation, number))
    return [
        _volume_group(identifier, number, code, volume_ml, ordered, segmentation, algorithm),
        _outline_group(identifier, code, masks, ordered, algorithm),
    ]


def lung_report(
    sources: Sequence[Dataset],
    segmentation: hd.seg.Segmentation,
    volumes_ml: LungVolumes | Mapping[str, float],
    algorithm: AlgorithmIdentity,
    *,
    pipeline: str = PIPELINE_LUNG_MRI,
    content_datetime: dt.datetime | None = None,
    series_number: int = LUNG_SR_SERIES_NUMBER,
    uid_prefix: str = PYDICOM_ROOT_UID,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report of lung volumes, referencing the SEG's segments.

    Per lung: a TID 1411 volumetric group (ReferencedSegment, NUM volume in mL)
    and, for viewers that need image coordinates, a TID 1410 planar group with
    the lung's outline on the slice where it is largest (NUM area on that
    slice), both with the segment's tracking identifier and UID. The outlines
    are taken from ``segmentation`` itself. A lung whose segment is empty gets
    no group and no volume (its volume must be 0), and the sentence
    :data:`NOT_FOUND_TEXT` in "Qualitative Evaluations"; with neither lung
    found, the report's one group is the image assessed
    (:func:`inference.sr.tid1500.image_assessed_group`).
    """
    ordered = sort_series(sources)
    _check_segmentation_matches(segmentation, ordered)
    volumes = LungVolumes.coerce(volumes_ml)
    uids = ResultUIDs(
        str(ordered[0].SeriesInstanceUID), pipeline, algorithm.version, uid_prefix
    )
    left = _segment_number(segmentation, LEFT_LUNG)
    right = _segment_number(segmentation, RIGHT_LUNG)
    masks = segmentation.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in ordered],
        segment_numbers=[left, right],
        dtype=np.uint8,
    )  # (slices, rows, columns, 2)
    lungs = ((left, LEFT_LUNG, volumes.left_ml, masks[..., 0]),
             (right, RIGHT_LUNG, volumes.right_ml, masks[..., 1]))
    groups = [group for number, code, volume, mask in lungs
              for group in _lung_groups(number, code, volume, mask, ordered, segmentation, algorithm, uids)]
    return comprehensive_3d_sr(
        evidence=[*ordered, segmentation],
        library=ordered,
        groups=groups,
        evaluations=[_not_found(code, volume) for _, code, volume, mask in lungs if not mask.any()],
        procedure=MRI_OF_CHEST,
        algorithm=algorithm,
        uids=uids,
        series_number=series_number,
        description=f"cradle AI: lung volumes ({algorithm.version})",
        when=resolve_datetime(ordered[0], content_datetime),
    )
