"""TID 1500 report on one radiograph: the view, the findings the pipeline ran, and in words the
tasks that did not apply to this film and why.

Viewer compatibility (OHIF 3.13, see :mod:`inference.sr.tid1500`):

- a finding with a region is a TID 1410 planar group (the region, probability
  and threshold in %, the call); the view classifier's result and findings
  without a region are TID 1500 "Qualitative Evaluations" (row 12), which OHIF
  does not try to place. A multiclass finding (pneumonia by type) is a
  qualitative evaluation too: the called class, with each class's probability
  (in %, named by the class's code). A numeric estimate (bone age) is a TEXT
  evaluation stating it in words, with the value (in its UCUM units) and the
  value it is read beside (the chronological age) as NUMs: a measurement group
  without image coordinates would make OHIF's SR viewport fail.
- Probabilities and thresholds are in percent (UCUM ``%``): OHIF draws a NUM as
  "<concept name>: <value with 2 decimals> <UCUM code>", so "Probability: 83.00 %"
  where a fraction would read "0.83 1". OHIF draws NUMs only (no CODE or TEXT),
  so the finding's name and its call are in the SR but not on the drawn label.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_ROOT_UID

from inference.codes import (
    COMMENT,
    IMAGE_VIEW,
    NEGATIVE,
    PERCENT,
    PLAIN_CHEST_XRAY,
    PLAIN_RADIOGRAPHY,
    POSITIVE,
    PROBABILITY,
    THRESHOLD_VALUE,
)
from inference.determinism import ResultUIDs, resolve_datetime, slug
from inference.geometry import check_source_image, closed_polygon
from inference.results import (PIPELINE_CXR, SHADOW_RUN, AlgorithmIdentity, ClassCall, Estimate, Finding, ViewResult,
                               WriterInputError)
from inference.sr.tid1500 import comprehensive_3d_sr, measurement, tracking, with_children

__all__ = ["CXR_SR_SERIES_NUMBER", "cxr_report"]

CXR_SR_SERIES_NUMBER = 9001
Result = Finding | ClassCall | Estimate
"""What a radiograph's finding task hands the writer, by its kind: binary, multiclass, regression."""
_UT_LIMIT = 1024
"""A TEXT content item's value is UT; kept short as any comment."""


def _percent(fraction: float) -> float:
    """A probability or threshold given in [0, 1], as a percentage (UCUM "%")."""
    return round(float(fraction) * 100.0, 6)


def _probability_measurements(probability: float, threshold: float) -> list[hd.sr.Measurement]:
    """Probability first: OHIF draws the NUMs in order, "Probability: 83.00 %"."""
    return [
        measurement(PROBABILITY, _percent(probability), PERCENT),
        measurement(THRESHOLD_VALUE, _percent(threshold), PERCENT),
    ]


def _call(finding: Finding) -> Code:
    return POSITIVE if finding.positive else NEGATIVE


def _property(name: Code, value: float, unit: Code) -> hd.sr.NumContentItem:
    """A NUM (no nested content) that is a property of a qualitative evaluation."""
    return hd.sr.NumContentItem(
        name=name,
        value=float(value),
        unit=unit,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
    )


