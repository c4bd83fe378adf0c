"""The model registry: versions, activation history, integrity, imports through the CLI."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inference.models import create_model, view_taxonomy
from inference.errors import NoActiveModel
from inference.registry import (InputSpec, ModelCache, ModelLoadError, ModelRegistry, NotValidated, RegistryError,
                                WeightsIntegrityError)
from cradle.cli import main
from site_tasks import SITE_TASKS

SPEC = InputSpec(image_size=128)


def small_state(task: str = "bpd", arch: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    classes = len(view_taxonomy().classes) if task == "view" else 1
    return create_model(arch, task, num_classes=classes).state_dict()


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


def test_register_copies_weights_with_their_sha256(registry: ModelRegistry) -> None:
    version = registry.register("bpd", "resnet18", small_state(), input_spec=SPEC, threshold=0.3,
                                provenance={"source": "test"}, metrics={"auroc": 0.5})
    assert version.version == "bpd-1" and version.state == "candidate" and not version.validated
    assert version.weights.is_file() and version.weights.parent == registry.models_dir / "bpd"
    import hashlib
    assert hashlib.sha256(version.weights.read_bytes()).hexdigest() == version.sha256
    again = registry.get("bpd", "bpd-1")
    assert again == version
    assert registry.register("bpd", "resnet18", small_state(seed=1), input_spec=SPEC).version == "bpd-2"
    assert [v.version for v in registry.versions("bpd")] == ["bpd-1", "bpd-2"]
    assert registry.active("bpd") is None


def test_view_versions_carry_the_taxonomy(registry: ModelRegistry) -> None:
    version = registry.register("view", "resnet18", small_state("view"), input_spec=SPEC)
    assert version.classes == list(view_taxonomy().classes) and version.num_outputs == 7


def test_heads_and_tasks_come_from_the_catalogue(tmp_path: Path, registry: ModelRegistry) -> None:
    from config.tasks import load_catalogue

    with pytest.raises(RegistryError, match="unknown task 'toy-grade'; known: view, bpd, pneumonia, fracture, bone-age, lung-seg"):
        registry.register("toy-grade", "resnet18", small_state(), input_spec=SPEC)
    site = tmp_path / "tasks.yaml"
    site.write_text(SITE_TASKS)
    catalogue = load_catalogue(site)
    extended = ModelRegistry(registry.models_dir, catalogue)
    torch.manual_seed(0)
    grade_state = create_model("resnet18", catalogue.get("toy-grade"), num_classes=3).state_dict()
    grade = extended.register("toy-grade", "resnet18", grade_state, input_spec=SPEC)
    assert grade.classes == ["none", "mild", "severe"] and grade.num_outputs == 3  # the task's classes
    age = extended.register("toy-age", "resnet18", small_state(), input_spec=SPEC)  # one output
    assert age.classes is None and age.num_outputs == 1
    assert extended.load(age, "cpu")(torch.zeros(1, 1, 64, 64)).shape == (1, 1)
    with pytest.raises(ModelLoadError, match="is not a segmentation architecture; lung-seg takes one of"):
        extended.register("lung-seg", "resnet18", small_state(), input_spec=SPEC)
    assert extended.tasks() == ["toy-grade", "toy-age"] and registry.tasks() == []


def test_activate_rollback_and_history(registry: ModelRegistry) -> None:
    first = registry.register("bpd", "resnet18", small_state(seed=1), input_spec=SPEC, validated=True)
    second = registry.register("bpd", "resnet18", small_state(seed=2), input_spec=SPEC, validated=True)
    third = registry.register("bpd", "resnet18", small_state(seed=3), input_spec=SPEC)
    with pytest.raises(NotValidated, match="bpd-3 is not validated"):
        registry.activate("bpd", third.version)
    registry.activate("bpd", first.version, reason="first deployment", actor="alice@ws")
    registry.activate("bpd", second.version, reason="better AUROC", actor="bob@ws")
    registry.activate("bpd", third.version, reason="site-validated by hand", actor="carol@ws",
                      accept_unvalidated=True)
    assert registry.active("bpd").version == "bpd-3"
    validation = registry.get("bpd", "bpd-3").provenance["validation"]
    assert validation["method"] == "explicit admin activation" and validation["by"] == "carol@ws"

    assert registry.rollback("bpd", actor="dave@ws").version == "bpd-2"
    assert registry.rollback("bpd").version == "bpd-1"
    with pytest.raises(RegistryError, match="no earlier active version"):
        registry.rollback("bpd")
    states = {v.version: v.state for v in registry.versions("bpd")}
    assert states == {"bpd-1": "active", "bpd-2": "retired", "bpd-3": "retired"}
    history = registry.history("bpd")
    assert [(h["action"], h["from"], h["to"]) for h in history] == [
        ("activate", None, "bpd-1"), ("activate", "bpd-1", "bpd-2"), ("activate", "bpd-2", "bpd-3"),
        ("rollback", "bpd-3", "bpd-2"), ("rollback", "bpd-2", "bpd-1")]
    assert history[1]["by"] == "bob@ws" and history[1]["reason"] == "better AUROC" and history[1]["at"]
    registry.deactivate("bpd", reason="recall")
    assert registry.active("bpd") is None


def test_activation_is_logged_with_version_strings(registry: ModelRegistry, caplog: pytest.LogCaptureFixture) -> None:
    version = registry.register("bpd", "resnet18", small_state(), input_spec=SPEC, validated=True)
    with caplog.at_level("INFO", logger="inference.registry"):
        registry.activate("bpd", version.version, reason="free text stays out of the log")
    messages = [r.getMessage() for r in caplog.records]
    assert "active model for bpd: none -> bpd-1 (activate)" in messages
    assert not any("free text" in m for m in messages)


def test_wrong_architecture_is_refused_with_a_summary(registry: ModelRegistry) -> None:
    with pytest.raises(ModelLoadError) as caught:
        registry.register("bpd", "resnet50", small_state(arch="resnet18"), input_spec=SPEC)
    message = str(caught.value)
    assert "do not load into resnet50 for bpd" in message
    assert "missing key(s)" in message and "shape mismatch(es)" in message
    assert "(+" in message  # long lists are summarised, not dumped
    assert "another --arch" in message
    assert registry.versions("bpd") == []


def test_wrong_head_names_the_shapes(registry: ModelRegistry) -> None:
    with pytest.raises(ModelLoadError, match=r"fc.weight weights \(7, 512\) vs model \(1, 512\)"):
        registry.register("bpd", "resnet18", small_state("view"), input_spec=SPEC)


def test_an_rgb_first_convolution_gets_a_hint(registry: ModelRegistry) -> None:
    state = create_model("resnet18", "bpd", in_chans=3).state_dict()
    with pytest.raises(ModelLoadError, match=r"conv1.weight weights \(64, 3, 7, 7\) vs model \(64, 1, 7, 7\).*"
                                             r"adapt_input_conv"):
        registry.register("bpd", "resnet18", state, input_spec=SPEC)


def test_tampered_weights_are_refused(registry: ModelRegistry) -> None:
    version = registry.register("bpd", "resnet18", small_state(), input_spec=SPEC, validated=True)
    registry.load(version, "cpu")  # intact: loads
    data = bytearray(version.weights.read_bytes())
    data[-100] ^= 0xFF
    version.weights.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="do not match their registered sha256"):
        registry.load(version, "cpu")
    with pytest.raises(WeightsIntegrityError):
        registry.activate("bpd", version.version)
    version.weights.unlink()
    with pytest.raises(WeightsIntegrityError, match="cannot be read"):
        registry.load(version, "cpu")


def test_loaded_model_is_in_eval_mode_with_the_registered_weights(registry: ModelRegistry) -> None:
    state = small_state(seed=7)
    version = registry.register("fracture", "resnet18", state, input_spec=SPEC)
    model = registry.load(version, "cpu")
    assert not model.training
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])


def test_model_cache_follows_the_active_version(registry: ModelRegistry) -> None:
    cache = ModelCache()
    with pytest.raises(NoActiveModel) as caught:
        cache.get("bpd", registry, torch.device("cpu"))
    assert str(caught.value) == "no active model for bpd"
    first = registry.register("bpd", "resnet18", small_state(seed=1), input_spec=SPEC, validated=True)
    registry.activate("bpd", first.version)
    loaded = cache.get("bpd", registry, torch.device("cpu"))
    assert cache.get("bpd", registry, torch.device("cpu")) is loaded  # loaded once
    second = registry.register("bpd", "resnet18", small_state(seed=2), input_spec=SPEC, validated=True)
    registry.activate("bpd", second.version)
    assert cache.get("bpd", registry, torch.device("cpu")).version.version == "bpd-2"
    registry.rollback("bpd")
    assert cache.get("bpd", registry, torch.device("cpu")).version.version == "bpd-1"


def _register_in_process(models_dir: str, seed: int) -> str:
    return ModelRegistry(Path(models_dir)).register("bpd", "resnet18", small_state(seed=seed),
                                                    input_spec=SPEC).version


def test_concurrent_registrations_keep_the_index_whole(tmp_path: Path) -> None:
    models_dir = str(tmp_path / "models")
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # fork would copy torch's thread pools
        versions = pool.starmap(_register_in_process, [(models_dir, seed) for seed in range(4)])
    assert sorted(versions) == [f"bpd-{n}" for n in range(1, 5)]
    index = json.loads((tmp_path / "models" / "bpd" / "registry.json").read_text())
    assert sorted(v["version"] for v in index["versions"]) == sorted(versions)


# --------------------------------------------------------------------------- the CLI


def cli(tmp_path: Path, *args: str) -> int:
    config = tmp_path / "cradle.yaml"
    if not config.exists():
        config.write_text(f"models_dir: {tmp_path / 'models'}\n")
    return main([*args[:2], "--config", str(config), *args[2:]])


def test_import_a_wrapped_state_dict_and_activate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tmp_path / "chexpert_resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in small_state().items()}, "epoch": 12}, weights)
    assert cli(tmp_path, "models", "import", "bpd", str(weights), "--arch", "resnet18", "--activate",
               "--threshold", "0.42", "--image-size", "128") == 0
    registry = ModelRegistry(tmp_path / "models")
    active = registry.active("bpd")
    assert active.version == "bpd-1" and active.validated and active.threshold == 0.42
    assert active.input_spec.image_size == 128
    assert active.provenance["source"] == "import" and active.provenance["source_file"] == weights.name
    assert active.provenance["unwrapped"] == "under key 'state_dict', without the 'module.' prefix"
    assert active.provenance["validation"]["method"] == "explicit admin activation"
    assert "now the active bpd model" in capsys.readouterr().out


def test_import_safetensors_then_promote_list_rollback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for seed in (1, 2):
        weights = tmp_path / f"fracture{seed}.safetensors"
        save_file(small_state("fracture", seed=seed), weights)
        assert cli(tmp_path, "models", "import", "fracture", str(weights), "--arch", "resnet18",
                   "--image-size", "128") == 0
    assert cli(tmp_path, "models", "promote", "fracture", "fracture-1") == 0
    assert cli(tmp_path, "models", "promote", "fracture", "fracture-2") == 0
    capsys.readouterr()
    assert cli(tmp_path, "models", "list", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["fracture"]["active"] == "fracture-2"
    assert [v["state"] for v in listing["fracture"]["versions"]] == ["retired", "active"]
    assert cli(tmp_path, "models", "rollback", "fracture") == 0
    assert "fracture: fracture-2 -> fracture-1" in capsys.readouterr().out
    assert cli(tmp_path, "models", "list") == 0
    table = capsys.readouterr().out
    assert "* fracture-1" in table and "  fracture-2" in table


def test_import_refuses_the_wrong_architecture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tmp_path / "resnet18.pt"
    torch.save(small_state(), weights)
    assert cli(tmp_path, "models", "import", "bpd", str(weights), "--arch", "resnet50", "--activate") == 1
    error = capsys.readouterr().err
    assert "cannot import resnet18.pt as bpd (resnet50)" in error
    assert "missing key(s)" in error and "shape mismatch(es)" in error
    assert ModelRegistry(tmp_path / "models").active("bpd") is None


def test_import_refuses_ambiguous_and_pickled_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ambiguous = tmp_path / "two.pt"
    torch.save({"state_dict": small_state(seed=1), "model": small_state(seed=2)}, ambiguous)
    assert cli(tmp_path, "models", "import", "bpd", str(ambiguous), "--arch", "resnet18") == 1
    assert "ambiguous" in capsys.readouterr().err
    pickled = tmp_path / "module.pt"
    torch.save(create_model("resnet18", "bpd"), pickled)  # a whole pickled module, not a state dict
    assert cli(tmp_path, "models", "import", "bpd", str(pickled), "--arch", "resnet18") == 1
    assert "not a plain state dict" in capsys.readouterr().err


def test_promote_unknown_version_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(tmp_path, "models", "promote", "bpd", "bpd-9") == 1
    assert "bpd has no version 'bpd-9'" in capsys.readouterr().err
    assert cli(tmp_path, "models", "rollback", "bpd") == 1


def test_import_names_the_outputs_and_the_population_it_was_validated_on(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A yes/no pneumonia checkpoint (one output) from elsewhere, validated there on 2 to 4 year olds: the
    pipeline runs it as one output and only on that population (inside the catalogue's)."""
    from config.tasks import load_catalogue
    from inference.pipelines.cxr import outside_population

    weights = tmp_path / "pneumonia-yes-no.safetensors"
    save_file(create_model("resnet18", "pneumonia", num_classes=1).state_dict(), weights)
    population = tmp_path / "validated-on.yaml"
    population.write_text("modalities: [CR, DX]\nviews: [chest_frontal]\nmin_age_days: 730\nmax_age_days: 1460\n")
    assert cli(tmp_path, "models", "import", "pneumonia", str(weights), "--arch", "resnet18", "--classes",
               "pneumonia", "--population", str(population), "--threshold", "0.3", "--activate") == 0
    version = ModelRegistry(tmp_path / "models").active("pneumonia")
    assert (version.num_outputs, version.classes, version.threshold) == (1, ["pneumonia"], 0.3)
    assert version.population == {"modalities": ["CR", "DX"], "views": ["chest_frontal"], "min_age_days": 730,
                                  "max_age_days": 1460}
    task = load_catalogue().get("pneumonia")
    film = {"modality": "DX", "body_part": "CHEST", "view": "chest_frontal"}
    assert outside_population(task, version, {**film, "age_days": 1000}) == ""
    assert outside_population(task, version, {**film, "age_days": 400}) == \
        "outside what pneumonia-1 was validated on: younger than 2 years"
    assert outside_population(task, version, {**film, "age_days": 3000}) == "older than 6 years"  # the catalogue's

    capsys.readouterr()
    population.write_text("min_age_days: -3\nages: 2\n")
    assert cli(tmp_path, "models", "import", "pneumonia", str(weights), "--arch", "resnet18", "--classes",
               "pneumonia", "--population", str(population)) == 1
    error = capsys.readouterr().err
    assert "min_age_days: Input should be greater than or equal to 0" in error and "ages: Extra inputs" in error
    assert cli(tmp_path, "models", "import", "pneumonia", str(weights), "--arch", "resnet18") == 1  # 3 classes
    assert "shape mismatch" in capsys.readouterr().err
    assert [v.version for v in ModelRegistry(tmp_path / "models").versions("pneumonia")] == ["pneumonia-1"]
