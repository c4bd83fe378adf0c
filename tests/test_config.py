"""The settings schema, the shipped example and ``cradle config check`` / ``cradle status``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from config.settings import CallingAE, Settings, load_settings
from cradle.cli import main
from site_tasks import TOY

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "cradle.example.yaml"


def model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key of a settings model, dotted; list items of a model type as ``key[]``; a mapping of names to
    a model (``populations``) as its own key only: its entries are the site's names, documented in comments."""
    keys = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.add(key)
        nested = _model_in(field.annotation)
        if nested is not None and get_origin(field.annotation) is not dict:
            keys |= model_keys(nested, f"{key}[]." if get_origin(field.annotation) is list else f"{key}.")
    return keys


def _model_in(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel) and inner is not CallingAE:
                return inner
    return None


def yaml_keys(data: Any, prefix: str = "") -> set[str]:
    keys = set()
    if isinstance(data, dict):
        for name, value in data.items():
            keys.add(f"{prefix}{name}")
            keys |= yaml_keys(value, f"{prefix}{name}.")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and "ae_title" in item and "hosts" in item:
                continue  # an allowed calling AE bound to hosts, not a list of sections
            keys |= yaml_keys(item, prefix[:-1] + "[].")
    return keys


def test_example_documents_every_key() -> None:
    documented = yaml_keys(yaml.safe_load(EXAMPLE.read_text()))
    assert model_keys(Settings) - documented == set()
    assert documented - model_keys(Settings) == set()


def test_example_passes_config_check(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "check", "--config", str(EXAMPLE)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["node"]["ae_title"] == "CRADLE"
    assert [rule["name"] for rule in printed["routing"]["rules"]] == ["pediatric-radiograph", "neonatal-chest-mri"]
    assert load_settings(EXAMPLE).node.calling_ae_hosts() == {"MODALITY": [], "STORESCU": [], "PACS": ["10.0.0.5"]}


def test_config_check_output_is_itself_a_valid_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "check", "--config", str(EXAMPLE)]) == 0
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(capsys.readouterr().out)
    assert load_settings(resolved).model_dump() == load_settings(EXAMPLE).model_dump()


@pytest.mark.parametrize(("content", "named"), [
    ("node:\n  prot: 11112\n", "node.prot: unknown key"),
    ("node:\n  port: 70000\n", "node.port"),
    ("storage:\n  fsync: maybe\n", "storage.fsync"),
    ("node:\n  duplicate_policy: overwrite\n", "node.duplicate_policy"),
    ("routing:\n  rules:\n    - name: x\n      pipelines: [cxr]\n      series_description_regex: '(['\n",
     "routing.rules.0.series_description_regex"),
    ("node:\n  allowed_calling_aets: ['BACK\\\\SLASH']\n", "node.allowed_calling_aets"),
])
def test_invalid_config_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               content: str, named: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert main(["config", "check", "--config", str(path)]) == 2
    assert named in capsys.readouterr().err


