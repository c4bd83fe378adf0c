"""Studies for the browser test: synthetic source images plus cradle's SEG and SR, as files.

The source images come from ``training.synth`` (the synthetic neonatal CR and MR
generator); the results are made by ``inference.seg`` and ``inference.sr`` exactly as the
pipelines make them. For the MR study the SEG is written from the generator's own lung label
volume, standing in for a model's output, and the volumes come from that label volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset

from inference.codes import BRONCHOPULMONARY_DYSPLASIA, LEFT_LUNG, PNEUMONIA, RIGHT_LUNG
from inference.geometry import sort_series
from inference.results import AlgorithmIdentity, Finding, ViewResult
from inference.seg import lung_segmentation
from inference.sr.lung import lung_report
from inference.sr.radiograph import cxr_report
from training import synth

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
    #: Segment labels the SEG carries, and their display colours (sRGB, from
    #: RecommendedDisplayCIELabValue).
    segment_labels: list[str] = field(default_factory=list)
    segment_rgb: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    #: Tracking identifiers (OHIF measurement labels) of the SR's planar ROIs.
    roi_labels: list[str] = field(default_factory=list)
    volumes_ml: dict[str, float] = field(default_factory=dict)


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def mr_study(outdir: Path, seed: int = 11) -> Study:
    """A neonatal chest MR series, its lung SEG and the lung-volume SR."""
    series, labels = synth.make_mr_series(np.random.default_rng(seed), shape=MR_SHAPE)
    ordered = sort_series(series)
    # make_mr_series gives labels in InstanceNumber order; sort_series in slice order.
    by_uid = {str(ds.SOPInstanceUID): labels[k] for k, ds in enumerate(series)}
    labels = np.stack([by_uid[str(ds.SOPInstanceUID)] for ds in ordered])
    truth = synth.lung_volumes_ml(series, labels)
    volumes = {"left": truth["left"], "right": truth["right"]}
    seg = lung_segmentation(ordered, labels, ALGORITHM_LUNG)
    sr = lung_report(ordered, seg, volumes, ALGORITHM_LUNG)
    files = [_save(ds, outdir / "mr" / f"{i:03d}.dcm") for i, ds in enumerate(ordered)]
    files.append(_save(seg, outdir / "mr" / "seg.dcm"))
    files.append(_save(sr, outdir / "mr" / "sr.dcm"))
    return Study(
        study_uid=str(ordered[0].StudyInstanceUID),
        files=files,
        source_series_uid=str(ordered[0].SeriesInstanceUID),
        seg_series_uid=str(seg.SeriesInstanceUID),
        sr_series_uid=str(sr.SeriesInstanceUID),
        segment_labels=[str(item.SegmentLabel) for item in seg.SegmentSequence],
        segment_rgb={
            str(item.SegmentLabel): hd.color.CIELabColor.from_dicom_value(
                item.RecommendedDisplayCIELabValue
            ).to_rgb(clip=True)
            for item in seg.SegmentSequence
            if "RecommendedDisplayCIELabValue" in item
        },
        roi_labels=[LEFT_LUNG.meaning, RIGHT_LUNG.meaning],
        volumes_ml=volumes,
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
    view = ViewResult(label="chest_frontal", probability=0.97, is_frontal_chest=True)
    sr = cxr_report(source, view, [finding, risk], ALGORITHM_CXR)
    files = [_save(source, outdir / "cr" / "cr.dcm"), _save(sr, outdir / "cr" / "sr.dcm")]
    return Study(
        study_uid=str(source.StudyInstanceUID),
        files=files,
        source_series_uid=str(source.SeriesInstanceUID),
        sr_series_uid=str(sr.SeriesInstanceUID),
        roi_labels=[finding.tracking_label],
    )
