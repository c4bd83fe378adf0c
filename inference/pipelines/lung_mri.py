"""``lung-mri``: a neonatal chest MR series → left and right lung → SEG + TID 1500 SR (volumes, mL).

The task is the task catalogue's segmentation task of the ``lung-mri`` pipeline; its two outputs
(left lung, right lung, in label order) name the structures.

1. Slices sorted by position along the normal (ImageOrientationPatient × ImagePositionPatient),
   stacked into a volume in Modality LUT units, normalised once per volume.
2. Each slice letterboxed to the model's input size. The 2D U-Net (MONAI FlexibleUNet, ResNet-50
   encoder, decoder 256-128-64-32-16) runs on batches of slices; a 3D U-Net (a version whose input spec
   has a ``patch``) runs on the whole stack by MONAI's sliding-window inference (Gaussian-weighted
   overlapping patches). Sigmoid; back onto the source grid; threshold 0.5 (or the version's).
3. 3D post-processing: keep the two largest connected components, fill holes (in 3D).
4. Left/right split by geometry, not by the network: patient left is +x in DICOM's LPS patient
   coordinates. Two components lying side by side are the two lungs (the one further to +x is the
   left); otherwise (lungs touching, or a spurious second piece) the mask is cut at the sagittal
   plane where it is thinnest between the lungs.
5. Each lung's volume: voxel count × PixelSpacing × slice spacing, the slice spacing taken from the
   positions themselves (each slice stands for half the distance to each neighbour).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydicom import Dataset
from scipy import ndimage

from common.processes import peak_rss_mb
from config.tasks import TaskCatalogue, TaskDefinition
from inference.errors import NoActiveModel, PipelineInputError
from inference.geometry import sort_series
from inference.pipelines import PipelineContext, PipelineOutput
from inference.preprocess import letterbox, modality_values, normalise
from inference.registry import InputSpec, LoadedModel
from inference.results import AlgorithmIdentity, WriterInputError
from inference.secondary_capture import summary_image
from inference.seg import lung_segmentation
from inference.sr.lung import lung_report

__all__ = [
    "LEFT",
    "RIGHT",
    "LungMriPipeline",
    "LungSegmentation",
    "SliceGeometry",
    "fill_holes",
    "keep_largest_components",
    "lung_volumes_ml",
    "postprocess",
    "segment_lungs",
    "segment_series",
    "segment_slices",
    "segment_volume",
    "segmentation_task",
    "split_left_right",
]

PIPELINE = "lung-mri"

LEFT, RIGHT = 1, 2  # label values (and SEG segment numbers) of the writers
DEFAULT_THRESHOLD = 0.5
BATCH_PIXELS = 32 * 256 * 256
"""Slices per forward pass: as many as fit this many input pixels (32 slices at 256 px). Small
batches cost per-call overhead on the CPU; large ones cost memory (about 0.7 GB for the
ResNet-50 U-Net at 32 × 256²)."""
SLIDING_WINDOW_OVERLAP = 0.25
"""3D networks: the fraction by which neighbouring sliding-window patches overlap."""
SLIDING_WINDOW_BATCH = 2
"""3D networks: patches per forward pass."""
SIDE_BY_SIDE_OVERLAP = 0.5
"""Two components are the two lungs when their left-right extents overlap by less than this
fraction of the narrower one."""


@dataclass(frozen=True)
class SliceGeometry:
    """Patient-space geometry of a sorted single-frame series (DICOM LPS, mm)."""

    positions: np.ndarray         # (slices, 3) ImagePositionPatient, sorted along the normal
    row_direction: np.ndarray     # ImageOrientationPatient[:3]: direction of increasing column index
    column_direction: np.ndarray  # ImageOrientationPatient[3:]: direction of increasing row index
    row_spacing: float            # PixelSpacing[0]: between adjacent rows
    column_spacing: float         # PixelSpacing[1]: between adjacent columns
    fallback_spacing: float       # SpacingBetweenSlices or SliceThickness, for a single slice

    @classmethod
    def from_series(cls, ordered: list[Dataset]) -> "SliceGeometry":
        spacings = {tuple(round(float(v), 6) for v in ds.PixelSpacing) for ds in ordered}
        if len(spacings) != 1:
            raise PipelineInputError("the slices differ in PixelSpacing")
        orientation = np.asarray(ordered[0].ImageOrientationPatient, dtype=float)
        row_spacing, column_spacing = spacings.pop()
        first = ordered[0]
        fallback = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 0.0)
        return cls(np.array([[float(v) for v in ds.ImagePositionPatient] for ds in ordered]),
                   orientation[:3], orientation[3:], row_spacing, column_spacing, fallback)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    def slice_extents_mm(self) -> np.ndarray:
        """Thickness each slice stands for: half the distance to each neighbour (end slices: the
        distance to their one neighbour). Equals the slice spacing for an evenly spaced series."""
        offsets = self.positions @ self.normal
        if len(offsets) == 1:
            if self.fallback_spacing <= 0:
                raise PipelineInputError("a single slice without SpacingBetweenSlices or SliceThickness")
            return np.array([self.fallback_spacing])
        gaps = np.diff(offsets)
        before = np.concatenate([gaps[:1], gaps])
        after = np.concatenate([gaps, gaps[-1:]])
        return (before + after) / 2.0

    @property
    def pixel_area_mm2(self) -> float:
        return self.row_spacing * self.column_spacing

    def patient_x(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Patient x (LPS: + is the patient's left) of every voxel, (slices, rows, columns) float32."""
        _, rows, columns = shape
        x0 = self.positions[:, 0].astype(np.float32)[:, None, None]
        along_rows = (self.column_direction[0] * self.row_spacing * np.arange(rows, dtype=np.float32))[None, :, None]
        along_columns = (self.row_direction[0] * self.column_spacing
                         * np.arange(columns, dtype=np.float32))[None, None, :]
        return (x0 + along_rows + along_columns).astype(np.float32)


