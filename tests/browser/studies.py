"""Studies for the browser test: synthetic source images plus cradle's SEG and SR, as files.

The source images come from ``training.synth`` (the synthetic neonatal CR and MR
generator); the results are made by ``inference.seg`` and ``inference.sr`` exactly as the
pipelines make them. For the MR study the SEG is written from the generator's own lung label
volume, standing in for a model's output, and the volumes come from that label volume.

:data:`SR_VARIANTS` lists every shape of report the browser test opens in OHIF's SR viewport,
one entry per shape: a new kind of SR content is one more entry.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import torch
from pydicom import Dataset

from config.tasks import load_catalogue
from inference.codes import BRONCHOPULMONARY_DYSPLASIA, LEFT_LUNG, PNEUMONIA, RIGHT_LUNG
from inference.geometry import polygon_area, sort_series
from inference.gradcam import grad_cam, hot_spot_polygons, upsample
from inference.models import create_model
from inference.pipelines.cxr import DAYS_PER_MONTH, classify, code_of
from inference.preprocess import letterbox, modality_values, normalise
from inference.results import AlgorithmIdentity, ClassCall, Estimate, Finding, ViewResult
from inference.seg import LEFT_LABEL, RIGHT_LABEL, lung_segmentation
from inference.sr.lung import lung_report
from inference.sr.radiograph import cxr_report
from inference.sr.tid1500 import IMAGE_ASSESSED
from training import synth
from training.synth.hand import make_hand
from training.synth.patients import make_child, make_study

ALGORITHM_LUNG = AlgorithmIdentity(name="cradle-lung-mri", version="browser-test-1")
ALGORITHM_CXR = AlgorithmIdentity(name="cradle-cxr", version="browser-test-1")
MR_SHAPE = (24, 128, 128)
CXR_SIZE = 512


@dataclass
class Study:
    """Files of one study and what OHIF should show for it."""

    study_uid: str
    files: list[Path]
    source_series_uid: str
    seg_series_uid: str | None = None
    sr_series_uid: str | None = None
    sr_series_number: int | None = None
    #: Segment labels the SEG carries, and their display colours (sRGB, from
    #: RecommendedDisplayCIELabValue).
    segment_labels: list[str] = field(default_factory=list)
    segment_rgb: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: Tracking identifiers (OHIF measurement labels) of the SR's planar ROIs: what OHIF
    #: must place on the images, each exactly once.
    roi_labels: list[str] = field(default_factory=list)
    volumes_ml: dict[str, float] = field(default_factory=dict)


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def mr_study(outdir: Path, seed: int = 11, not_found: tuple[int, ...] = ()) -> Study:
    """A neonatal chest MR series, its lung SEG and the lung-volume SR; the lungs labelled
    ``not_found`` (:data:`~inference.seg.LEFT_LABEL`, ``RIGHT_LABEL``) are left out of the
    label volume, as when the model does not find them."""
    series, labels = synth.make_mr_series(np.random.default_rng(seed), shape=MR_SHAPE)
    ordered = sort_series(series)
    # make_mr_series gives labels in InstanceNumber order; sort_series in slice order.
    by_uid = {str(ds.SOPInstanceUID): labels[k] for k, ds in enumerate(series)}
    labels = np.stack([by_uid[str(ds.SOPInstanceUID)] for ds in ordered])
    labels = np.where(np.isin(labels, not_found), 0, labels).astype(labels.dtype)
    truth = synth.lung_volumes_ml(series, labels)  # 0 for a lung not found
    volumes = {"left": truth["left"], "right": truth["right"]}
    seg = lung_segmentation(ordered, labels, ALGORITHM_LUNG)
    sr = lung_report(ordered, seg, volumes, ALGORITHM_LUNG)
    folder = outdir / f"mr-{seed}"
    files = [_save(ds, folder / f"{i:03d}.dcm") for i, ds in enumerate(ordered)]
    files.append(_save(seg, folder / "seg.dcm"))
    files.append(_save(sr, folder / "sr.dcm"))
    found = [code.meaning for code, label in ((LEFT_LUNG, LEFT_LABEL), (RIGHT_LUNG, RIGHT_LABEL))
             if label not in not_found]
    return Study(
        study_uid=str(ordered[0].StudyInstanceUID),
        files=files,
        source_series_uid=str(ordered[0].SeriesInstanceUID),
        seg_series_uid=str(seg.SeriesInstanceUID),
        sr_series_uid=str(sr.SeriesInstanceUID),
        sr_series_number=int(sr.SeriesNumber),
        segment_labels=[str(item.SegmentLabel) for item in seg.SegmentSequence],
        segment_rgb={
            str(item.SegmentLabel): hd.color.CIELabColor.from_dicom_value(
                item.RecommendedDisplayCIELabValue
            ).to_rgb(clip=True)
            for item in seg.SegmentSequence
            if "RecommendedDisplayCIELabValue" in item
        },
        roi_labels=found or [IMAGE_ASSESSED],
        volumes_ml=volumes,
    )


def _cxr_study(outdir: Path, name: str, source: Dataset, findings: list[Finding | ClassCall | Estimate],
               view: ViewResult | None = None, chest: bool = True) -> Study:
    """The radiograph and its SR, as the cxr pipeline writes it for ``findings``."""
    view = view or ViewResult(label="chest_frontal", probability=0.97, is_frontal_chest=True)
    sr = cxr_report(source, view, findings, ALGORITHM_CXR, chest=chest)
    files = [_save(source, outdir / name / "cr.dcm"), _save(sr, outdir / name / "sr.dcm")]
    placed = [f.tracking_label for f in findings if getattr(f, "region", None) is not None]
    return Study(
        study_uid=str(source.StudyInstanceUID),
        files=files,
        source_series_uid=str(source.SeriesInstanceUID),
        sr_series_uid=str(sr.SeriesInstanceUID),
        sr_series_number=int(sr.SeriesNumber),
        roi_labels=placed or [IMAGE_ASSESSED],
    )


def cr_study(outdir: Path, seed: int = 5) -> Study:
    """A day-1 neonatal chest CR and its SR: one finding with a region (a hot spot),
    one without, and the view."""
    source = synth.make_cxr(np.random.default_rng(seed), modality="CR", size=CXR_SIZE)
    rows, cols = int(source.Rows), int(source.Columns)
    # A hot-spot polygon over the patient's left lower zone (image right).
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    region = np.stack([cols * (0.64 + 0.07 * np.cos(t)), rows * (0.55 + 0.08 * np.sin(t))], axis=1)
    finding = Finding(
        code=PNEUMONIA, probability=0.83, threshold=0.5, positive=True, region=region
    )
    # An image-level finding without a region: reported, but not drawn.
    risk = Finding(
        code=BRONCHOPULMONARY_DYSPLASIA,
        probability=0.64,
        threshold=0.5,
        positive=True,
        label="BPD risk (moderate/severe)",
    )
    return _cxr_study(outdir, "cr", source, [finding, risk])


def cxr_no_finding(outdir: Path, seed: int = 6) -> Study:
    """Every finding negative: no region anywhere, only image-level statements."""
    source = synth.make_cxr(np.random.default_rng(seed), modality="CR", size=CXR_SIZE)
    findings = [
        Finding(code=BRONCHOPULMONARY_DYSPLASIA, probability=0.21, threshold=0.5, positive=False,
                label="BPD risk (moderate/severe)"),
        Finding(code=PNEUMONIA, probability=0.08, threshold=0.5, positive=False),
    ]
    return _cxr_study(outdir, "cxr-no-finding", source, findings)


GRADCAM_INPUT = 256
"""Model input size for the untrained models' maps (an 8 x 8 last stage for resnet18)."""
GRADCAM_SEEDS = {"parts": 0, "tiny": 4, "zero": 3, "zero too": 10}
"""Initialisation seeds of untrained resnet18s whose maps on the seed-21 film have: six parts,
three at the image's edge; a large part and a part of two model pixels; nothing at all (also on
the seed-22 film, twice: the gradient-weighted activations are negative everywhere, so ReLU
leaves nothing)."""


