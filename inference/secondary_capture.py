"""Secondary Capture summary: the source image with the result burned in.

For viewers that show neither SR nor SEG: the radiograph (or the MR key slice)
with the result's label map drawn over it (lungs in the SEG's colours) and its
text lines, marked "AI OUTPUT - NOT FOR DIAGNOSIS" in the pixels and the header.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from inference.determinism import ResultUIDs, pin_generated_values, resolve_datetime, sop_kwargs
from inference.geometry import check_source_image
from inference.results import (
    NOT_FOR_DIAGNOSIS,
    PIPELINE_LUNG_MRI,
    AlgorithmIdentity,
    LabelVolumeError,
    SourceImageError,
    WriterInputError,
    long_string,
)
from inference.seg import LEFT_RGB, RIGHT_RGB

__all__ = ["CXR_SC_SERIES_NUMBER", "LUNG_SC_SERIES_NUMBER", "summary_image"]

CXR_SC_SERIES_NUMBER = 9002
LUNG_SC_SERIES_NUMBER = 9013

# Overlay colours (sRGB) by label value; 1 and 2 match the SEG's lung colours.
_OVERLAY_RGB = (LEFT_RGB, RIGHT_RGB, (60, 200, 90), (220, 60, 200), (240, 220, 60))
_SUMMARY_MIN_SIDE, _SUMMARY_MAX_SIDE = 512, 1024
_BANNER_RGB = (255, 220, 0)


def _display_gray(source: Dataset) -> np.ndarray:
    """8-bit display rendering: modality LUT, 0.5 % clipped min-max, MONOCHROME1 inverted."""
    if "PixelData" not in source:
        raise SourceImageError("summary_image needs the source's pixel data")
    if source.get("SamplesPerPixel", 1) != 1:
        raise SourceImageError("summary_image supports grayscale sources only")
    values = apply_modality_lut(source.pixel_array, source).astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)
    if source.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255).astype(np.uint8)


def _summary_scale(rows: int, columns: int) -> float:
    longest = max(rows, columns)
    if longest < _SUMMARY_MIN_SIDE:
        return _SUMMARY_MIN_SIDE / longest
    if longest > _SUMMARY_MAX_SIDE:
        return _SUMMARY_MAX_SIDE / longest
    return 1.0


def _check_overlay(overlay: np.ndarray | None, source: Dataset) -> np.ndarray | None:
    if overlay is None:
        return None
    array = np.asarray(overlay)
    expected = (int(source.Rows), int(source.Columns))
    if array.shape != expected:
        raise LabelVolumeError(f"overlay has shape {array.shape}, the image needs {expected}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise LabelVolumeError(f"overlay must be integer or boolean, got {array.dtype}")
    if array.min() < 0 or array.max() > len(_OVERLAY_RGB):
        raise LabelVolumeError(f"overlay labels must lie in 0..{len(_OVERLAY_RGB)}")
    return array.astype(np.uint8)


def _draw_overlay(rgb: np.ndarray, overlay: np.ndarray) -> None:
    """Translucent fill plus a solid outline per label, in place."""
    size = (rgb.shape[1], rgb.shape[0])
    labels = cv2.resize(overlay, size, interpolation=cv2.INTER_NEAREST)
    thickness = max(1, round(rgb.shape[1] / 400))
    for value in (int(v) for v in np.unique(labels) if v):
        colour = _OVERLAY_RGB[value - 1]
        mask = labels == value
        rgb[mask] = (0.7 * rgb[mask] + 0.3 * np.array(colour)).astype(np.uint8)
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(rgb, contours, -1, colour, thickness)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _draw_text(rgb: np.ndarray, lines: Sequence[str], footer: str) -> None:
    """The not-for-diagnosis banner on top, ``lines`` below it, ``footer`` at the
    bottom; each on a black box so it stays legible on any image."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = rgb.shape[1] / 900
    thickness = max(1, round(rgb.shape[1] / 500))
    margin = max(2, round(6 * scale))
    (_, text_height), _ = cv2.getTextSize("Ag", font, scale, thickness)
    step = text_height + 3 * margin

    def put(text: str, baseline: int, colour: tuple[int, int, int]) -> None:
        text = _ascii(text)
        (width, height), descent = cv2.getTextSize(text, font, scale, thickness)
        top_left = (0, baseline - height - margin)
        bottom_right = (width + 2 * margin, baseline + descent + margin)
        cv2.rectangle(rgb, top_left, bottom_right, (0, 0, 0), -1)
        cv2.putText(rgb, text, (margin, baseline), font, scale, colour, thickness, cv2.LINE_AA)

    put(NOT_FOR_DIAGNOSIS, step - margin, _BANNER_RGB)
    for row, line in enumerate(lines, start=2):
        put(line, row * step - margin, (255, 255, 255))
    put(footer, rgb.shape[0] - 2 * margin, _BANNER_RGB)


