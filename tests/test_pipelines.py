"""The cxr and lung-mri pipelines on synthetic DICOM, with small registered models (resnet18 at 128 px,
flexible_unet_resnet18 at 64 px). Random weights with a chosen output bias stand in for trained
ones: the admin's explicit activation is what makes them runnable, as for an import."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pytest
import torch
from pydicom import Dataset, dcmread
from pydicom.uid import JPEG2000Lossless
from scipy import ndimage

from config.settings import Settings, load_settings
from config.tasks import TaskCatalogue
from inference.gradcam import grad_cam, hot_spot_polygon, upsample
from inference.models import create_model, view_taxonomy
from inference.pipelines import NoActiveModel, PipelineContext, PipelineInputError, get_pipeline
from inference.pipelines.cxr import classify
from inference.pipelines.lung_mri import (LEFT, RIGHT, SliceGeometry, lung_volumes_ml, postprocess,
                                          split_left_right)
from inference.preprocess import letterbox, minmax_clipped, modality_values, prepare_radiograph
from inference.registry import InputSpec, ModelCache, ModelRegistry
from site_tasks import TOY
from training.synth import lung_volumes_ml as true_volumes_ml
from training.synth import make_cxr, make_mr_series

CXR_SPEC = InputSpec(image_size=128)
SEG_SPEC = InputSpec(image_size=64)
VIEWS = list(view_taxonomy().classes)
PNEUMONIA_CLASSES = ["normal", "bacterial", "viral"]
BONE_AGE_OUTPUT = 0.4
"""A bone-age model's output: 0.4 of the catalogue's 0-240 months, 96 months."""


def biased_state(task: str, arch: str, bias: dict[int, float] | float, seed: int = 0,
                 catalogue: TaskCatalogue | None = None) -> dict[str, torch.Tensor]:
    """Random weights whose output bias is set: the model's answer is known in advance."""
    torch.manual_seed(seed)
    outputs = {"view": len(VIEWS), "pneumonia": len(PNEUMONIA_CLASSES)}.get(task, 1)
    model = create_model(arch, task, num_classes=outputs, catalogue=catalogue)
    state = model.state_dict()
    key = "segmentation_head.0.bias" if task == "lung-seg" else "fc.bias"
    if task != "lung-seg":
        state["fc.weight"] = state["fc.weight"] * 0.01  # the bias dominates the logit
    values = bias if isinstance(bias, dict) else {0: bias}
    for index, value in values.items():
        state[key][index] = value
    return state