def _view_evaluation(view: ViewResult, algorithm: AlgorithmIdentity) -> Dataset:
    """TID 1500 row 14 TEXT item: the view classifier's label (as text: its
    classes have no standard codes) with its algorithm and probability."""
    view_item = hd.sr.TextContentItem(
        name=IMAGE_VIEW,
        value=view.label,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    with_children(
        view_item,
        [
            *(view.algorithm or algorithm).sr_identification(),
            _property(PROBABILITY, _percent(view.probability), PERCENT),
        ],
    )
    return view_item


def _class_evaluation(finding: ClassCall, algorithm: AlgorithmIdentity) -> Dataset:
    """TID 1500 row 13 CODE item of a multiclass finding: the called class, with its algorithm and
    each class's probability in % (a NUM named by the class's code), in the model's class order."""
    item = hd.sr.CodeContentItem(name=finding.code, value=finding.call,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    children: list[Dataset] = [*(finding.algorithm or algorithm).sr_identification()]
    children += [_property(code, _percent(probability), PERCENT) for code, probability in finding.probabilities]
    return with_children(item, children)


def _estimate_evaluation(estimate: Estimate, algorithm: AlgorithmIdentity) -> Dataset:
    """TID 1500 row 14 TEXT item of a numeric estimate: in words ("96.5 months; age 90.0 months"),
    with its algorithm, the estimate as a NUM in its units and the value it is read beside."""
    words = f"{estimate.value:.1f} {estimate.unit.meaning}s"
    children: list[Dataset] = [*(estimate.algorithm or algorithm).sr_identification(),
                               _property(estimate.code, estimate.value, estimate.unit)]
    if estimate.beside is not None:
        code, value = estimate.beside
        words += f"; {code.meaning.lower()} {value:.1f} {estimate.unit.meaning}s"
        children.append(_property(code, value, estimate.unit))
    item = hd.sr.TextContentItem(name=estimate.code, value=words,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    return with_children(item, children)


def _finding_evaluation(finding: Finding, algorithm: AlgorithmIdentity) -> Dataset:
    """TID 1500 row 13 CODE item for a finding without a region: the finding
    and its call (Positive/Negative), with its algorithm, probability, threshold
    and, when it says more than the code, its label as a comment."""
    item = hd.sr.CodeContentItem(
        name=finding.code,
        value=_call(finding),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    children: list[Dataset] = [
        *(finding.algorithm or algorithm).sr_identification(),
        _property(PROBABILITY, _percent(finding.probability), PERCENT),
        _property(THRESHOLD_VALUE, _percent(finding.threshold), PERCENT),
    ]
    if finding.tracking_label != finding.code.meaning:
        children.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=finding.tracking_label,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            )
        )
    return with_children(item, children)


def _finding_group(
    source: Dataset,
    finding: Finding,
    algorithm: AlgorithmIdentity,
    uids: ResultUIDs,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 planar ROI group of a finding with a region: the closed region on
    the radiograph, probability and threshold in %, and the call."""
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=closed_polygon(finding.region, source),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(uids, finding.tracking_label),
        referenced_region=region,
        finding_type=finding.code,
        algorithm_id=(finding.algorithm or algorithm).sr_identification(),
        measurements=_probability_measurements(finding.probability, finding.threshold),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(finding.code, _call(finding))],
    )


def _check_cxr_inputs(source: Dataset, view: ViewResult, findings: Sequence[Result]) -> None:
    check_source_image(source)
    if not isinstance(view, ViewResult):
        raise WriterInputError(f"view must be a ViewResult, got {type(view)}")
    if not all(isinstance(f, (Finding, ClassCall, Estimate)) for f in findings):
        raise WriterInputError("findings must all be Finding, ClassCall or Estimate instances")
    # Tracking UIDs are derived from the labels, so labels must stay distinct.
    slugs = [slug(f.tracking_label) for f in findings]
    if len(set(slugs)) != len(slugs):
        raise WriterInputError(
            f"findings repeat a label: {[f.tracking_label for f in findings]}"
        )


def cxr_report(
    source: Dataset,
    view: ViewResult,
    findings: Sequence[Result],
    algorithm: AlgorithmIdentity,
    *,
    model_version_tag: str | None = None,
    pipeline: str = PIPELINE_CXR,
    content_datetime: dt.datetime | None = None,
    series_number: int = CXR_SR_SERIES_NUMBER,
    uid_prefix: str = PYDICOM_ROOT_UID,
    not_applicable: Sequence[tuple[str, str]] = (),
    chest: bool = True,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report on one radiograph.

    Always states the view in "Qualitative Evaluations": its label and
    probability. Each finding the pipeline ran is reported (the pipeline decides
    which apply to the film): a binary finding with a region is a TID 1410
    planar ROI group (drawn by viewers); one without is a qualitative evaluation
    (finding = Positive/Negative, with its probability and threshold); a class
    call and an estimate are qualitative evaluations (see the module docstring).
    ``model_version_tag`` is what the UIDs are
    derived from (default ``algorithm.version``); pass a tag that covers every
    model behind the report (view, BPD, pneumonia) so that a new version of any
    of them gives a new result series. ``not_applicable`` lists (task description, reason) for the
    tasks the image is outside the population of: each is stated as a comment, in words. ``chest``:
    the procedure reported is a plain chest X-ray, else plain radiography (an extremity, a hand).
    """
    findings = list(findings)
    _check_cxr_inputs(source, view, findings)
    version = model_version_tag or algorithm.version
    uids = ResultUIDs(str(source.SeriesInstanceUID), pipeline, version, uid_prefix)
    groups: list[Dataset] = []
    evaluations: list[Dataset] = [_view_evaluation(view, algorithm)]
    if not algorithm.clinical:
        evaluations.append(hd.sr.TextContentItem(name=COMMENT, value=f"{SHADOW_RUN} ({version})",
                                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    evaluations += [hd.sr.TextContentItem(name=COMMENT, value=f"{task}: not applicable ({reason})"[:_UT_LIMIT],
                                          relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
                    for task, reason in not_applicable]
    for finding in findings:
        if isinstance(finding, ClassCall):
            evaluations.append(_class_evaluation(finding, algorithm))
        elif isinstance(finding, Estimate):
            evaluations.append(_estimate_evaluation(finding, algorithm))
        elif finding.region is None:
            evaluations.append(_finding_evaluation(finding, algorithm))
        else:
            groups.append(_finding_group(source, finding, algorithm, uids))
    return comprehensive_3d_sr(
        evidence=[source],
        library=[source],
        groups=groups,
        evaluations=evaluations,
        procedure=PLAIN_CHEST_XRAY if chest else PLAIN_RADIOGRAPHY,
        algorithm=algorithm,
        uids=uids,
        series_number=series_number,
        description=f"cradle AI: {'chest X-ray' if chest else 'radiograph'} ({version})",
        when=resolve_datetime(source, content_datetime),
    )
