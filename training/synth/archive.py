"""Writing the synthetic archive: DICOM files, `labels.csv` and `truth.json` under one folder."""

from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from training.synth.attributes import dicom_date
from training.synth.extremity import make_extremity
from training.synth.hand import make_hand
from training.synth.mri import lung_volumes_ml, make_mr_series
from training.synth.patients import SynthPatient, SynthStudy
from training.synth.plan import (STREAM_CHILD_FILM, STREAM_CXR, STREAM_MR, STREAM_PLAN, VIEW_CLASSES, RadiographPlan,
                                 plan_mr_studies, plan_pediatric, plan_radiographs, stream_rng)
from training.synth.radiograph import make_cxr
from training.synth.reference_seg import make_reference_seg

LABEL_COLUMNS: tuple[str, ...] = (
    "StudyInstanceUID", "bpd", "pneumonia", "irds_grade", "gestational_age_weeks", "birth_weight_g",
)
"""The columns of labels.csv; `fracture` and `bone_age_months` follow when extremity or hand films are written."""


@dataclass(frozen=True)
class SynthSummary:
    """What `generate()` wrote (paths are absolute)."""

    outdir: Path
    n_patients: int
    n_studies: int
    n_cxr: int
    n_mri_series: int
    n_mri_instances: int
    n_seg: int
    cxr_paths: tuple[Path, ...]
    mri_series_dirs: tuple[Path, ...]
    seg_paths: tuple[Path, ...]
    labels_csv: Path
    truth_json: Path
    pediatric_paths: tuple[Path, ...] = ()
    """Children's films: pediatric chests, extremities and hands (also counted in n_studies)."""


def _relative(path: Path, outdir: Path) -> str:
    return path.relative_to(outdir).as_posix()


def _patient_truth(p: SynthPatient) -> dict[str, object]:
    truth = {
        "PatientID": p.patient_id, "PatientName": p.patient_name, "PatientBirthDate": dicom_date(p.birth_date),
        "PatientSex": p.sex, "neonate": p.is_neonate, "gestational_age_weeks": p.gestational_age_weeks,
        "birth_weight_g": p.birth_weight_g, "bpd": p.bpd, "pneumonia": p.pneumonia, "irds_grade": p.irds_grade,
        "bpd_severity": round(p.bpd_severity, 4), "pneumonia_severity": round(p.pneumonia_severity, 4),
    }
    if p.child:
        truth.update(child=True, pneumonia_type=p.pneumonia_type, fracture=p.fracture,
                     bone_age_months=p.bone_age_months)
    return truth


def _study_truth(study: SynthStudy) -> dict[str, object]:
    return {
        "StudyInstanceUID": study.study_instance_uid, "SeriesInstanceUID": study.series_instance_uid,
        "PatientID": study.patient.patient_id, "StudyDate": dicom_date(study.study_datetime),
        "PatientAge": study.patient_age, "age_days": study.age_days, "PatientWeight": study.weight_kg,
    }


def _blank(value: object) -> object:
    return "" if value is None else value


def _labels_row(study: SynthStudy, labelled: bool) -> dict[str, object]:
    """Disease labels only where the image shows them (neonatal frontal chests, children's films)."""
    p = study.patient
    if p.child:
        return {"StudyInstanceUID": study.study_instance_uid, "pneumonia": _blank(p.pneumonia_type),
                "fracture": _blank(p.fracture), "bone_age_months": _blank(p.bone_age_months)}
    return {
        "StudyInstanceUID": study.study_instance_uid,
        "bpd": _blank(p.bpd) if labelled else "",
        "pneumonia": _blank(p.pneumonia) if labelled else "",
        "irds_grade": _blank(p.irds_grade) if labelled else "",
        "gestational_age_weeks": _blank(p.gestational_age_weeks),
        "birth_weight_g": _blank(p.birth_weight_g),
    }


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _make_radiograph(seed: int, stream: int, i: int, plan: RadiographPlan, size: int) -> Dataset:
    rng = stream_rng(seed, stream, i + 1)
    encoding = {"modality": plan.modality, "photometric": plan.photometric, "size": size}
    if plan.anatomy == "hand":
        return make_hand(rng, study=plan.study, **encoding)
    if plan.anatomy != "chest":
        return make_extremity(rng, study=plan.study, segment=plan.anatomy, **encoding)
    return make_cxr(rng, study=plan.study, view_class=plan.view_class, **encoding)