def register_active(registry: ModelRegistry, task: str, arch: str, bias: dict[int, float] | float,
                    spec: InputSpec, **kwargs: object) -> str:
    state = biased_state(task, arch, bias, catalogue=registry.catalogue)
    version = registry.register(task, arch, state, input_spec=spec, **kwargs)
    registry.activate(task, version.version, accept_unvalidated=True, reason="test weights")
    return version.version


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(None, models_dir=str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def registry(settings: Settings) -> ModelRegistry:
    registry = ModelRegistry(settings.models_dir)
    register_active(registry, "view", "resnet18", {VIEWS.index("chest_frontal"): 6.0}, CXR_SPEC)
    register_active(registry, "bpd", "resnet18", 4.0, CXR_SPEC, threshold=0.4)
    register_active(registry, "pneumonia", "resnet18", {1: 4.0}, CXR_SPEC, temperature=1.5)
    register_active(registry, "fracture", "resnet18", 4.0, CXR_SPEC, threshold=0.5)
    register_active(registry, "bone-age", "resnet18", BONE_AGE_OUTPUT, CXR_SPEC)
    register_active(registry, "lung-seg", "flexible_unet_resnet18", 8.0, SEG_SPEC)
    return registry


@pytest.fixture(scope="module")
def context(registry: ModelRegistry, settings: Settings) -> PipelineContext:
    return PipelineContext(registry=registry, device="auto", settings=settings, models=ModelCache())


@pytest.fixture(scope="module")
def cr_monochrome1() -> Dataset:
    return make_cxr(np.random.default_rng(3), modality="CR", photometric="MONOCHROME1", size=384)


@pytest.fixture(scope="module")
def mr_series() -> tuple[list[Dataset], np.ndarray]:
    return make_mr_series(np.random.default_rng(5), shape=(24, 96, 96))


def roundtrip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def dciodvfy_errors(ds: Dataset, path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


# --------------------------------------------------------------------------- preprocessing


def test_monochrome1_is_inverted() -> None:
    inverted = make_cxr(np.random.default_rng(11), modality="CR", photometric="MONOCHROME1", size=128)
    plain = make_cxr(np.random.default_rng(11), modality="CR", photometric="MONOCHROME2", size=128)
    assert not np.array_equal(inverted.pixel_array, plain.pixel_array)
    assert np.corrcoef(modality_values(inverted).ravel(), modality_values(plain).ravel())[0, 1] > 0.999
    image_1, _ = prepare_radiograph(inverted, 64)
    image_2, _ = prepare_radiograph(plain, 64)
    np.testing.assert_allclose(image_1, image_2, atol=1e-5)


def test_min_max_clips_half_a_percent_each_side() -> None:
    values = np.random.default_rng(0).normal(size=(200, 200)).astype(np.float32)
    values[0, :50] = 1e6  # outliers do not stretch the range
    scaled = minmax_clipped(values)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    assert np.mean(scaled == 0.0) == pytest.approx(0.005, abs=0.001)
    assert np.mean(scaled == 1.0) == pytest.approx(0.005, abs=0.001)
    assert 0.4 < np.median(scaled) < 0.6


def test_resize_keeps_the_aspect_ratio_and_pads() -> None:
    image = np.ones((200, 100), dtype=np.float32)
    boxed, box = letterbox(image, 64)
    assert boxed.shape == (64, 64)
    assert (box.rows, box.columns, box.offset_rows, box.offset_columns) == (64, 32, 0, 16)
    assert boxed[:, :16].max() == 0.0 and boxed[:, 48:].max() == 0.0 and boxed[:, 16:48].min() == pytest.approx(1.0)
    corners = box.to_source(np.array([[16.0, 0.0], [48.0, 64.0]]))
    np.testing.assert_allclose(corners, [[0, 0], [100, 200]])


# --------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_points_at_the_activations_that_raise_the_logit() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", "bpd").eval()
    x = torch.rand(1, 1, 128, 128)
    features, logits = classify(model, x[0].numpy(), torch.device("cpu"))
    with torch.no_grad():
        np.testing.assert_allclose(logits.numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)  # = the bare forward
    planted = torch.zeros(1, 512, 4, 4)
    planted[0, :, 1, 2] = torch.relu(model.fc.weight[0]).detach()  # channels that vote for the finding
    cam = grad_cam(model, planted)
    assert np.unravel_index(np.argmax(cam), cam.shape) == (1, 2) and cam.max() == 1.0
    source = np.zeros((300, 200), dtype=np.float32)
    _, box = letterbox(source, 128)
    polygon = hot_spot_polygon(upsample(cam, box))
    centre = polygon[:-1].mean(axis=0)  # (column, row) in the source image
    expected = box.to_source(np.array([[2.5 * 32, 1.5 * 32]]))[0]  # centre of grid cell (row 1, column 2)
    assert np.abs(centre - expected).max() < 10, (centre, expected)
    assert np.array_equal(polygon[0], polygon[-1])


# --------------------------------------------------------------------------- cxr


ALL_CXR_VERSIONS = "view-1+bpd-1+pneumonia-1+fracture-1+bone-age-1"


def test_cxr_on_a_monochrome1_cr(cr_monochrome1: Dataset, context: PipelineContext, tmp_path: Path) -> None:
    """A day-1 film: BPD runs; pneumonia (children from 1 year), fracture and bone age do not, each said why."""
    output = get_pipeline("cxr").run([cr_monochrome1], context)
    assert output.model_version == ALL_CXR_VERSIONS
    summary = output.summary
    assert summary["view"]["label"] == "chest_frontal" and summary["view"]["is_frontal_chest"]
    findings = summary["findings"]
    assert set(findings) == {"bpd"} and summary["tasks_run"] == ["view", "bpd"]
    assert summary["tasks_not_run"] == {"pneumonia": "not applicable: younger than 1 year",
                                        "fracture": "not applicable: another body part",
                                        "bone-age": "not applicable: another body part"}
    assert 0.0 <= findings["bpd"]["probability"] <= 1.0
    assert findings["bpd"]["positive"] and findings["bpd"]["threshold"] == 0.4 and findings["bpd"]["region"]
    heat_map = cv2.imdecode(np.frombuffer(output.artefacts["gradcam-bpd.png"], np.uint8), cv2.IMREAD_COLOR)
    assert heat_map is not None and heat_map.shape[2] == 3
    assert list(output.artefacts) == ["gradcam-bpd.png"]  # only positive findings get a heat map
    assert set(summary["forward_seconds"]) == {"view", "bpd"}

    (sr,) = output.datasets
    assert dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
    report = hd.sr.srread(tmp_path / "sr.dcm")
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cr_monochrome1.SOPInstanceUID
    probabilities = [_fraction(item) for item in _walk(report.ContentSequence)
                     if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "122157"]
    assert len(probabilities) == 2 and all(0.0 <= p <= 1.0 for p in probabilities)
    stated = {round(p, 4) for p in probabilities}
    assert {round(summary["view"]["probability"], 4), round(findings["bpd"]["probability"], 4)} == stated
    regions = [item for item in _walk(report.ContentSequence) if item.ValueType == "SCOORD"]
    assert len(regions) == 1  # the positive BPD call's hot spot
    points = np.asarray(regions[0].GraphicData, dtype=float).reshape(-1, 2)
    assert points[:, 0].max() <= cr_monochrome1.Columns and points[:, 1].max() <= cr_monochrome1.Rows
    comments = _texts(report, "121106")
    assert comments == ["Pneumonia: not applicable (younger than 1 year)",
                        "Fracture: not applicable (another body part)",
                        "Bone age: not applicable (another body part)"]


def test_cxr_on_jpeg2000_gives_the_same_answer(cr_monochrome1: Dataset, context: PipelineContext,
                                               tmp_path: Path) -> None:
    compressed = copy.deepcopy(cr_monochrome1)
    compressed.compress(JPEG2000Lossless)
    compressed = roundtrip(compressed)
    assert compressed.file_meta.TransferSyntaxUID == JPEG2000Lossless
    plain = get_pipeline("cxr").run([cr_monochrome1], context).summary["findings"]
    decoded = get_pipeline("cxr").run([compressed], context)
    assert decoded.summary["findings"]["bpd"]["probability"] == pytest.approx(plain["bpd"]["probability"], abs=1e-5)
    assert dciodvfy_errors(decoded.datasets[0], tmp_path / "sr.dcm") == []


def test_no_active_model_refuses_before_any_output(settings: Settings, cr_monochrome1: Dataset,
                                                   mr_series: tuple[list[Dataset], np.ndarray],
                                                   tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    context = PipelineContext(registry=registry, device="cpu", settings=settings, models=ModelCache())
    with pytest.raises(NoActiveModel) as caught:
        get_pipeline("cxr").run([cr_monochrome1], context)
    assert str(caught.value) == "no active model for view"
    with pytest.raises(NoActiveModel) as caught:
        get_pipeline("lung-mri").run(mr_series[0], context)
    assert str(caught.value) == "no active model for lung-seg"

    register_active(registry, "view", "resnet18", {VIEWS.index("chest_frontal"): 6.0}, CXR_SPEC)
    unvalidated = registry.register("bpd", "resnet18", biased_state("bpd", "resnet18", 4.0), input_spec=CXR_SPEC)
    with pytest.raises(NoActiveModel) as caught:
        get_pipeline("cxr").run([cr_monochrome1], context)
    assert str(caught.value) == "no active model for bpd, pneumonia, fracture, bone-age"
    assert unvalidated.state == "candidate"  # registered but never activated: never run

    register_active(registry, "fracture", "resnet18", -4.0, CXR_SPEC)
    output = get_pipeline("cxr").run([cr_monochrome1], context)
    assert output.model_version == "view-1+fracture-1"
    assert output.summary["tasks_run"] == ["view"] and output.summary["findings"] == {}
    assert output.summary["tasks_not_run"] == {"bpd": "no active model for bpd",
                                               "pneumonia": "no active model for pneumonia",
                                               "bone-age": "no active model for bone-age",
                                               "fracture": "not applicable: another body part"}


def test_a_series_the_pipeline_cannot_read_is_a_permanent_error(context: PipelineContext,
                                                                mr_series: tuple[list[Dataset], np.ndarray],
                                                                cr_monochrome1: Dataset) -> None:
    with pytest.raises(PipelineInputError, match="holds no CR/DX image"):
        get_pipeline("cxr").run(mr_series[0][:2], context)
    with pytest.raises(PipelineInputError, match="ImageOrientationPatient"):
        get_pipeline("lung-mri").run([cr_monochrome1], context)


def test_context_from_settings(settings: Settings) -> None:
    context = PipelineContext.from_settings(settings)
    assert context.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert context.registry.models_dir == settings.models_dir and context.models.loaded() == {}


def test_not_a_frontal_chest_film_still_gets_an_sr(registry: ModelRegistry, context: PipelineContext,
                                                   cr_monochrome1: Dataset, tmp_path: Path) -> None:
    """Also: the worker's cache picks up a newly activated view version without a restart."""
    before = get_pipeline("cxr").run([cr_monochrome1], context)
    assert before.summary["view"]["is_frontal_chest"]
    abdomen = register_active(registry, "view", "resnet18", {VIEWS.index("abdomen"): 6.0}, CXR_SPEC)
    try:
        after = get_pipeline("cxr").run([cr_monochrome1], context)
        assert context.models.loaded()["view"] == abdomen
        assert after.model_version == ALL_CXR_VERSIONS.replace("view-1", abdomen) != before.model_version
        assert after.summary["view"]["label"] == "abdomen" and not after.summary["view"]["is_frontal_chest"]
        assert after.summary["findings"] == {} and after.artefacts == {}
        assert after.summary["tasks_not_run"] == {"bpd": "not applicable: not a frontal chest film",
                                                  "pneumonia": "not applicable: not a frontal chest film",
                                                  "fracture": "not applicable: another body part",
                                                  "bone-age": "not applicable: another body part"}
        (sr,) = after.datasets
        assert sr.SOPInstanceUID != before.datasets[0].SOPInstanceUID  # a new version, a new result
        assert dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
        stated = " ".join(str(item.get("TextValue", "")) + " " + " ".join(
            code.CodeMeaning for code in item.get("ConceptCodeSequence", [])) for item in _walk(sr.ContentSequence))
        assert "abdomen" in stated and "not a frontal chest" in stated.lower()
        assert "67569000" not in str(sr) and "233604007" not in str(sr)  # no BPD, no pneumonia statement
    finally:
        registry.rollback("view")
    assert get_pipeline("cxr").run([cr_monochrome1], context).summary["view"]["is_frontal_chest"]


def _texts(report: Dataset, concept: str) -> list[str]:
    """The TEXT values of ``concept`` (e.g. 121106 Comment) anywhere in the SR, in order."""
    return [str(item.TextValue) for item in _walk(report.ContentSequence)
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == concept]


def _fraction(item: Dataset) -> float:
    """A NUM probability as a fraction, whether the SR states it in % or as a ratio."""
    value = float(item.MeasuredValueSequence[0].NumericValue)
    unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
    return value / 100.0 if unit == "%" else value


def _walk(items):  # noqa: ANN001, ANN202
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


# --------------------------------------------------------------------------- lung-mri


def test_lung_mri_gives_a_seg_with_two_frames_per_slice(context: PipelineContext, tmp_path: Path,
                                                        mr_series: tuple[list[Dataset], np.ndarray]) -> None:
    series, _ = mr_series
    shuffled = [series[i] for i in np.random.default_rng(0).permutation(len(series))]
    output = get_pipeline("lung-mri").run(shuffled, context)
    assert output.model_version == "lung-seg-1"
    seg, sr = output.datasets
    assert seg.NumberOfFrames == len(series) * 2
    volumes = output.summary["volumes_ml"]
    assert volumes["left"] > 0 and volumes["right"] > 0
    for ds, name in ((seg, "seg.dcm"), (sr, "sr.dcm")):
        assert dciodvfy_errors(ds, tmp_path / name) == []
    assert isinstance(hd.sr.srread(tmp_path / "sr.dcm").content, hd.sr.MeasurementReport)
    # Where the run's time went, kept in the job's summary (benchmarks.latency prints it).
    stages = output.summary["stage_seconds"]
    assert list(stages) == ["preprocess", "segment", "postprocess", "seg", "sr"]
    assert all(seconds >= 0 for seconds in stages.values())
    segmentation = hd.seg.segread(tmp_path / "seg.dcm")
    referenced = {item.ReferencedSOPInstanceUID
                  for series_item in segmentation.ReferencedSeriesSequence
                  for item in series_item.ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in series}
    ordered = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))
    masks = segmentation.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in ordered], segment_numbers=[1, 2])
    labels = np.where(masks[..., 0] > 0, LEFT, np.where(masks[..., 1] > 0, RIGHT, 0)).astype(np.uint8)
    from_seg = lung_volumes_ml(labels, SliceGeometry.from_series(ordered))
    assert from_seg["left"] == pytest.approx(volumes["left"]) and from_seg["right"] == pytest.approx(volumes["right"])


