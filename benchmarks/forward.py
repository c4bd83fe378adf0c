"""Model forward time inside the pipelines over the bare forward of the same architecture and input.

    python -m benchmarks.forward [--small] [--repeat 5] [--threads 2] [--slices 60] [--json]

For every model (view InceptionV3, BPD ResNet-50, pneumonia RegNetY-064 at 512 px; lung-seg
FlexibleUNet-ResNet-50 at 256 px on a 60-slice series; ``--small``: resnet18 at 128 px and
flexible_unet_resnet18 at 64 px), in one process and on the same device:

- *pipeline*: the forward seconds the pipeline itself records (``summary["forward_seconds"]``) in a
  full ``cxr`` / ``lung-mri`` run through the registry and the worker's ModelCache;
- *bare*: a plain ``model(x)`` of a freshly built network of the same architecture with the same
  weights, default memory format, under ``torch.no_grad()``, on the identical preprocessed input
  (for lung-seg: all slices in one batch).

Every pipeline run sits between two bare runs (bare, pipeline, bare, ...), after one untimed
warm-up round. The ratio (target ≤ 1.1) is the median over rounds of the pipeline's forward over
the mean of the two bare forwards around it, which keeps drifting load from other processes out of
the comparison; the medians and the best-over-best ratio are printed beside. The pipelines' other time
(decoding, preprocessing, Grad-CAM, post-processing, writing SR/SEG) is printed too.
"""

from __future__ import annotations

import datetime as dt
import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset

from config.settings import load_settings
from inference.models import create_model, view_taxonomy
from inference.pipelines import PipelineContext, get_pipeline
from inference.preprocess import letterbox, modality_values, normalise, prepare_radiograph
from inference.registry import InputSpec, ModelCache, ModelRegistry, ModelVersion
from training.synth import make_cxr, make_mr_series, make_study
from training.synth.patients import make_child

TARGET = 1.1
PRODUCTION = {"view": ("inception_v3", 512), "bpd": ("resnet50", 512), "pneumonia": ("regnety_064", 512),
              "lung-seg": ("flexible_unet_resnet50", 256)}
SMALL = {"view": ("resnet18", 128), "bpd": ("resnet18", 128), "pneumonia": ("resnet18", 128),
         "lung-seg": ("flexible_unet_resnet18", 64)}


@dataclass
class ModelTiming:
    task: str
    arch: str
    input_shape: list[int]
    pipeline_seconds: list[float] = field(default_factory=list)
    bare_seconds: list[float] = field(default_factory=list)

    @property
    def paired_ratios(self) -> list[float]:
        """Each pipeline forward over the mean of the bare forwards just before and just after it."""
        bare = self.bare_seconds
        return [p / ((bare[2 * i] + bare[2 * i + 1]) / 2) for i, p in enumerate(self.pipeline_seconds)]

    @property
    def ratio(self) -> float:
        """Median of the paired ratios: robust to other load on the machine drifting during the run."""
        return statistics.median(self.paired_ratios)

    @property
    def best_ratio(self) -> float:
        """Best over best: the runs least disturbed by other load."""
        return min(self.pipeline_seconds) / min(self.bare_seconds)


def _weights(task: str, arch: str) -> dict[str, torch.Tensor]:
    """Random weights with a constant head: the view model says chest_frontal and BPD positive, so
    the whole cxr path (Grad-CAM included) runs; the segmentation head is left as initialised."""
    classes = list(view_taxonomy().classes)
    torch.manual_seed(0)
    model = create_model(arch, task, num_classes={"view": len(classes), "pneumonia": 3}.get(task, 1))
    state = model.state_dict()
    if task != "lung-seg":
        head = next(name for name, module in model.named_modules() if module is model.get_classifier())
        state[f"{head}.weight"] = torch.zeros_like(state[f"{head}.weight"])  # random nets' features explode
        index = classes.index("chest_frontal") if task == "view" else 0
        state[f"{head}.bias"][index] = -8.0 if task == "pneumonia" else 8.0
    return state


def _child_chest(size: int) -> Dataset:
    """A 3-year-old's frontal chest film (the pneumonia model's population)."""
    rng = np.random.default_rng(3)
    when = dt.datetime(2026, 6, 1, 10)
    study = make_study(make_child(rng, 1, when.date(), (3.0, 3.0)), 1, when, key=("forward", "child"), weight_kg=14.0)
    return make_cxr(rng, study=study, modality="CR", photometric="MONOCHROME1", size=size)


def _registry(models_dir: Path, archs: dict[str, tuple[str, int]]) -> ModelRegistry:
    registry = ModelRegistry(models_dir)
    for task, (arch, size) in archs.items():
        version = registry.register(task, arch, _weights(task, arch), input_spec=InputSpec(size), threshold=0.5,
                                    provenance={"source": "benchmark"})
        registry.activate(task, version.version, accept_unvalidated=True, reason="benchmark")
    return registry


def _bare_model(registry: ModelRegistry, version: ModelVersion, device: torch.device) -> torch.nn.Module:
    model = create_model(version.arch, version.task, num_classes=version.num_outputs)
    model.load_state_dict(registry.load(version, "cpu").state_dict())
    return model.eval().to(device)