def _write_radiographs(seed: int, outdir: Path, plans: list[RadiographPlan], size: int,
                       stream: int = STREAM_CXR) -> tuple[list[Path], list[dict]]:
    paths, truth = [], []
    for i, plan in enumerate(plans):
        ds = _make_radiograph(seed, stream, i, plan, size)
        folder = "cxr" if plan.anatomy == "chest" else "hand" if plan.anatomy == "hand" else "extremity"
        path = _write(ds, outdir / folder / f"{ds.SOPInstanceUID}.dcm")
        paths.append(path)
        extra = {} if stream == STREAM_CXR else {"anatomy": plan.anatomy}
        truth.append({
            **_study_truth(plan.study), **extra, "kind": "radiograph", "view_class": plan.view_class,
            "SOPInstanceUID": ds.SOPInstanceUID, "SOPClassUID": ds.SOPClassUID, "Modality": ds.Modality,
            "PhotometricInterpretation": ds.PhotometricInterpretation, "ViewPosition": ds.ViewPosition,
            "BodyPartExamined": ds.BodyPartExamined, "pixel_spacing_mm": float(ds.PixelSpacing[0]),
            "imager_pixel_spacing_mm": float(ds.ImagerPixelSpacing[0]),
            "devices": [d for d in ds.AcquisitionDeviceProcessingDescription.split() if d != "NONE"],
            "path": _relative(path, outdir),
        })
    return paths, truth


def _write_mr(seed: int, outdir: Path, studies: list[SynthStudy], shape: tuple[int, int, int]
              ) -> tuple[list[Path], list[Path], int, list[dict]]:
    dirs, segs, n_instances, truth = [], [], 0, []
    for j, study in enumerate(studies):
        series, labels = make_mr_series(stream_rng(seed, STREAM_MR, 1000 + j), study=study, shape=shape)
        series_dir = outdir / "mri" / study.series_instance_uid
        for ds in series:
            _write(ds, series_dir / f"{ds.SOPInstanceUID}.dcm")
        seg = make_reference_seg(series, labels)
        seg_path = _write(seg, outdir / "seg" / f"{seg.SOPInstanceUID}.dcm")
        dirs.append(series_dir)
        segs.append(seg_path)
        n_instances += len(series)
        truth.append({
            **_study_truth(study), "kind": "mr", "view_class": None, "Modality": "MR", "n_slices": len(series),
            "SOPInstanceUIDs": [ds.SOPInstanceUID for ds in series],
            "lung_volume_ml": lung_volumes_ml(series, labels),
            "voxel_volume_ml": float(series[0].PixelSpacing[0]) ** 2 * float(series[0].SpacingBetweenSlices) / 1000.0,
            "seg_sop_instance_uid": seg.SOPInstanceUID, "seg_series_instance_uid": seg.SeriesInstanceUID,
            "path": _relative(series_dir, outdir), "seg_path": _relative(seg_path, outdir),
        })
    return dirs, segs, n_instances, truth


def _label_columns(pediatric: list[RadiographPlan]) -> list[str]:
    anatomies = {p.anatomy for p in pediatric}
    return (list(LABEL_COLUMNS) + (["fracture"] if anatomies - {"chest", "hand"} else [])
            + (["bone_age_months"] if "hand" in anatomies else []))