def test_summary_images_when_configured(registry: ModelRegistry, settings: Settings, cr_monochrome1: Dataset,
                                        mr_series: tuple[list[Dataset], np.ndarray], tmp_path: Path) -> None:
    with_summary = settings.model_copy(update={"inference": settings.inference.model_copy(
        update={"summary_image": True})})
    context = PipelineContext(registry=registry, device="cpu", settings=with_summary, models=ModelCache())
    cxr = get_pipeline("cxr").run([cr_monochrome1], context)
    lung = get_pipeline("lung-mri").run(mr_series[0], context)
    for name, sc in (("cxr", cxr.datasets[-1]), ("lung", lung.datasets[-1])):
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert dciodvfy_errors(sc, tmp_path / f"{name}.dcm") == []
    assert len(cxr.datasets) == 2 and len(lung.datasets) == 3
    assert "summary_image" in lung.summary["stage_seconds"]


def test_post_processing_recovers_the_phantom_volumes(mr_series: tuple[list[Dataset], np.ndarray]) -> None:
    series, labels = mr_series
    geometry = SliceGeometry.from_series(series)
    truth = true_volumes_ml(series, labels)
    noisy = labels > 0
    noisy[2, 5:8, 5:8] = True  # a speck outside the lungs
    noisy[labels > 0] &= np.random.default_rng(1).random(int((labels > 0).sum())) > 0.02  # pin holes
    measured = lung_volumes_ml(postprocess(noisy, geometry), geometry)
    for side in ("left", "right"):
        assert measured[side] == pytest.approx(truth[side], rel=0.05)


