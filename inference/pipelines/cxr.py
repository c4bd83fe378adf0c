"""``cxr``: a child's radiograph (CR/DX) → view and findings → TID 1500 SR.

The tasks are the task catalogue's for the ``cxr`` pipeline: its view task and every finding task
(shipped: BPD risk, pneumonia by type, fracture, bone age; a site's own finding runs the same way),
each reported with the catalogue's SR concept and description.

1. Decode (any transfer syntax), Modality LUT, MONOCHROME1 inverted, min-max with 0.5 % clipping,
   resize keeping aspect (pad) to each model's input size, CLAHE when the model was trained with it.
2. The view classifier (PedXnet-style, softmax over the taxonomy's classes) runs on every image of the
   series; the image most likely to be a frontal chest film is reported (the first, for other films).
3. Each finding task runs only inside its population: the catalogue's (as a site narrowed it:
   modality, body part, the view model's 7-class view, age at the study) and the one its version was
   trained and validated on (:func:`outside_population`). By the version's outputs: one output is a
   probability (sigmoid of the logit over the version's temperature) and a call at the version's
   operating threshold, each positive call with a Grad-CAM heat map (PNG artefact) and the outline of
   its hot spot as the SR region (BPD, fracture; a yes/no pneumonia model); several outputs are class
   probabilities (softmax) and the most probable class (pneumonia by type); a regression task's
   output is a value in the catalogue's units (bone age in months), reported beside the
   chronological age.
4. The SR always goes out; it states the view and its probability, and for each finding outside its
   population that it was not applicable and why.

Missing models (decided so that no clinical statement comes from untrained weights and no
statement is implied for a model that did not run):

- no active, validated view model → :class:`NoActiveModel` ("no active model for view"): without
  the view gate nothing tells us what the film shows;
- no finding task active → ``NoActiveModel`` naming every finding task: an SR with a view only is no
  result;
- some of them active → they run; the SR carries a group only for the finding that ran, each group
  names its own model version (TID 4019 algorithm identification), so a missing finding reads as
  "not assessed", never as negative. The summary lists ``tasks_not_run`` with the reason.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from pydicom import Dataset
from pydicom.sr.coding import Code

from config.tasks import CodeSpec, Population, TaskCatalogue, TaskDefinition
from config.views import FRONTAL_CHEST, frontal_chest_classes, load_view_taxonomy
from inference.errors import NoActiveModel, PipelineInputError
from inference.gradcam import grad_cam, heat_map_png, hot_spot_polygon, upsample
from inference.pipelines import PipelineContext, PipelineOutput
from inference.preprocess import Letterbox, letterbox, modality_values, normalise
from inference.registry import InputSpec, LoadedModel, ModelVersion
from inference.results import AlgorithmIdentity, ClassCall, Estimate, Finding, ViewResult
from inference.sr.radiograph import Result
from inference.secondary_capture import summary_image
from inference.sr.radiograph import cxr_report
from node.routing import age_in_days

__all__ = ["CxrPipeline", "RADIOGRAPH_MODALITIES", "code_of", "finding_tasks", "view_task"]

RADIOGRAPH_MODALITIES = ("CR", "DX")
DEFAULT_THRESHOLD = 0.5
"""Operating threshold of a version registered without one (an import without ``--threshold``)."""
_LO = 64
PIPELINE = "cxr"


def code_of(spec: CodeSpec) -> Code:
    """The catalogue's coded concept as the writers take it."""
    return Code(spec.value, spec.scheme, spec.meaning)


def view_task(catalogue: TaskCatalogue) -> TaskDefinition:
    task = catalogue.view_task(PIPELINE)
    if task is None:
        raise LookupError(f"the task catalogue has no view task for the {PIPELINE} pipeline")
    return task


def finding_tasks(catalogue: TaskCatalogue) -> list[TaskDefinition]:
    """The findings the catalogue gives this pipeline, in catalogue order (the SR's order)."""
    return catalogue.findings(PIPELINE)


@dataclass
class _Radiograph:
    """One decoded source image and its model inputs, prepared once per input spec."""

    dataset: Dataset
    values: np.ndarray
    inputs: dict[InputSpec, tuple[np.ndarray, Letterbox]] = field(default_factory=dict)

    def model_input(self, spec: InputSpec) -> tuple[np.ndarray, Letterbox]:
        if spec not in self.inputs:
            normalised = normalise(self.values, spec.normalisation)
            self.inputs[spec] = letterbox(normalised, spec.image_size, keep_aspect=spec.keep_aspect,
                                          clahe=spec.clahe)
        return self.inputs[spec]


@dataclass(frozen=True)
class _FindingModel:
    task: TaskDefinition
    loaded: LoadedModel


