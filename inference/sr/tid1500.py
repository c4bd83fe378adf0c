"""TID 1500 Measurement Report in a Comprehensive 3D SR, and its building blocks.

Viewer compatibility shapes the SR content (checked against OHIF 3.13, see
``tests/test_ohif.py``):

- NUM items never carry a nested ContentSequence (OHIF drops such measurements);
  the algorithm is identified once per measurement group (TID 4019).
- Every measurement group in "Imaging Measurements" has image coordinates, or
  shares its Tracking Unique Identifier with a group that has them. OHIF merges
  groups by that UID and then reads the first SCOORD of each merged measurement;
  a measurement without one makes it fail ("Something went wrong": "reading
  'ReferencedSOPSequence'"). :func:`comprehensive_3d_sr` refuses such groups; how
  each report keeps to this is described in :mod:`inference.sr.lung` and
  :mod:`inference.sr.radiograph`.
- Every report has at least one such group. OHIF opens any TID 1500 report in its
  measurement viewport, which shows the image of the first measurement and fails
  on a report with none ("Cannot destructure property 'displaySetInstanceUID' of
  'measurement'"), e.g. a radiograph with no finding, or whose findings have no
  region. A report whose results are all image-level statements (qualitative
  evaluations) therefore gets one TID 1410 group for the image it assessed: the
  outline of the whole image, tracked as "Image assessed", naming the algorithm.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.codes import QUALITATIVE_EVALUATIONS, code_key, concept_key
from inference.determinism import ResultUIDs, pin_generated_values, slug, sop_kwargs
from inference.results import AlgorithmIdentity, WriterInputError
from inference.sr.image_library import image_library
from inference.uids import device_uid

__all__ = [
    "IMAGE_ASSESSED",
    "check_viewable",
    "comprehensive_3d_sr",
    "image_assessed_group",
    "measurement",
    "tracking",
    "with_children",
]

IMAGE_ASSESSED = "Image assessed"
"""Tracking identifier of the whole-image group of a report without regions."""


def tracking(uids: ResultUIDs, label: str, uid: str | None = None) -> hd.sr.TrackingIdentifier:
    """Tracking identifier ``label``, with ``uid`` or one derived from the label."""
    return hd.sr.TrackingIdentifier(
        uid=uid or uids(f"tracking-{slug(label)}"), identifier=label
    )


def measurement(name: Code, value: float, unit: Code) -> hd.sr.Measurement:
    """A bare TID 300 NUM: no nested content (see the module docstring)."""
    return hd.sr.Measurement(name=name, value=float(value), unit=unit)


def with_children(item: Dataset, children: Sequence[Dataset]) -> Dataset:
    """``item`` with ``children`` as its content."""
    item.ContentSequence = hd.sr.ContentSequence(list(children))
    return item


def _observation_context(algorithm: AlgorithmIdentity, prefix: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm.name, algorithm.version, prefix=prefix),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=algorithm.version,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _complete_content(
    content: hd.sr.ContentSequence,
    library: Sequence[Dataset],
    evaluations: Sequence[Dataset],
) -> None:
    """Add the image library and "Qualitative Evaluations" to highdicom's report content."""
    # Row 4, after the procedure reported (row 3), as highdicom would place it.
    procedure_rows = [
        i for i, item in enumerate(content)
        if concept_key(item) == code_key(codes.DCM.ProcedureReported)
    ]
    content.insert(procedure_rows[-1] + 1, image_library(library))
    if evaluations:
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        content.append(with_children(container, evaluations))


def _measurement_report(
    *,
    algorithm: AlgorithmIdentity,
    uids: ResultUIDs,
    procedure: Code,
    library: Sequence[Dataset],
    groups: Sequence[Dataset],
    evaluations: Sequence[Dataset],
) -> hd.sr.MeasurementReport:
    """TID 1500 with "Imaging Measurements" (row 6) holding ``groups`` and, when there are
    ``evaluations``, a "Qualitative Evaluations" container (row 12) holding them
    (highdicom 0.28 does not build row 12)."""
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm, uids.prefix),
        procedure_reported=procedure,
        imaging_measurements=list(groups),
    )
    _complete_content(report[0].ContentSequence, library, evaluations)
    return report


def _group_items(group: Sequence[Dataset]) -> Sequence[Dataset]:
    """The content items of a measurement group (a highdicom template: one CONTAINER)."""
    (container,) = group
    return container.get("ContentSequence", [])


def _has_image_coordinates(group: Sequence[Dataset]) -> bool:
    return any(item.ValueType in ("SCOORD", "SCOORD3D") for item in _group_items(group))


def _tracking(group: Sequence[Dataset]) -> tuple[str, str]:
    """(Tracking Unique Identifier, Tracking Identifier) of a measurement group."""
    items = _group_items(group)
    uid = next((str(i.UID) for i in items if i.ValueType == "UIDREF"), "")
    label = next((str(i.TextValue) for i in items if i.ValueType == "TEXT"
                  and concept_key(i) == code_key(codes.DCM.TrackingIdentifier)), "")
    return uid, label


def check_viewable(groups: Sequence[Sequence[Dataset]]) -> None:
    """Every tracked entity has image coordinates in one of its groups (module docstring)."""
    placed = {_tracking(g)[0] for g in groups if _has_image_coordinates(g)}
    unplaced = sorted({_tracking(g)[1] for g in groups if _tracking(g)[0] not in placed})
    if unplaced:
        raise WriterInputError(
            f"measurement groups without image coordinates (shared by no group with them): {unplaced}"
        )


def image_assessed_group(
    image: Dataset, algorithm: AlgorithmIdentity, uids: ResultUIDs
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group whose region is the whole of ``image``: the image the algorithm assessed."""
    columns, rows = float(image.Columns), float(image.Rows)
    outline = np.array(
        [[0.0, 0.0], [columns, 0.0], [columns, rows], [0.0, rows], [0.0, 0.0]], dtype=np.float32
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(uids, IMAGE_ASSESSED),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=hd.sr.SourceImageForRegion.from_source_image(image),
        ),
        algorithm_id=algorithm.sr_identification(),
    )


def comprehensive_3d_sr(
    *,
    evidence: Sequence[Dataset],
    library: Sequence[Dataset],
    groups: Sequence[Dataset],
    evaluations: Sequence[Dataset] = (),
    procedure: Code,
    algorithm: AlgorithmIdentity,
    uids: ResultUIDs,
    series_number: int,
    description: str,
    when: dt.datetime,
) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR holding a TID 1500 report of ``groups`` (measurement groups)
    and ``evaluations`` (qualitative evaluations), its image library listing ``library``.

    Without ``groups``, the report's one group is :func:`image_assessed_group` on the middle
    image of ``library`` (see the module docstring).
    """
    if not groups and not evaluations:
        raise WriterInputError("a report needs measurement groups or qualitative evaluations")
    check_viewable(groups)
    if not groups:
        groups = [image_assessed_group(library[len(library) // 2], algorithm, uids)]
    report = _measurement_report(
        algorithm=algorithm,
        uids=uids,
        procedure=procedure,
        library=library,
        groups=groups,
        evaluations=evaluations,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=uids("sr-series"),
        series_number=series_number,
        sop_instance_uid=uids("sr-instance"),
        instance_number=1,
        is_complete=True,
        is_final=False,
        is_verified=False,
        performed_procedure_codes=[procedure],
        **sop_kwargs(algorithm, description, when),
    )
    pin_generated_values(sr, when)
    return sr