def test_touching_lungs_are_split_at_the_midline(mr_series: tuple[list[Dataset], np.ndarray]) -> None:
    series, labels = mr_series
    geometry = SliceGeometry.from_series(series)
    lungs = labels > 0
    bridge = ndimage.binary_dilation(lungs, iterations=6) & ~lungs
    _, columns = np.nonzero(lungs.any(axis=0))
    middle = (columns.min() + columns.max()) // 2
    touching = lungs.copy()
    touching[:, :, middle - 2:middle + 3] |= bridge[:, :, middle - 2:middle + 3]  # join them across the middle
    assert ndimage.label(touching)[1] == 1
    split = split_left_right(touching, geometry)
    agreement = np.mean(split[lungs] == labels[lungs])
    assert agreement > 0.97


def test_left_is_plus_x_whatever_the_column_direction(mr_series: tuple[list[Dataset], np.ndarray]) -> None:
    """Flip the columns and the row direction together: the same anatomy, the same left lung."""
    series, labels = mr_series
    flipped = []
    for ds in series:
        copy_ = copy.deepcopy(ds)
        columns, spacing = int(ds.Columns), float(ds.PixelSpacing[1])
        position = [float(v) for v in ds.ImagePositionPatient]
        position[0] += (columns - 1) * spacing
        copy_.ImagePositionPatient = [f"{v:.6f}" for v in position]
        copy_.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        flipped.append(copy_)
    split = split_left_right(labels[:, :, ::-1] > 0, SliceGeometry.from_series(flipped))
    np.testing.assert_array_equal(split, labels[:, :, ::-1])
    assert (split == LEFT).sum() == (labels == LEFT).sum() and (split == RIGHT).sum() == (labels == RIGHT).sum()