@dataclass(frozen=True)
class _ViewCall:
    label: str
    probability: float
    frontal_probability: float
    is_frontal_chest: bool
    probabilities: dict[str, float]


def study_age_days(dataset: Dataset) -> int | None:
    """The patient's age at the study, in days (birth and study dates, else Patient's Age)."""
    return age_in_days(_date(dataset.get("PatientBirthDate")), _date(dataset.get("StudyDate")),
                       str(dataset.get("PatientAge", "") or ""))


def view_class(view: "_ViewCall") -> str:
    """The view model's call as a 7-class view (``chest_frontal`` when the frontal gate says so)."""
    return FRONTAL_CHEST if view.is_frontal_chest else load_view_taxonomy(None).parents.get(view.label, view.label)


def film_facts(dataset: Dataset, view: "_ViewCall") -> dict[str, Any]:
    """What a population is checked against, read once per film: modality, body part, the 7-class view and
    the age at the study."""
    return {"modality": str(dataset.get("Modality", "")), "body_part": str(dataset.get("BodyPartExamined", "") or ""),
            "view": view_class(view), "age_days": study_age_days(dataset)}


def outside_population(task: TaskDefinition, version: ModelVersion, facts: dict[str, Any]) -> str:
    """Why ``task`` does not apply to the film of ``facts`` ("" when it does): the task's population (the
    catalogue's, as the site set it), then the population ``version`` was trained and validated on."""
    reason = task.population.mismatch(**facts)
    if reason or not version.population:
        return reason
    validated = Population.model_validate(version.population).mismatch(**facts)
    return f"outside what {version.version} was validated on: {validated}" if validated else ""


def _date(value: object) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value or "").strip(), "%Y%m%d").date()
    except ValueError:
        return None


DAYS_PER_MONTH = 365.25 / 12


def _estimate(task: TaskDefinition, output: float, dataset: Dataset, algorithm: AlgorithmIdentity) -> Estimate:
    """A regression output in the catalogue's units, kept within its range; read beside the chronological
    age (in the same units, months) when the catalogue says so and the header gives it."""
    low, high = task.labels.range or (float("-inf"), float("inf"))
    value = round(float(min(max(task.value_of(output), low), high)), 1)
    beside = None
    age = study_age_days(dataset)
    if task.sr.beside is not None and age is not None:
        beside = (code_of(task.sr.beside), round(age / DAYS_PER_MONTH, 1))
    assert task.sr.units is not None  # a regression task has units (the catalogue checks)
    return Estimate(code_of(task.sr.concept), value, code_of(task.sr.units), beside, label=task.description,
                    algorithm=algorithm)


def algorithm_identity(version: ModelVersion, clinical: bool = True) -> AlgorithmIdentity:
    return AlgorithmIdentity(name=f"cradle {version.task} {version.arch}"[:_LO], version=version.version,
                             clinical=clinical)


def version_tag(versions: list[ModelVersion], shadow: bool = False) -> str:
    """The one string naming every model behind a result, e.g. ``view-2+bpd-3+pneumonia-1``; a shadow
    run's starts with ``shadow-`` (its UIDs differ from any clinical run's)."""
    return ("shadow-" if shadow else "") + "+".join(v.version for v in versions)


class _Timer:
    """Wall time of the model forwards (with a CUDA sync so that GPU time is counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def __call__(self, task: str, function, *args):  # noqa: ANN001, ANN204 - a thin timing wrapper
        start = time.perf_counter()
        result = function(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[task] = self.seconds.get(task, 0.0) + time.perf_counter() - start
        return result


def classify(model: torch.nn.Module, batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-stage activations and logits of a timm classifier for a (N, H, W) batch (inference mode,
    channels-last)."""
    x = torch.from_numpy(np.ascontiguousarray(batch[:, None])).to(device, memory_format=torch.channels_last)
    with torch.inference_mode():
        features = model.forward_features(x)
        logits = model.forward_head(features)
    return features, logits.float().cpu()