# --------------------------------------------------------------------------- post-processing


def keep_largest_components(mask: np.ndarray, keep: int = 2) -> np.ndarray:
    """The ``keep`` largest 3D connected components (face connectivity) of a boolean volume."""
    components, count = ndimage.label(mask)
    if count <= keep:
        return mask.astype(bool)
    sizes = np.bincount(components.ravel())[1:]
    kept = np.argsort(sizes, kind="stable")[::-1][:keep] + 1
    return np.isin(components, kept)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes enclosed in 3D. Not slice by slice: at the lung bases an axial slice shows the lung as a
    ring around the diaphragm's dome, which a 2D fill would wrongly add to the lung."""
    return ndimage.binary_fill_holes(mask)


def _x_extent(x: np.ndarray) -> tuple[float, float]:
    return float(x.min()), float(x.max())


def _side_by_side(a: np.ndarray, b: np.ndarray) -> bool:
    (a0, a1), (b0, b1) = _x_extent(a), _x_extent(b)
    overlap = max(0.0, min(a1, b1) - max(a0, b0))
    return overlap < SIDE_BY_SIDE_OVERLAP * max(min(a1 - a0, b1 - b0), 1e-6)


def _midline_x(x: np.ndarray, bin_mm: float) -> float:
    """The sagittal plane (x) where the mask is thinnest, between its 30th and 70th x percentiles."""
    low, high = np.percentile(x, (30, 70))
    if high - low < bin_mm:
        return float(np.median(x))
    edges = np.arange(low, high + bin_mm, bin_mm)
    counts, _ = np.histogram(x, bins=edges)
    smoothed = np.convolve(counts, np.ones(3) / 3, mode="same") if len(counts) >= 3 else counts
    centre = int(np.argmin(smoothed))
    return float((edges[centre] + edges[centre + 1]) / 2)