def test_uneven_slice_positions_weigh_each_slice_by_its_extent(mr_series: tuple[list[Dataset], np.ndarray]) -> None:
    series, labels = mr_series
    kept = [i for i in range(len(series)) if i != 10]  # a missing slice
    geometry = SliceGeometry.from_series([series[i] for i in kept])
    extents = geometry.slice_extents_mm()
    spacing = float(series[0].SpacingBetweenSlices)
    assert extents[9] == pytest.approx(1.5 * spacing, rel=1e-3) and extents[0] == pytest.approx(spacing, rel=1e-3)
    ones = np.ones((len(kept), 4, 4), dtype=np.uint8) * LEFT
    expected = 16 * geometry.pixel_area_mm2 * spacing * len(series) / 1000
    assert lung_volumes_ml(ones, geometry)["left"] == pytest.approx(expected, rel=1e-3)


# --------------------------------------------------------------------------- the task catalogue


def test_cxr_runs_a_site_finding_with_its_catalogue_coding(tmp_path: Path, cr_monochrome1: Dataset) -> None:
    site = tmp_path / "tasks.yaml"
    site.write_text(TOY)
    settings = load_settings(None, models_dir=str(tmp_path / "models"), task_catalogue=str(site))
    context = PipelineContext.from_settings(settings)
    assert "toy" in context.registry.catalogue and context.catalogue is context.registry.catalogue
    register_active(context.registry, "view", "resnet18", {VIEWS.index("chest_frontal"): 6.0}, CXR_SPEC)
    register_active(context.registry, "toy", "resnet18", 4.0, CXR_SPEC, threshold=0.5)
    output = get_pipeline("cxr").run([cr_monochrome1], context)
    assert output.model_version == "view-1+toy-1"
    assert output.summary["tasks_run"] == ["view", "toy"] and output.summary["findings"]["toy"]["positive"]
    assert output.summary["tasks_not_run"] == {"bpd": "no active model for bpd",
                                               "pneumonia": "no active model for pneumonia",
                                               "fracture": "no active model for fracture",
                                               "bone-age": "no active model for bone-age"}
    assert list(output.artefacts) == ["gradcam-toy.png"]
    (sr,) = output.datasets
    concepts = {(c.CodingSchemeDesignator, c.CodeValue, c.CodeMeaning) for item in _walk(sr.ContentSequence)
                for key in ("ConceptNameCodeSequence", "ConceptCodeSequence") for c in item.get(key, [])}
    assert ("99TOY", "1234567", "Toy finding concept") in concepts
    tracking = {str(item.TextValue) for item in _walk(sr.ContentSequence)
                if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "112039"}
    assert "Toy finding" in tracking  # the catalogue's description is the finding's label


