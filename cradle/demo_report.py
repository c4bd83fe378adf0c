"""What ``cradle demo`` reports about the objects that reached its PACS, and its overlay picture.

Only what arrived is read (the SR and SEG files the PACS stored); the synthetic generator's
``truth.json`` supplies the phantom's true lung volumes and the synthetic labels to compare with.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SR_STORAGE = ("1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34")
LUNGS = ("left", "right")


# --- SR content ----------------------------------------------------------------------------------


def _name(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning) if "ConceptNameCodeSequence" in item else ""


def _value(item: Dataset) -> Any:
    kind = item.get("ValueType")
    if kind == "NUM" and "MeasuredValueSequence" in item:
        measured = item.MeasuredValueSequence[0]
        return float(measured.NumericValue), str(measured.MeasurementUnitsCodeSequence[0].CodeValue)
    if kind == "CODE":
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    if kind == "TEXT":
        return str(item.TextValue)
    return None


def content_items(ds: Dataset, context: tuple[dict[str, Any], ...] = ()) -> Iterator[tuple[Dataset, tuple]]:
    """Every SR content item, depth first, with the TEXT/CODE items of its enclosing containers
    (``context``, innermost last): a measurement's tracking identifier, finding, finding site."""
    children = list(ds.get("ContentSequence", []))
    here = {_name(c): _value(c) for c in children if c.get("ValueType") in ("TEXT", "CODE")}
    for item in children:
        yield item, (*context, here)
        yield from content_items(item, (*context, here))


def numeric_values(ds: Dataset) -> list[dict[str, Any]]:
    """Every NUM item: its name, value, unit and the labels around it."""
    values = []
    for item, context in content_items(ds):
        value = _value(item) if item.get("ValueType") == "NUM" else None
        if value is None:
            continue
        labels: dict[str, Any] = {}
        for level in context:
            labels.update(level)
        values.append({"name": _name(item), "value": value[0], "unit": value[1], "context": labels})
    return values


def coded_values(ds: Dataset) -> dict[str, list[str]]:
    codes: dict[str, list[str]] = {}
    for item, _ in content_items(ds):
        if item.get("ValueType") in ("CODE", "TEXT"):
            codes.setdefault(_name(item), []).append(_value(item))
    return codes


# --- per object ----------------------------------------------------------------------------------


def _study(truth: dict[str, Any], study_uid: str) -> dict[str, Any]:
    study = next((s for s in truth["studies"] if s["StudyInstanceUID"] == study_uid), {})
    patient = next((p for p in truth["patients"] if p["PatientID"] == study.get("PatientID")), {})
    return {**patient, **study}


def lung_volumes(ds: Dataset) -> dict[str, float]:
    """Left and right lung volume (mL) from a lung SR."""
    volumes = {}
    for number in numeric_values(ds):
        if number["unit"].lower() != "ml":
            continue
        words = " ".join(str(v) for v in number["context"].values()).lower()
        for lung in LUNGS:
            if f"{lung} lung" in words:
                volumes[lung] = number["value"]
    return volumes


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def radiograph_findings(ds: Dataset) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The view (label, probability %) and each finding (probability and threshold %, the call) of a
    chest radiograph SR: "Probability"/"Threshold Value" NUMs under the "Image View" TEXT, under a
    finding's CODE item (no region), or in a TID 1410 group beside its "Finding" code (with a region)."""
    view: dict[str, Any] | None = None
    findings: dict[str, dict[str, Any]] = {}

    def visit(items: list[Dataset], parent: Dataset | None) -> None:
        nonlocal view
        for item in items:
            name = _name(item)
            if item.get("ValueType") == "NUM" and name in ("Probability", "Threshold Value"):
                key = "probability" if name == "Probability" else "threshold"
                value = _value(item)[0]
                if parent is not None and parent.get("ValueType") == "TEXT" and _name(parent) == "Image View":
                    view = view or {"label": str(parent.TextValue)}
                    view[key] = value
                elif parent is not None and parent.get("ValueType") == "CODE":
                    findings.setdefault(_name(parent), {"call": _value(parent)})[key] = value
                else:  # a measurement group: the finding is a sibling, the call its qualitative evaluation
                    codes = {_name(c): _value(c) for c in items if c.get("ValueType") == "CODE"}
                    finding = str(codes.get("Finding", "finding"))
                    findings.setdefault(finding, {"call": codes.get(finding)})[key] = value
            visit(_children(item), item)

    visit(_children(ds), None)
    return view, findings