def gradcam_regions(source: Dataset, seed: int) -> list[np.ndarray]:
    """Hot-spot outlines of an untrained (random, seeded) resnet18's Grad-CAM map on ``source``,
    made as the cxr pipeline makes them; the largest first."""
    image, box = letterbox(normalise(modality_values(source), "minmax_0.5pct"), GRADCAM_INPUT)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model("resnet18", "bpd")
    features, _ = classify(model, image[None], torch.device("cpu"))
    return hot_spot_polygons(upsample(grad_cam(model, features), box))


def _at_edge(region: np.ndarray, source: Dataset, margin: float) -> bool:
    columns, rows = int(source.Columns), int(source.Rows)
    return bool(region.min() <= margin or region[:, 0].max() >= columns - margin
                or region[:, 1].max() >= rows - margin)


def cxr_gradcam_findings(outdir: Path, seed: int = 21) -> Study:
    """Several positive findings whose regions are hot spots of untrained models' Grad-CAM
    maps: every part of two maps (several parts, a tiny one, some at the image's edge), and a
    positive finding whose map is zero (no region)."""
    source = synth.make_cxr(np.random.default_rng(seed), modality="CR", size=CXR_SIZE)
    parts = gradcam_regions(source, GRADCAM_SEEDS["parts"])
    with_tiny = gradcam_regions(source, GRADCAM_SEEDS["tiny"])
    cell = CXR_SIZE / GRADCAM_INPUT  # one model pixel, in source pixels
    # What the variant is for; a change in torch's initialisation would show here.
    assert len(parts) >= 3, f"{len(parts)} parts"
    assert any(_at_edge(p, source, cell) for p in parts), "no part at the image's edge"
    assert min(polygon_area(p[:-1].astype(float)) for p in with_tiny) <= 2 * cell**2, "no tiny part"
    assert gradcam_regions(source, GRADCAM_SEEDS["zero"]) == [], "the zero map is not zero"
    findings = [
        Finding(code=code, probability=0.62, threshold=0.5, positive=True, region=part,
                label=f"{label} hot spot {k} of {len(regions)}")
        for code, label, regions in ((PNEUMONIA, "Pneumonia", parts),
                                     (BRONCHOPULMONARY_DYSPLASIA, "BPD risk", with_tiny))
        for k, part in enumerate(regions, start=1)
    ]
    findings.append(Finding(code=PNEUMONIA, probability=0.51, threshold=0.5, positive=True,
                            label="Pneumonia, zero heat map"))
    return _cxr_study(outdir, "cxr-gradcam", source, findings)