def test_the_writers_codes_are_the_catalogues() -> None:
    """The SR/SEG writers code the shipped tasks' results as the catalogue says (golden bytes rely on it)."""
    from config.tasks import load_catalogue
    from inference import codes
    from inference.codes import code_key
    from inference.pipelines.cxr import code_of, finding_tasks, view_task
    from inference.pipelines.lung_mri import segmentation_task

    catalogue = load_catalogue()
    assert [code_of(t.sr.concept) for t in finding_tasks(catalogue)][:2] == [codes.BRONCHOPULMONARY_DYSPLASIA,
                                                                             codes.PNEUMONIA]
    assert code_key(code_of(view_task(catalogue).sr.concept)) == code_key(codes.IMAGE_VIEW)
    lung = segmentation_task(catalogue)
    assert [code_of(o) for o in lung.outputs] == [codes.LEFT_LUNG, codes.RIGHT_LUNG]
    assert code_of(lung.sr.concept) == codes.VOLUME and code_of(lung.sr.units) == codes.MILLILITER


def test_one_view_taxonomy_for_training_and_inference() -> None:
    from config import views

    assert view_taxonomy() == views.load_view_taxonomy("views7") == views.load_view_taxonomy()
    assert view_taxonomy().parents["chest_pa"] == "chest_frontal"  # a fine class's rule folds into views7
    assert views.frontal_chest_classes(VIEWS) == {"chest_frontal"}
    assert views.frontal_chest_classes(view_taxonomy("views30").classes) == {"chest_ap_supine", "chest_ap_erect",
                                                                             "chest_pa"}