def split_left_right(lungs: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Label volume: 0 background, 1 left lung (+x in LPS), 2 right lung."""
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    if not lungs.any():
        return labels
    x = geometry.patient_x(lungs.shape)
    components, count = ndimage.label(lungs)
    if count == 2 and _side_by_side(x[components == 1], x[components == 2]):
        means = [float(x[components == i].mean()) for i in (1, 2)]
        left = 1 if means[0] > means[1] else 2
        labels[components == left] = LEFT
        labels[(components > 0) & (components != left)] = RIGHT
        return labels
    midline = _midline_x(x[lungs], min(geometry.row_spacing, geometry.column_spacing))
    labels[lungs & (x > midline)] = LEFT
    labels[lungs & (x <= midline)] = RIGHT
    return labels


def postprocess(mask: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Thresholded network output → left/right label volume (see the module docstring)."""
    return split_left_right(fill_holes(keep_largest_components(mask, 2)), geometry)


def lung_volumes_ml(labels: np.ndarray, geometry: SliceGeometry) -> dict[str, float]:
    """Each lung's volume in mL from the voxel counts per slice and the slice geometry."""
    extents = geometry.slice_extents_mm()
    volumes = {}
    for name, value in (("left", LEFT), ("right", RIGHT)):
        per_slice = (labels == value).reshape(len(labels), -1).sum(axis=1)
        volumes[name] = float((per_slice * extents).sum() * geometry.pixel_area_mm2 / 1000.0)
    return volumes


# --------------------------------------------------------------------------- the pipeline


def batch_slices_for(spec: InputSpec, pixels: int = BATCH_PIXELS) -> int:
    return max(1, pixels // (spec.image_size * spec.image_size))


def segment_slices(model: torch.nn.Module, volume: np.ndarray, spec: InputSpec, device: torch.device,
                   batch_slices: int | None = None) -> tuple[np.ndarray, float]:
    """Sigmoid probabilities on the source grid for a normalised (slices, rows, columns) volume, and the
    seconds spent in the model's forward passes."""
    batch_slices = batch_slices or batch_slices_for(spec)
    boxed = [letterbox(plane, spec.image_size, keep_aspect=spec.keep_aspect, clahe=spec.clahe) for plane in volume]
    box = boxed[0][1]
    inputs = np.stack([image for image, _ in boxed])[:, None]
    outputs, seconds = [], 0.0
    for start in range(0, len(inputs), batch_slices):
        x = torch.from_numpy(inputs[start:start + batch_slices]).to(device, memory_format=torch.channels_last)
        began = time.perf_counter()
        with torch.inference_mode():
            probabilities = torch.sigmoid(model(x))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - began
        outputs.append(probabilities[:, 0].float().cpu().numpy())
    on_model_grid = np.concatenate(outputs)
    return np.stack([box.unpad_resize(plane) for plane in on_model_grid]), seconds


def segment_volume(model: torch.nn.Module, volume: np.ndarray, spec: InputSpec,
                   device: torch.device) -> tuple[np.ndarray, float]:
    """:func:`segment_slices` for a 3D network: the letterboxed slices stacked, MONAI's sliding window of
    ``spec.patch`` over the stack (a series with fewer slices than the patch is padded)."""
    from monai.inferers import sliding_window_inference

    boxed = [letterbox(plane, spec.image_size, keep_aspect=spec.keep_aspect, clahe=spec.clahe) for plane in volume]
    box = boxed[0][1]
    x = torch.from_numpy(np.stack([image for image, _ in boxed]))[None, None].to(device)
    began = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(x, spec.patch, SLIDING_WINDOW_BATCH, model,
                                          overlap=SLIDING_WINDOW_OVERLAP, mode="gaussian")
        probabilities = torch.sigmoid(logits)[0, 0].float().cpu().numpy()
    seconds = time.perf_counter() - began
    return np.stack([box.unpad_resize(plane) for plane in probabilities]), seconds


def segment_series(model: torch.nn.Module, volume: np.ndarray, spec: InputSpec, device: torch.device,
                   batch_slices: int | None = None) -> tuple[np.ndarray, float]:
    """Probabilities on the source grid by the network's dimensionality (``spec.patch``: 3D)."""
    if spec.patch is not None:
        return segment_volume(model, volume, spec, device)
    return segment_slices(model, volume, spec, device, batch_slices)


@dataclass(frozen=True)
class LungSegmentation:
    """What one model makes of one sorted series: the thresholded network output and what ships."""

    geometry: SliceGeometry
    raw: np.ndarray             # (slices, rows, columns) bool: the network's output at the threshold
    labels: np.ndarray          # after post-processing: 0 background, LEFT, RIGHT
    volumes_ml: dict[str, float]
    forward_seconds: float


def segment_lungs(model: torch.nn.Module, ordered: list[Dataset], spec: InputSpec, device: torch.device,
                  threshold: float = DEFAULT_THRESHOLD, batch_slices: int | None = None,
                  lap: Callable[[str], None] = lambda _: None) -> LungSegmentation:
    """Steps 1-5 of the module docstring on a sorted series: what the pipeline ships, and what
    training evaluates (``training.kinds.segmentation``), by this one function."""
    geometry = SliceGeometry.from_series(ordered)
    volume = normalise(np.stack([modality_values(ds) for ds in ordered]), spec.normalisation)
    lap("preprocess")
    probabilities, seconds = segment_series(model, volume, spec, device, batch_slices)
    lap("segment")  # letterboxing, forward passes, back onto the source grid
    raw = probabilities >= threshold
    labels = postprocess(raw, geometry)
    volumes = lung_volumes_ml(labels, geometry)
    lap("postprocess")
    return LungSegmentation(geometry, raw, labels, volumes, seconds)


class _StageClock:
    """Seconds per stage of one run (``laps``), kept in the job's summary: where a series' time
    goes, without a profiler."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 4)
        self._last = now


def segmentation_task(catalogue: TaskCatalogue) -> TaskDefinition:
    """The catalogue's (first: the shipped) segmentation task of this pipeline, whose two outputs are the
    left and the right lung."""
    task = next((t for t in catalogue.of_pipeline(PIPELINE) if t.kind == "segmentation"), None)
    if task is None or len(task.outputs) != 2:
        raise LookupError(f"the task catalogue has no segmentation task with two outputs (left, right lung) "
                          f"for the {PIPELINE} pipeline")
    return task


class LungMriPipeline:
    name = PIPELINE

    def __init__(self, batch_slices: int | None = None) -> None:
        self.batch_slices = batch_slices  # None: from BATCH_PIXELS and the model's input size

    def model_version(self, context: PipelineContext) -> str:
        task = segmentation_task(context.catalogue).name
        version = context.active(task)
        if version is None:
            raise NoActiveModel(task)
        return version.version

    def run(self, sources: list[Dataset], context: PipelineContext) -> PipelineOutput:
        task = segmentation_task(context.catalogue)
        loaded = context.model(task.name)
        clock = _StageClock()
        ordered = self._sorted(sources)
        version = loaded.version
        threshold = version.threshold if version.threshold is not None else DEFAULT_THRESHOLD
        result = segment_lungs(loaded.module, ordered, version.input_spec, context.device, threshold,
                               self.batch_slices, clock.lap)
        geometry, labels, volumes, seconds = result.geometry, result.labels, result.volumes_ml, result.forward_seconds
        shadow = "shadow-" if context.shadow else ""  # a shadow run: its own UIDs, marked not for clinical use
        algorithm = AlgorithmIdentity(name=f"cradle {task.name} {version.arch}"[:64],
                                      version=shadow + version.version, clinical=not shadow)
        segmentation = lung_segmentation(ordered, labels, algorithm)
        clock.lap("seg")
        report = lung_report(ordered, segmentation, volumes, algorithm)
        clock.lap("sr")
        datasets = [segmentation, report]
        if context.settings.inference.summary_image:
            datasets.append(self._summary_image(task, ordered, labels, volumes, algorithm))
            clock.lap("summary_image")
        summary = self._summary(loaded, ordered, geometry, volumes, seconds, context)
        summary["stage_seconds"] = clock.laps
        return PipelineOutput(model_version=algorithm.version, datasets=datasets, summary=summary)

    @staticmethod
    def _sorted(sources: list[Dataset]) -> list[Dataset]:
        images = [ds for ds in sources if "PixelData" in ds]
        if not images:
            raise PipelineInputError("the series holds no image")
        try:
            return sort_series(images)
        except WriterInputError as exc:
            raise PipelineInputError(str(exc)) from exc

    @staticmethod
    def _summary_image(task: TaskDefinition, ordered: list[Dataset], labels: np.ndarray,
                       volumes: dict[str, float], algorithm: AlgorithmIdentity) -> Dataset:
        """Secondary Capture of the slice with the most lung, both lungs drawn, volumes as text."""
        key = int(np.argmax((labels > 0).reshape(len(labels), -1).sum(axis=1)))
        left, right = (output.meaning for output in task.outputs)
        lines = [f"{left}: {volumes['left']:.1f} mL", f"{right}: {volumes['right']:.1f} mL",
                 f"Total: {volumes['left'] + volumes['right']:.1f} mL"]
        overlay = labels[key] if labels[key].any() else None
        return summary_image(ordered[key], overlay, lines, algorithm, pipeline=PIPELINE)

    @staticmethod
    def _summary(loaded: LoadedModel, ordered: list[Dataset], geometry: SliceGeometry, volumes: dict[str, float],
                 seconds: float, context: PipelineContext) -> dict[str, Any]:
        extents = geometry.slice_extents_mm()
        return {
            "pipeline": PIPELINE,
            "model_version": loaded.version.version,
            "slices": len(ordered),
            "rows": int(ordered[0].Rows),
            "columns": int(ordered[0].Columns),
            "slice_spacing_mm": float(np.median(extents)),
            "evenly_spaced": bool(np.allclose(extents, extents[0], rtol=0.01)),
            "volumes_ml": {**volumes, "total": volumes["left"] + volumes["right"]},
            "tasks_run": [loaded.version.task],
            "forward_seconds": {loaded.version.task: seconds},
            "dims": 2 if loaded.version.input_spec.patch is None else 3,
            "peak_rss_mb": peak_rss_mb(),  # the worker process's peak so far
            "device": str(context.device),
        }
