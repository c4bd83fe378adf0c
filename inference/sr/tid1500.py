"""TID 1500 Measurement Report in a Comprehensive 3D SR, and its building blocks.

Viewer compatibility shapes the SR content (checked against OHIF 3.13, see
``tests/test_ohif.py``):

- NUM items never carry a nested ContentSequence (OHIF drops such measurements);
  the algorithm is identified once per measurement group (TID 4019).
- Every measurement group in "Imaging Measurements" has image coordinates, or
  shares its Tracking Unique Identifier with a group that has them. OHIF merges
  groups by that UID and then reads the first SCOORD of each merged measurement;
  a measurement without one makes it fail ("Something went wrong"). How each
  report keeps to this is described in :mod:`inference.sr.lung` and
  :mod:`inference.sr.radiograph`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.codes import QUALITATIVE_EVALUATIONS, code_key, concept_key
from inference.determinism import ResultUIDs, pin_generated_values, slug, sop_kwargs
from inference.results import AlgorithmIdentity, WriterInputError
from inference.sr.image_library import image_library
from inference.uids import device_uid

__all__ = ["comprehensive_3d_sr", "measurement", "tracking", "with_children"]


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


def _is_container(item: Dataset, code: Code) -> bool:
    return item.ValueType == "CONTAINER" and (
        item.ConceptNameCodeSequence[0].CodeValue == code.value
        and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == code.scheme_designator
    )


def _complete_content(
    content: hd.sr.ContentSequence,
    library: Sequence[Dataset],
    has_groups: bool,
    evaluations: Sequence[Dataset],
) -> None:
    """Add the image library and "Qualitative Evaluations" to highdicom's report content,
    and drop its "Imaging Measurements" when it holds only a placeholder."""
    # Row 4, after the procedure reported (row 3), as highdicom would place it.
    procedure_rows = [
        i for i, item in enumerate(content)
        if concept_key(item) == code_key(codes.DCM.ProcedureReported)
    ]
    content.insert(procedure_rows[-1] + 1, image_library(library))
    if not has_groups:
        (index,) = [
            i for i, item in enumerate(content)
            if _is_container(item, codes.DCM.ImagingMeasurements)
        ]
        del content[index]
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
    """TID 1500 with "Imaging Measurements" (row 6) holding ``groups`` and a
    "Qualitative Evaluations" container (row 12) holding ``evaluations``.

    highdicom 0.28 builds neither row 12 nor a report without measurement groups
    (TID 1500 needs row 6 or row 12, not both), so both are done here.
    """
    if not groups and not evaluations:
        raise WriterInputError("a report needs measurement groups or qualitative evaluations")
    placeholder = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids("tracking-placeholder"), identifier="placeholder"
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm, uids.prefix),
        procedure_reported=procedure,
        imaging_measurements=list(groups) or [placeholder],
    )
    _complete_content(report[0].ContentSequence, library, bool(groups), evaluations)
    return report


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
    and ``evaluations`` (qualitative evaluations), its image library listing ``library``."""
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
