"""What the demo prints about the objects that reached its PACS, and its overlay picture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def content_items(ds: Dataset) -> Iterator[Dataset]:
    """Every SR content item, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def _name(item: Dataset) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""


def numeric_values(ds: Dataset) -> list[tuple[str, float, str]]:
    values = []
    for item in content_items(ds):
        if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
            measured = item.MeasuredValueSequence[0]
            values.append((_name(item), float(measured.NumericValue),
                           measured.MeasurementUnitsCodeSequence[0].CodeValue))
    return values


def _truth_for(truth: dict, study_uid: str) -> dict:
    study = next((s for s in truth["studies"] if s["StudyInstanceUID"] == study_uid), {})
    patient = next((p for p in truth["patients"] if p["PatientID"] == study.get("PatientID")), {})
    return {**patient, **study}


def describe(ds: Dataset, truth: dict) -> str:
    expected = _truth_for(truth, ds.StudyInstanceUID)
    kind = "SEG" if ds.SOPClassUID == SEG_STORAGE else ds.Modality
    if kind == "SEG":
        labels = [s.SegmentLabel for s in ds.SegmentSequence]
        return f"SEG {ds.SeriesDescription}: segments {labels}, {ds.NumberOfFrames} frames"
    findings = [f"{name} {value:.3g} {unit}" for name, value, unit in numeric_values(ds)]
    if expected.get("kind") == "mr":
        volumes = expected.get("lung_volume_ml", {})
        reference = f"phantom truth: left {volumes.get('left')} mL, right {volumes.get('right')} mL"
    else:
        reference = f"synthetic labels: bpd={expected.get('bpd')} pneumonia={expected.get('pneumonia')}"
    return f"SR {ds.SeriesDescription}: {'; '.join(findings) or 'no measurements'} ({reference})"


def overlay_png(seg_ds: Dataset, fresh_set: Path, out: Path) -> Path:
    """The MR slice with the most segmented lung, with the SEG's left/right lungs drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    sources = {ds.SOPInstanceUID: ds for ds in map(dcmread, sorted(fresh_set.glob("mri/*/*.dcm")))}
    frames = seg_ds.PerFrameFunctionalGroupsSequence
    best_uid, best_area, masks = None, -1, {}
    pixels = seg.pixel_array if seg.pixel_array.ndim == 3 else seg.pixel_array[None]
    for index, frame in enumerate(frames):
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        masks.setdefault(uid, {})[number] = pixels[index]
    for uid, by_segment in masks.items():
        area = int(sum(m.sum() for m in by_segment.values()))
        if area > best_area and uid in sources:
            best_uid, best_area = uid, area
    image = sources[best_uid].pixel_array.astype(np.float32)
    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    axis.imshow(image, cmap="gray")
    for number, colour in ((1, "tab:blue"), (2, "tab:orange")):
        if number in masks[best_uid]:
            axis.contour(masks[best_uid][number], levels=[0.5], colors=colour, linewidths=1.5)
    axis.set_title("cradle AI lung SEG over MR slice\nSYNTHETIC - NOT FOR CLINICAL USE", fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out