def test_config_check_hides_passwords(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "pg.yaml"
    path.write_text("storage:\n  database_url: postgresql://cradle:s3cr3t@db.example.org/cradle\n"
                    "queue:\n  broker_url: redis://:hunter2@redis.example.org:6379/0\n")
    assert main(["config", "check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t" not in out and "hunter2" not in out and "cradle:***@db.example.org" in out


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRADLE_NODE__PORT", "11113")
    monkeypatch.setenv("CRADLE_NODE__ALLOWED_CALLING_AETS", '["CT1"]')
    settings = load_settings(EXAMPLE)
    assert (settings.node.port, settings.node.allowed_calling_aets) == (11113, ["CT1"])


def test_config_check_warns_when_nobody_may_send(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("node:\n  allowed_calling_aets: []\n")
    assert main(["config", "check", "--config", str(path)]) == 0
    assert "no modality can send" in capsys.readouterr().err


def test_status_on_an_empty_node(node_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "cradle.yaml"
    path.write_text(yaml.safe_dump(node_settings.model_dump(mode="json")))
    assert main(["status", "--json", "--config", str(path)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {key: status[key] for key in ("patients", "studies", "series", "instances", "jobs")} == {
        "patients": 0, "studies": 0, "series": 0, "instances": 0, "jobs": {}}  # the stable contract
    assert status["queue"] == {"queued": 0, "running": 0, "oldest_queued_seconds": 0.0}
    assert status["recent_failures"] == {"jobs": [], "sends": []} and status["durations"] == []
    assert main(["status", "--config", str(path)]) == 0
    assert capsys.readouterr().out.split()[:10] == ["patients", "0", "studies", "0", "series", "0", "instances",
                                                    "0", "jobs", "0"]


def test_train_choices_are_the_catalogues_tasks(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A task of the site's task_catalogue is a choice of ``cradle train``, wherever --config stands."""
    import training.commands

    trained: list[str] = []
    monkeypatch.setattr(training.commands, "train", lambda args, settings: trained.append(args.task) or 0)
    site = tmp_path / "tasks.yaml"
    site.write_text(TOY)
    config = tmp_path / "cradle.yaml"
    config.write_text(f"task_catalogue: {site}\nmodels_dir: {tmp_path / 'models'}\n")
    assert main(["train", "--config", str(config), "toy", "--json"]) == 0
    assert main(["train", "toy", f"--config={config}"]) == 0
    assert trained == ["toy", "toy"]
    with pytest.raises(SystemExit) as caught:  # the shipped catalogue alone has no such task
        main(["train", "toy"])
    assert caught.value.code == 2 and "invalid choice: 'toy'" in capsys.readouterr().err


def test_a_config_error_still_exits_2_after_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  prot: 11112\n")
    with pytest.raises(SystemExit) as caught:  # the command line is judged first, as before
        main(["train", "--config", str(bad)])
    assert caught.value.code == 2 and "the following arguments are required: task" in capsys.readouterr().err
    assert main(["train", "bpd", "--config", str(bad)]) == 2
    assert "node.prot: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize(("url", "secret"), [
    ("postgresql://cradle:s3cr3t@db.example.org/cradle", "s3cr3t"),
    ("postgresql://cradle:p@ss@word@db.example.org:5432/cradle", "p@ss@word"),
    ("redis://:hunter2@redis.example.org:6379/0", "hunter2"),
    ("postgresql://db.example.org/cradle?user=cradle&password=qwerty9&sslmode=require", "qwerty9"),
    ("postgresql://db.example.org/cradle?sslpassword=keypass1", "keypass1"),
])
def test_redact_url_hides_every_password(url: str, secret: str) -> None:
    from config.settings import redact_url

    redacted = redact_url(url)
    assert secret not in redacted and "***" in redacted
    assert "db.example.org" in redacted or "redis.example.org" in redacted


def test_no_allow_list_means_loopback_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    settings = load_settings(None)
    assert settings.node.allowed_calling_aets is None and settings.node.loopback_only
    assert load_settings(None, node={"allowed_calling_aets": []}).node.loopback_only is False
    path = tmp_path / "default.yaml"
    path.write_text("node:\n  port: 11112\n")
    assert main(["config", "check", "--config", str(path)]) == 0
    assert "loopback" in capsys.readouterr().err


def test_limits_have_safe_defaults() -> None:
    settings = load_settings(None)
    node, inference = settings.node, settings.inference
    assert (node.max_pending_connections, node.association_deadline, node.max_pdu_size) == (64, 10, 262144)
    assert node.max_dataset_size == 2 * 1024 ** 3 and node.max_inflation_ratio == 200 and node.max_elements == 500_000
    assert (inference.max_pixels_per_frame, inference.max_pixels_per_series) == (100_000_000, 1_000_000_000)
    assert settings.storage.connect_timeout == 10