def cxr_positive_zero_maps(outdir: Path, seed: int = 22) -> Study:
    """Two positive findings, neither with a region: both untrained models' maps are zero
    (as when OHIF failed on a report of two positive findings from untrained models)."""
    source = synth.make_cxr(np.random.default_rng(seed), modality="CR", size=CXR_SIZE)
    findings = []
    for code, label, key in ((BRONCHOPULMONARY_DYSPLASIA, "BPD risk (moderate/severe)", "zero"),
                             (PNEUMONIA, "Pneumonia", "zero too")):
        regions = gradcam_regions(source, GRADCAM_SEEDS[key])
        assert regions == [], f"the {key} map is not zero"
        findings.append(Finding(code=code, probability=0.58, threshold=0.5, positive=True, label=label))
    return _cxr_study(outdir, "cxr-zero-maps", source, findings)


def cxr_class_probabilities(outdir: Path, seed: int = 31) -> Study:
    """Pneumonia by type on a child's chest film: the called class with each class's probability,
    coded as the task catalogue codes them."""
    task = load_catalogue().get("pneumonia")
    source = synth.make_cxr(np.random.default_rng(seed), modality="CR", size=CXR_SIZE)
    probabilities = dict(zip(task.classes, (0.15, 0.25, 0.60)))  # normal, bacterial, viral
    call = ClassCall(code_of(task.sr.concept),
                     tuple((code_of(task.sr.classes[c]), p) for c, p in probabilities.items()),
                     label=task.description)
    return _cxr_study(outdir, "cxr-class-call", source, [call])


def hand_bone_age(outdir: Path, seed: int = 32) -> Study:
    """Bone age on a child's hand film: the estimate in months beside the chronological age, coded
    as the task catalogue codes them; the view is no frontal chest film."""
    rng = np.random.default_rng(seed)
    task = load_catalogue().get("bone-age")
    when = dt.datetime(2024, 5, 6, 10, 30)
    study = make_study(make_child(rng, 7, when.date(), (6.0, 9.0)), 7, when, key=("browser", seed))
    source = make_hand(rng, study=study, modality="CR", size=CXR_SIZE)
    age_months = round((when.date() - study.patient.birth_date).days / DAYS_PER_MONTH, 1)
    estimate = Estimate(code_of(task.sr.concept), round(age_months + 6.5, 1), code_of(task.sr.units),
                        (code_of(task.sr.beside), age_months), label=task.description)
    view = ViewResult(label="extremity", probability=0.93, is_frontal_chest=False)
    return _cxr_study(outdir, "hand-bone-age", source, [estimate], view=view, chest=False)


@dataclass(frozen=True)
class SrVariant:
    """One shape of SR for the browser test: its name and how to build its study."""

    name: str
    build: Callable[[Path], Study]


SR_VARIANTS = [
    SrVariant("cxr-no-finding", cxr_no_finding),
    SrVariant("cxr-one-finding", cr_study),
    SrVariant("cxr-gradcam-findings", cxr_gradcam_findings),
    SrVariant("cxr-positive-zero-maps", cxr_positive_zero_maps),
    SrVariant("cxr-class-probabilities", cxr_class_probabilities),
    SrVariant("hand-bone-age", hand_bone_age),
    SrVariant("lung-both", lambda outdir: mr_study(outdir, seed=12)),
    SrVariant("lung-right-not-found", lambda outdir: mr_study(outdir, seed=13, not_found=(RIGHT_LABEL,))),
    SrVariant("lung-none-found",
              lambda outdir: mr_study(outdir, seed=14, not_found=(LEFT_LABEL, RIGHT_LABEL))),
]
"""Every shape of report OHIF must open; a new kind of SR content is one more entry."""