def _bare_seconds(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _cxr_input(source, version: ModelVersion, device: torch.device) -> torch.Tensor:  # noqa: ANN001
    spec = version.input_spec
    image, _ = prepare_radiograph(source, spec.image_size, normalisation=spec.normalisation,
                                  keep_aspect=spec.keep_aspect, clahe=spec.clahe)
    return torch.from_numpy(image[None, None]).to(device)


def _mr_input(series, version: ModelVersion, device: torch.device) -> torch.Tensor:  # noqa: ANN001
    spec = version.input_spec
    ordered = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = normalise(np.stack([modality_values(ds) for ds in ordered]), spec.normalisation)
    slices = np.stack([letterbox(plane, spec.image_size, keep_aspect=spec.keep_aspect)[0] for plane in volume])
    return torch.from_numpy(slices[:, None]).to(device)


def _time_bare(tasks: tuple[str, ...], bare: dict, inputs: dict, device: torch.device,
               timings: dict[str, ModelTiming] | None) -> None:
    for task in tasks:
        seconds = _bare_seconds(bare[task], inputs[task], device)
        if timings is not None:
            timings[task].bare_seconds.append(seconds)


def run(archs: dict[str, tuple[str, int]], repeat: int, slices: int) -> tuple[list[ModelTiming], dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(None, models_dir=str(Path(tmp) / "models"))
        registry = _registry(settings.models_dir, archs)
        context = PipelineContext(registry=registry, device=settings.inference.device, settings=settings,
                                  models=ModelCache())
        device = context.device
        radiograph = make_cxr(np.random.default_rng(1), modality="CR", photometric="MONOCHROME1", size=1024)
        child = _child_chest(size=1024)
        series, _ = make_mr_series(np.random.default_rng(2), shape=(slices, 128, 128))
        # a day-1 film runs view and BPD; a 3-year-old's chest film view and pneumonia (their populations)
        jobs = {"cxr": ([radiograph], ("view", "bpd")), "cxr-child": ([child], ("view", "pneumonia")),
                "lung-mri": (series, ("lung-seg",))}
        bare, inputs, timings = {}, {}, {}
        for task, (arch, _) in archs.items():
            version = registry.active(task)
            bare[task] = _bare_model(registry, version, device)
            inputs[task] = (_mr_input(series, version, device) if task == "lung-seg"
                            else _cxr_input(child if task == "pneumonia" else radiograph, version, device))
            timings[task] = ModelTiming(task, arch, list(inputs[task].shape))
        wall: dict[str, list[float]] = {name: [] for name in jobs}
        other: dict[str, list[float]] = {name: [] for name in jobs}
        stages: dict[str, list[float]] = {}  # "<pipeline> <stage>" → seconds per round, where recorded
        for round_ in range(repeat + 1):  # round 0 warms up (model loading, first-call allocations)
            for name, (sources, tasks) in jobs.items():
                _time_bare(tasks, bare, inputs, device, timings if round_ else None)
                start = time.perf_counter()
                output = get_pipeline(name.removesuffix("-child")).run(list(sources), context)
                elapsed = time.perf_counter() - start
                _time_bare(tasks, bare, inputs, device, timings if round_ else None)
                if round_:
                    forward = output.summary["forward_seconds"]
                    wall[name].append(elapsed)
                    other[name].append(elapsed - sum(forward.values()))
                    for task in tasks:
                        timings[task].pipeline_seconds.append(forward[task])
                    for stage, seconds in (output.summary.get("stage_seconds") or {}).items():
                        stages.setdefault(f"{name} {stage}", []).append(seconds)
        overhead = {f"{name}_other_seconds": statistics.median(values) for name, values in other.items()}
        overhead.update({f"{name}_stage_seconds": statistics.median(values) for name, values in stages.items()})
        overhead.update({f"{name}_wall_seconds": statistics.median(values) for name, values in wall.items()})
        return list(timings.values()), overhead


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="test-sized models (resnet18, flexible_unet_resnet18)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--slices", type=int, default=60, help="slices of the MR series")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    timings, overhead = run(SMALL if args.small else PRODUCTION, args.repeat, args.slices)
    if args.json:
        print(json.dumps({"target": TARGET, "models": [{**asdict(t), "ratio": t.ratio, "best_ratio": t.best_ratio,
                                                        "paired_ratios": t.paired_ratios}
                                                       for t in timings],
                          **overhead}, indent=2))
    else:
        print(f"{'task':<10} {'arch':<24} {'input':<16} {'pipeline s':>10} {'bare s':>8} {'ratio':>6} "
              f"{'best p':>8} {'best b':>8} {'ratio':>6}  target ≤ {TARGET} (median of paired ratios)")
        for t in timings:
            print(f"{t.task:<10} {t.arch:<24} {'x'.join(map(str, t.input_shape)):<16} "
                  f"{statistics.median(t.pipeline_seconds):>10.3f} {statistics.median(t.bare_seconds):>8.3f} "
                  f"{t.ratio:>6.2f} {min(t.pipeline_seconds):>8.3f} {min(t.bare_seconds):>8.3f} "
                  f"{t.best_ratio:>6.2f}  {'ok' if t.ratio <= TARGET else 'OVER'}")
        print("pipeline time outside the forwards (decode, preprocess, Grad-CAM, post-processing, SR/SEG): "
              + ", ".join(f"{k.removesuffix('_other_seconds')} {v:.2f} s" for k, v in overhead.items()
                          if k.endswith("_other_seconds")))
        staged = {k.removesuffix("_stage_seconds"): v for k, v in overhead.items() if k.endswith("_stage_seconds")}
        if staged:
            print("pipeline stages (median): " + ", ".join(f"{k} {v:.2f} s" for k, v in staged.items()))
    return 0 if all(t.ratio <= TARGET for t in timings) else 1


if __name__ == "__main__":
    sys.exit(main())