def radiograph_result(ds: Dataset, truth: dict[str, Any]) -> dict[str, Any]:
    expected = _study(truth, ds.StudyInstanceUID)
    view, findings = radiograph_findings(ds)
    return {"sop_instance_uid": str(ds.SOPInstanceUID), "study_uid": str(ds.StudyInstanceUID),
            "series_description": str(ds.get("SeriesDescription", "")),
            "models": (coded_values(ds).get("Device Observer Model Name") or [""])[0],
            "view": view, "findings": findings,
            "synthetic_labels": {k: expected.get(k) for k in ("bpd", "pneumonia")}}


def _relative_error(value: float, true: float) -> float:
    return (value - true) / true if true else float("inf")


# --- the overlay ---------------------------------------------------------------------------------


def _frame_masks(seg_ds: Dataset) -> dict[str, dict[int, np.ndarray]]:
    """SOP Instance UID of the source slice → segment number → binary mask."""
    pixels = seg_ds.pixel_array
    pixels = pixels if pixels.ndim == 3 else pixels[None]
    masks: dict[str, dict[int, np.ndarray]] = {}
    for index, frame in enumerate(seg_ds.PerFrameFunctionalGroupsSequence):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        masks.setdefault(uid, {})[number] = pixels[index]
    return masks


def overlay_png(seg_ds: Dataset, mr_dir: Path, out: Path, reference: Path | None = None) -> tuple[Path, str]:
    """The MR slice with the most segmented lung, with the SEG's left/right lungs drawn over it (and,
    dashed, the phantom's reference mask). Returns the PNG and the SOP Instance UID of the slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = {ds.SOPInstanceUID: ds for ds in map(dcmread, sorted(mr_dir.glob("*.dcm")))}
    masks = _frame_masks(seg_ds)
    truth = _frame_masks(dcmread(reference)) if reference is not None and reference.is_file() else {}
    best = max((uid for uid in masks if uid in sources), key=lambda uid: int(sum(m.sum() for m in masks[uid].values())))
    image = sources[best].pixel_array.astype(np.float32)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg_ds.SegmentSequence}
    figure, axis = plt.subplots(figsize=(5, 5.4), dpi=100)
    axis.imshow(image, cmap="gray", interpolation="nearest")
    axis.set_facecolor("black")
    handles = []
    for number, colour in ((1, "tab:blue"), (2, "tab:orange")):
        if number in masks[best] and masks[best][number].any():
            axis.contour(masks[best][number], levels=[0.5], colors=colour, linewidths=1.5)
            handles.append(plt.Line2D([], [], color=colour, label=labels.get(number, str(number))))
        if number in truth.get(best, {}) and truth[best][number].any():
            axis.contour(truth[best][number], levels=[0.5], colors="white", linewidths=0.8, linestyles="dashed")
    if truth.get(best):
        handles.append(plt.Line2D([], [], color="white", linestyle="dashed", label="phantom truth"))
    if handles:
        axis.legend(handles=handles, loc="lower right", fontsize=8, facecolor="black", labelcolor="white")
    axis.set_title("cradle lung SEG (received at the demo PACS) over its MR slice\n"
                   "SYNTHETIC - NOT FOR CLINICAL USE", fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out, str(best)


# --- everything that arrived ---------------------------------------------------------------------


def report(received: list[Path], truth: dict[str, Any], mr_dir: Path, png: Path,
           reference_seg: Path | None = None) -> dict[str, Any]:
    """Lines to print and a JSON-able account of the received SR and SEG objects."""
    datasets = [(path, dcmread(path)) for path in received]
    srs = [(p, ds) for p, ds in datasets if ds.SOPClassUID in SR_STORAGE]
    segs = [(p, ds) for p, ds in datasets if ds.SOPClassUID == SEG_STORAGE]
    other = len(datasets) - len(srs) - len(segs)
    lines = [f"the PACS received {len(srs)} SR and {len(segs)} SEG" + (f" and {other} other objects" if other else "")]
    result: dict[str, Any] = {"counts": {"sr": len(srs), "seg": len(segs)}, "received": [], "radiographs": [],
                              "mr": None, "png": None}
    for path, ds in datasets:
        result["received"].append({"file": path.name, "sop_class_uid": str(ds.SOPClassUID),
                                   "modality": str(ds.Modality),
                                   "series_description": str(ds.get("SeriesDescription", "")),
                                   "study_uid": str(ds.StudyInstanceUID)})
    for _, ds in srs:
        study = _study(truth, ds.StudyInstanceUID)
        if study.get("kind") == "radiograph":
            item = radiograph_result(ds, truth)
            result["radiographs"].append(item)
            lines.append(describe_radiograph(item, study))
    mr_srs = [ds for _, ds in srs if _study(truth, ds.StudyInstanceUID).get("kind") == "mr"]
    if segs:
        seg = segs[0][1]
        study = _study(truth, seg.StudyInstanceUID)
        referenced = sorted({str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", [])})
        mr: dict[str, Any] = {"seg_sop_instance_uid": str(seg.SOPInstanceUID), "referenced_series": referenced,
                              "source_series": study.get("SeriesInstanceUID"),
                              "segments": [str(s.SegmentLabel) for s in seg.SegmentSequence],
                              "frames": int(seg.NumberOfFrames), "truth_ml": study.get("lung_volume_ml")}
        lines.append(f"MR SEG {seg.SeriesDescription}: segments {mr['segments']}, {mr['frames']} frames over the "
                     f"{study.get('n_slices')}-slice series")
        if mr_srs:
            measured = lung_volumes(mr_srs[0])
            mr["measured_ml"] = measured
            mr["relative_error"] = {lung: _relative_error(measured[lung], mr["truth_ml"][lung])
                                    for lung in LUNGS if lung in measured and mr["truth_ml"]}
            for lung in LUNGS:
                if lung in measured:
                    lines.append(f"MR SR lung volume, {lung}: {measured[lung]:.1f} mL (phantom truth "
                                 f"{mr['truth_ml'][lung]:.1f} mL, {100 * mr['relative_error'][lung]:+.1f} %)")
        picture, slice_uid = overlay_png(seg, mr_dir, png, reference_seg)
        result["png"], mr["png_slice"] = str(picture), slice_uid
        lines.append(f"PNG of the MR slice with the most lung, the SEG's outlines over it: {picture}")
        result["mr"] = mr
    return {**result, "lines": lines}


def describe_radiograph(item: dict[str, Any], study: dict[str, Any]) -> str:
    view = item["view"]
    parts = [f"view {view['label']} ({view['probability']:.0f} %)" if view else "no view"]
    for finding, value in item["findings"].items():
        parts.append(f"{finding}: probability {value.get('probability', float('nan')):.0f} % "
                     f"(threshold {value.get('threshold', float('nan')):.0f} %) {str(value.get('call')).lower()}")
    if view and not item["findings"]:
        parts.append("no finding assessed")
    truth = item["synthetic_labels"]
    return (f"{study.get('Modality', 'CR/DX')} {study.get('PatientID')}, SR by {item['models']}: {'; '.join(parts)} "
            f"[synthetic truth: bpd={truth['bpd']}]")