class CxrPipeline:
    name = PIPELINE

    # ---- models

    def active_versions(self, context: PipelineContext) -> list[ModelVersion]:
        """The versions a run would use now; NoActiveModel when the run would be refused."""
        view_name = view_task(context.catalogue).name
        view = context.active(view_name)
        if view is None:
            raise NoActiveModel(view_name)
        names = [task.name for task in finding_tasks(context.catalogue)]
        findings = [v for v in (context.active(name) for name in names) if v is not None]
        if not findings:
            raise NoActiveModel(*names)
        return [view, *findings]

    def model_version(self, context: PipelineContext) -> str:
        return version_tag(self.active_versions(context))

    def _load(self, context: PipelineContext) -> tuple[LoadedModel, dict[str, _FindingModel], dict[str, str]]:
        view = context.model(view_task(context.catalogue).name)
        tasks = finding_tasks(context.catalogue)
        if any(task.name in context.shadow for task in tasks):  # a finding's shadow run: that finding only
            tasks = [task for task in tasks if task.name in context.shadow]
        findings: dict[str, _FindingModel] = {}
        not_run: dict[str, str] = {}
        for task in tasks:
            try:
                findings[task.name] = _FindingModel(task, context.model(task.name))
            except NoActiveModel as exc:
                not_run[task.name] = str(exc)
        if not findings:
            raise NoActiveModel(*(task.name for task in tasks))
        return view, findings, not_run

    # ---- the run

    def run(self, sources: list[Dataset], context: PipelineContext) -> PipelineOutput:
        view_model, finding_models, not_run = self._load(context)
        images = [_Radiograph(ds, modality_values(ds)) for ds in self._radiographs(sources)]
        timer = _Timer(context.device)
        views = self._classify_views(images, view_model, context.device, timer)
        chosen = max(range(len(images)), key=lambda i: views[i].frontal_probability)
        image, view = images[chosen], views[chosen]
        findings: dict[str, Result] = {}
        artefacts: dict[str, bytes] = {}
        facts = film_facts(image.dataset, view)
        outside = {name: reason for name, model in finding_models.items()
                   if (reason := outside_population(model.task, model.loaded.version, facts))}
        for name, model in finding_models.items():
            if name not in outside:
                findings[name] = self._finding(model, image, context, timer, artefacts)
        not_run.update({name: f"not applicable: {reason}" for name, reason in outside.items()})
        used = [view_model.version, *(m.loaded.version for m in finding_models.values())]
        clinical = not context.shadow
        tag = version_tag(used, shadow=not clinical)
        algorithm = AlgorithmIdentity(name="cradle cxr", version=tag, clinical=clinical)
        report = cxr_report(
            image.dataset,
            ViewResult(view.label, view.probability, view.is_frontal_chest,
                       algorithm_identity(view_model.version, clinical)),
            list(findings.values()),
            algorithm,
            model_version_tag=tag,
            not_applicable=[(finding_models[name].task.description, reason) for name, reason in outside.items()],
            chest=facts["view"].startswith("chest"),
        )
        datasets = [report]
        if context.settings.inference.summary_image:
            datasets.append(self._summary_image(image.dataset, view, findings, algorithm))
        summary = self._summary(tag, image, view, views, findings, finding_models, not_run, timer, context)
        return PipelineOutput(model_version=tag, datasets=datasets, summary=summary, artefacts=artefacts)

    @staticmethod
    def _radiographs(sources: list[Dataset]) -> list[Dataset]:
        images = [ds for ds in sources if "PixelData" in ds and str(ds.get("Modality", "")) in RADIOGRAPH_MODALITIES]
        if not images:
            raise PipelineInputError(f"the series holds no {'/'.join(RADIOGRAPH_MODALITIES)} image")
        return images

    def _classify_views(self, images: list[_Radiograph], loaded: LoadedModel, device: torch.device,
                        timer: _Timer) -> list[_ViewCall]:
        version = loaded.version
        classes = list(version.classes or [])
        frontal = [i for i, c in enumerate(classes) if c in frontal_chest_classes(classes)]
        if not frontal:
            raise PipelineInputError(f"view model {version.version} has no frontal chest class among {classes}")
        batch = np.stack([image.model_input(version.input_spec)[0] for image in images])
        _, logits = timer(version.task, classify, loaded.module, batch, device)
        probabilities = torch.softmax(logits / version.temperature, dim=1).numpy()
        threshold = version.threshold if version.threshold is not None else DEFAULT_THRESHOLD
        return [self._view_call(p, classes, frontal, threshold) for p in probabilities]

    @staticmethod
    def _view_call(p: np.ndarray, classes: list[str], frontal: list[int], threshold: float) -> _ViewCall:
        best = int(np.argmax(p))
        frontal_probability = float(min(1.0, p[frontal].sum()))
        return _ViewCall(classes[best], float(p[best]), frontal_probability, frontal_probability >= threshold,
                         {c: float(v) for c, v in zip(classes, p)})

    @staticmethod
    def _finding(model: _FindingModel, image: _Radiograph, context: PipelineContext, timer: _Timer,
                 artefacts: dict[str, bytes]) -> Result:
        """The task's result by its kind and the version's outputs: a probability and a call (one output of
        a classification task), class probabilities (several outputs), or an estimate (regression)."""
        task, loaded = model.task, model.loaded
        version = loaded.version
        model_input, box = image.model_input(version.input_spec)
        features, logits = timer(task.name, classify, loaded.module, model_input[None], context.device)
        algorithm = algorithm_identity(version, not context.shadow)
        if task.kind == "regression":
            return _estimate(task, float(logits[0, 0]), image.dataset, algorithm)
        if version.num_outputs > 1:
            probabilities = torch.softmax(logits[0] / version.temperature, dim=0).tolist()
            codes = [code_of(task.sr.classes[c]) if c in task.sr.classes else Code(c, "99CRADLE", c)
                     for c in version.classes or []]
            return ClassCall(code_of(task.sr.concept), tuple(zip(codes, probabilities)), label=task.description,
                             algorithm=algorithm)
        probability = float(torch.sigmoid(logits[0, 0] / version.temperature))
        threshold = version.threshold if version.threshold is not None else DEFAULT_THRESHOLD
        positive = probability >= threshold
        region = None
        if positive and context.settings.inference.gradcam:
            heat = upsample(grad_cam(loaded.module, features), box)
            region = hot_spot_polygon(heat)
            artefacts[f"gradcam-{task.name}.png"] = heat_map_png(model_input, heat)
        return Finding(code_of(task.sr.concept), probability, threshold, positive, region=region,
                       label=task.description, algorithm=algorithm)

    @staticmethod
    def _summary_image(source: Dataset, view: _ViewCall, findings: dict[str, Result],
                       algorithm: AlgorithmIdentity) -> Dataset:
        """Secondary Capture for viewers without SR support: the image, the positive findings' hot
        spots (overlay labels 1, 2) and the calls as text."""
        overlay = np.zeros((int(source.Rows), int(source.Columns)), dtype=np.uint8)
        lines = [f"View: {view.label} ({view.probability:.0%})"]
        if not findings:
            lines.append("No finding applies to this film")
        for number, finding in enumerate(findings.values(), start=1):
            lines.append(_in_words(finding))
            if isinstance(finding, Finding) and finding.region is not None:
                cv2.fillPoly(overlay, [np.round(finding.region - 0.5).astype(np.int32)], number)
        return summary_image(source, overlay if overlay.any() else None, lines, algorithm, pipeline=PIPELINE,
                             model_version_tag=algorithm.version)

    @staticmethod
    def _summary(tag: str, image: _Radiograph, view: _ViewCall, views: list[_ViewCall], findings: dict[str, Result],
                 models: dict[str, _FindingModel], not_run: dict[str, str], timer: _Timer,
                 context: PipelineContext) -> dict[str, Any]:
        return {
            "pipeline": PIPELINE,
            "model_version": tag,
            "image": str(image.dataset.SOPInstanceUID),
            "images_classified": len(views),
            "view": {"label": view.label, "probability": view.probability,
                     "frontal_chest_probability": view.frontal_probability,
                     "is_frontal_chest": view.is_frontal_chest},
            "findings": {task: {**_summary_of(finding), "model": models[task].loaded.version.version}
                         | ({"threshold_source": "version" if models[task].loaded.version.threshold is not None
                             else "default"} if isinstance(finding, Finding) else {})
                         for task, finding in findings.items()},
            "tasks_run": [view_task(context.catalogue).name, *findings],
            "tasks_not_run": not_run,
            "forward_seconds": timer.seconds,
            "device": str(context.device),
        }