_ORIENTATION_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Row and column direction letters: the source's, or the dominant axes of
    ImageOrientationPatient (highdicom's SC accepts single letters only)."""
    orientation = source.get("PatientOrientation")
    if orientation and len(orientation) == 2 and all(len(v) == 1 for v in orientation):
        return str(orientation[0]), str(orientation[1])
    iop = source.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    letters = []
    for vector in (np.asarray(iop[:3], float), np.asarray(iop[3:], float)):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(_ORIENTATION_LETTERS[axis][0 if vector[axis] > 0 else 1])
    return letters[0], letters[1]


def _render_summary(
    source: Dataset, labels: np.ndarray | None, lines: Sequence[str], footer: str
) -> np.ndarray:
    """RGB rendering of the source with overlay and text, 512 to 1024 px on its long side."""
    gray = _display_gray(source)
    scale = _summary_scale(*gray.shape)
    size = (round(gray.shape[1] * scale), round(gray.shape[0] * scale))
    resized = cv2.resize(gray, size, interpolation=cv2.INTER_LINEAR)
    rgb = np.ascontiguousarray(np.repeat(resized[..., None], 3, axis=2))
    if labels is not None:
        _draw_overlay(rgb, labels)
    _draw_text(rgb, lines, footer)
    return rgb


def _mark_summary(sc: Dataset, source: Dataset, footer: str, when: dt.datetime) -> None:
    """Burned-in annotation flags, the source reference and pinned capture time."""
    # Both pipelines image the chest, an unpaired part, so Laterality stays absent.
    sc.BodyPartExamined = "CHEST"
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    sc.DerivationDescription = long_string(f"{NOT_FOR_DIAGNOSIS}: {footer}")
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.DateOfSecondaryCapture = DA(when.date())
    sc.TimeOfSecondaryCapture = TM(when.time())
    pin_generated_values(sc, when)


def _summary_series_number(pipeline: str) -> int:
    return LUNG_SC_SERIES_NUMBER if pipeline == PIPELINE_LUNG_MRI else CXR_SC_SERIES_NUMBER


def summary_image(
    source: Dataset,
    overlay: np.ndarray | None,
    text_lines: Sequence[str],
    algorithm: AlgorithmIdentity,
    *,
    pipeline: str,
    model_version_tag: str | None = None,
    content_datetime: dt.datetime | None = None,
    series_number: int | None = None,
    uid_prefix: str = PYDICOM_ROOT_UID,
) -> hd.sc.SCImage:
    """Secondary Capture of ``source`` (the radiograph, or the MR key slice) with
    ``overlay`` (label map of the source's size, 0 = nothing; 1 and 2 drawn in
    the SEG's left/right lung colours) and ``text_lines`` burned in, marked
    "AI OUTPUT - NOT FOR DIAGNOSIS", for viewers that show neither SR nor SEG.
    """
    check_source_image(source)
    labels = _check_overlay(overlay, source)
    if isinstance(text_lines, str):
        raise WriterInputError("text_lines must be a sequence of strings, not a string")
    version = model_version_tag or algorithm.version
    uids = ResultUIDs(str(source.SeriesInstanceUID), pipeline, version, uid_prefix)
    when = resolve_datetime(source, content_datetime)
    footer = f"{algorithm.name} {version}"
    orientation = _patient_orientation(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=_render_summary(source, labels, list(text_lines), footer),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids("sc-series"),
        series_number=series_number or _summary_series_number(pipeline),
        sop_instance_uid=uids("sc-instance"),
        instance_number=1,
        # highdicom requires an orientation for PATIENT; an unknown one is blanked below.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **sop_kwargs(algorithm, f"cradle AI: summary, not for diagnosis ({version})", when),
    )
    if orientation is None:
        sc.PatientOrientation = ""  # type 2: empty when unknown
    _mark_summary(sc, source, footer, when)
    return sc