def _write_labels(path: Path, radiographs: list[RadiographPlan], mr_studies: list[SynthStudy],
                  pediatric: list[RadiographPlan]) -> None:
    rows = [_labels_row(p.study, p.study.patient.is_neonate and p.view_class == "chest_frontal") for p in radiographs]
    rows += [_labels_row(s, False) for s in mr_studies]
    rows += [_labels_row(p.study, True) for p in pediatric]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_label_columns(pediatric), restval="", extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def generate(
    outdir: Path,
    n_cxr: int = 20,
    n_mri: int = 4,
    seed: int = 0,
    *,
    cxr_size: int = 1024,
    mri_shape: tuple[int, int, int] = (40, 128, 128),
    adult_share: float = 0.1,
    non_chest_share: float = 0.15,
    n_pediatric_cxr: int = 0,
    n_extremity: int = 0,
    n_hand: int = 0,
) -> SynthSummary:
    """Write a synthetic archive under `outdir` (see `training.synth` for the layout).

    `n_cxr` counts every neonatal-feed radiograph: `adult_share` of them are adult chests and
    `non_chest_share` are other views (lateral, abdomen, skull, babygram); the rest are
    day-1 neonatal frontal chests, labelled in labels.csv. Children's films come on top:
    `n_pediatric_cxr` frontal chests of 1-5 year olds (pneumonia normal/bacterial/viral),
    `n_extremity` limb films (fracture 0/1) and `n_hand` hand/wrist films (bone age in months).
    """
    counts = {"chest": n_pediatric_cxr, "extremity": n_extremity, "hand": n_hand}
    if min(n_cxr, n_mri, *counts.values()) < 0 or cxr_size < 16 or min(mri_shape) < 1:
        raise ValueError(f"invalid counts or sizes: n_cxr={n_cxr}, n_mri={n_mri}, children's films={counts}, "
                         f"cxr_size={cxr_size}, mri_shape={mri_shape}")
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    base = dt.datetime(2022, 1, 3, 0, 0) + dt.timedelta(days=int(stream_rng(seed, STREAM_PLAN, 1).integers(0, 900)))
    radiographs = plan_radiographs(seed, n_cxr, adult_share, non_chest_share, base)
    mr_studies = plan_mr_studies(seed, n_mri, radiographs, base)
    pediatric = plan_pediatric(seed, counts, base, first_index=n_cxr + n_mri + 1)
    cxr_paths, cxr_truth = _write_radiographs(seed, outdir, radiographs, cxr_size)
    mri_dirs, seg_paths, n_instances, mr_truth = _write_mr(seed, outdir, mr_studies, mri_shape)
    pediatric_paths, pediatric_truth = _write_radiographs(seed, outdir, pediatric, cxr_size, STREAM_CHILD_FILM)
    labels_csv = outdir / "labels.csv"
    _write_labels(labels_csv, radiographs, mr_studies, pediatric)
    patients = {p.study.patient.patient_id: p.study.patient for p in radiographs + pediatric}
    patients.update({s.patient.patient_id: s.patient for s in mr_studies})
    truth = {
        "generator": "training.synth", "version": 1, "seed": seed, "synthetic": True,
        "view_classes": list(VIEW_CLASSES),
        "patients": [_patient_truth(p) for p in sorted(patients.values(), key=lambda p: p.patient_id)],
        "studies": cxr_truth + mr_truth + pediatric_truth,
    }
    truth_json = outdir / "truth.json"
    truth_json.write_text(json.dumps(truth, indent=2, sort_keys=True) + "\n")
    return SynthSummary(
        outdir=outdir, n_patients=len(patients), n_studies=len(cxr_truth) + len(mr_truth) + len(pediatric_truth),
        n_cxr=len(cxr_paths), n_mri_series=len(mri_dirs), n_mri_instances=n_instances, n_seg=len(seg_paths),
        cxr_paths=tuple(cxr_paths), mri_series_dirs=tuple(mri_dirs), seg_paths=tuple(seg_paths),
        labels_csv=labels_csv, truth_json=truth_json, pediatric_paths=tuple(pediatric_paths),
    )