def _in_words(finding: Result) -> str:
    """One line of the summary image."""
    if isinstance(finding, ClassCall):
        classes = ", ".join(f"{code.meaning} {p:.0%}" for code, p in finding.probabilities)
        return f"{finding.tracking_label}: {finding.call.meaning} ({classes})"
    if isinstance(finding, Estimate):
        beside = f"; {finding.beside[0].meaning.lower()} {finding.beside[1]:.1f}" if finding.beside else ""
        return f"{finding.tracking_label}: {finding.value:.1f} {finding.unit.meaning}s{beside}"
    call = "POSITIVE" if finding.positive else "negative"
    return f"{finding.tracking_label}: {finding.probability:.0%} (threshold {finding.threshold:.0%}) {call}"


def _summary_of(finding: Result) -> dict[str, Any]:
    """A finding in the job summary. An estimate's value stays in the SR: a bone age is close to the
    patient's age, which the summary (job rows, logs) never carries."""
    if isinstance(finding, ClassCall):
        return {"probabilities": {code.meaning: p for code, p in finding.probabilities}, "call": finding.call.meaning}
    if isinstance(finding, Estimate):
        return {"estimated": True, "units": finding.unit.value, "beside": finding.beside is not None}
    return {"probability": finding.probability, "threshold": finding.threshold, "positive": finding.positive,
            "region": finding.region is not None}
