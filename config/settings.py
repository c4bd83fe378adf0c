"""The node's settings: one pydantic-settings model, loaded from YAML, overridden by the environment.

Precedence, highest first: keyword arguments, environment variables
(``CRADLE_`` prefix, ``__`` between levels, e.g. ``CRADLE_NODE__PORT=11113``), the YAML file,
the defaults below. Unknown keys are errors (``extra="forbid"``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import YamlConfigSettingsSource

from config.tasks import CatalogueError, PopulationOverride, TaskCatalogue, load_catalogue

DEFAULT_CONFIG_PATHS = (Path("/etc/cradle/cradle.yaml"),)
"""Searched in order when neither ``--config`` nor ``CRADLE_CONFIG`` names a file."""

AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, 16 chars


def _check_ae_title(value: str) -> str:
    if not AE_TITLE_PATTERN.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSSettings(Section):
    """DICOM TLS (BCP 195): TLS 1.2 or newer, the listener's side (and the sender's defaults)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> "TLSSettings":
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("tls.enabled needs tls.certificate and tls.private_key")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("tls.require_client_certificate needs tls.ca_certificates")
        return self


class CallingAE(Section):
    """An allowed calling AE title, optionally bound to the host addresses it may come from and to
    the TLS client certificate it must present."""

    ae_title: str
    hosts: list[str] = Field(default_factory=list)
    certificate_subject: str | None = Field(
        None, description="the verified TLS client certificate this AE title must present: its common name, "
                          "or its whole subject in RFC 4514 form ('CN=ct1.example.org,O=Hospital')")

    _ae = field_validator("ae_title")(_check_ae_title)


class NodeSettings(Section):
    ae_title: str = "CRADLE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aets: list[str | CallingAE] | None = Field(
        None,
        description="Calling AE titles allowed to associate; an empty list means nobody; not set (null): "
                    "any calling AE title, from the loopback address only.",
    )
    max_associations: int = Field(16, ge=1, description="associations served at once")
    max_associations_per_calling_ae: int = Field(
        8, ge=1, description="associations of one calling AE title at once (one sender cannot take every place)")
    max_pending_connections: int = Field(
        64, ge=1, description="connections accepted but not yet associated; beyond this one is closed at once")
    association_deadline: float = Field(
        10, gt=0, description="seconds from accept (TLS handshake included) until the association must be "
                              "established, else the connection is closed")
    max_pdu_size: int = Field(262144, ge=0, description="largest P-DATA PDU announced and accepted; 0: up to "
                                                        "the hard cap of 64 MiB")
    max_dataset_size: int = Field(2 * 1024 ** 3, ge=1024, description="bytes of one received data set "
                                                                      "(as received, and inflated)")
    max_inflation_ratio: float = Field(200, ge=1, description="a deflated data set may inflate to at most this "
                                                              "many times its received size")
    max_elements: int = Field(500_000, ge=100, description="data elements in one data set, nested ones included")
    acse_timeout: float = Field(30, gt=0)
    dimse_timeout: float = Field(60, gt=0)
    network_timeout: float = Field(60, gt=0)
    duplicate_policy: Literal["keep_first", "replace", "reject"] = "keep_first"
    tls: TLSSettings = Field(default_factory=TLSSettings)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus endpoint of the listener; 0 = off")
    metrics_host: str = Field("127.0.0.1", description="address the Prometheus endpoint listens on")

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_calling(cls, values: list[str | CallingAE] | None) -> list[str | CallingAE] | None:
        if values is None:
            return None
        return [_check_ae_title(v) if isinstance(v, str) else v for v in values]

    @property
    def loopback_only(self) -> bool:
        """No allow-list configured: any calling AE title, from the loopback address only."""
        return self.allowed_calling_aets is None

    @model_validator(mode="after")
    def _certificates_need_verified_tls(self) -> "NodeSettings":
        if self.calling_ae_certificates() and not (self.tls.enabled and self.tls.ca_certificates is not None):
            raise ValueError("a calling AE's certificate_subject needs node.tls.enabled and node.tls.ca_certificates "
                             "(a client certificate is read only once verified)")
        return self

    def calling_ae_certificates(self) -> dict[str, str]:
        """Allowed calling AE title → the subject of the TLS client certificate it must present."""
        return {entry.ae_title: entry.certificate_subject for entry in self.allowed_calling_aets or ()
                if isinstance(entry, CallingAE) and entry.certificate_subject}

    def calling_ae_hosts(self) -> dict[str, list[str]]:
        """Allowed calling AE title → allowed host addresses (empty: any host). Empty when no
        allow-list is configured (see :attr:`loopback_only`)."""
        allowed: dict[str, list[str]] = {}
        for entry in self.allowed_calling_aets or ():
            if isinstance(entry, str):
                allowed[entry] = []
            else:
                allowed[entry.ae_title] = list(entry.hosts)
        return allowed


class StorageSettings(Section):
    archive_dir: Path = Path("var/archive")
    database_url: str = "sqlite:///var/cradle.db"
    fsync: bool = Field(True, description="fsync file and directory before answering success")
    connect_timeout: float = Field(10, gt=0, description="seconds to wait for a connection to the index "
                                                         "(PostgreSQL) before the attempt fails")
    min_free_bytes: int = Field(1024 ** 3, ge=0, description="below this much free space on the archive's "
                                                             "file system the listener answers 0xA700")
    min_free_percent: float = Field(0, ge=0, lt=100, description="the same watermark as a share of the "
                                                                 "file system (the higher of the two applies)")


class RetentionSettings(Section):
    """What ``cradle archive prune`` may delete (storage/retention.py): studies whose results were
    delivered or that matched no rule, oldest first; never labelled studies or studies a registered
    model version was trained on, unless told."""

    max_age_days: int | None = Field(None, ge=1, description="prune eligible studies archived longer ago "
                                                             "(unset: no age rule)")
    target_free_bytes: int = Field(0, ge=0, description="while the archive's file system has less free, "
                                                        "prune the oldest eligible studies (0: off)")
    keep_labelled: bool = True
    keep_model_studies: bool = True


class CompletionSettings(Section):
    quiet_seconds: float = Field(30, ge=0)
    poll_seconds: float = Field(1.0, gt=0)
    queue_capacity: int = Field(10_000, ge=1, description="stored instances waiting for completion and routing "
                                                          "after their C-STORE was answered; beyond this the "
                                                          "monitor completes their series")


class RoutingRule(Section):
    """Tags a complete series must match for ``pipelines`` to run on it. Unset fields match anything."""

    name: str
    pipelines: list[str]
    modalities: list[str] = Field(default_factory=list)
    sop_class_uids: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)
    series_description_regex: str | None = None
    min_age_days: int | None = Field(None, ge=0)
    max_age_days: int | None = Field(None, ge=0)

    @field_validator("series_description_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


def _default_rules() -> list[RoutingRule]:
    """One rule per pipeline of the task catalogue, admitting its tasks' populations."""
    catalogue = load_catalogue()
    rules = []
    for pipeline, definition in catalogue.pipelines.items():
        population = catalogue.routing_population(pipeline)
        rules.append(RoutingRule(name=definition.routing_rule, pipelines=[pipeline],
                                 modalities=population.modalities, body_parts=population.body_parts,
                                 min_age_days=population.min_age_days, max_age_days=population.max_age_days))
    return rules


class RoutingSettings(Section):
    rules: list[RoutingRule] = Field(default_factory=_default_rules)


class QueueSettings(Section):
    broker_url: str = "sqla+sqlite:///var/broker.db"
    task_time_limit: int = Field(600, gt=0, description="hard time limit of one job, seconds")
    visibility_timeout: int = Field(3600, gt=0, description="Redis: re-delivery after this many seconds")
    max_attempts: int = Field(3, ge=1)
    reconcile_seconds: float = Field(30, gt=0)

    @model_validator(mode="after")
    def _visibility_above_limit(self) -> "QueueSettings":
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError("queue.visibility_timeout must be above queue.task_time_limit "
                             "or the broker re-delivers running jobs")
        return self


class DestinationTLS(Section):
    """DICOM TLS to one destination (BCP 195: TLS 1.2 or newer, the destination's certificate verified).

    Unset files fall back to ``node.tls``: the CA bundle to ``node.tls.ca_certificates`` (else the
    system's CAs), the client certificate and key to the node's own (when it has them).
    """

    enabled: bool = False
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    server_name: str | None = Field(None, description="name expected in the destination's certificate; "
                                                      "default: its host")

    @model_validator(mode="after")
    def _pair(self) -> "DestinationTLS":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("tls.certificate and tls.private_key go together")
        return self


class Destination(Section):
    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTLS = Field(default_factory=DestinationTLS)
    research: bool = Field(False, description="also receives shadow runs' results (not for clinical use); "
                                              "the others never do")

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_flag(cls, value: Any) -> Any:
        """``tls: true`` is short for ``tls: {enabled: true}`` (the node's own certificate and CAs)."""
        return {"enabled": value} if isinstance(value, bool) else value


_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class Source(Section):
    """A PACS the node retrieves from (``cradle retrieve --from NAME``): C-FIND (Study Root) finds the
    studies, C-MOVE to the node's own AE title (``move``: the PACS must know the node as a modality)
    or C-GET (``get``: the retrieving process stores what comes back) brings them in."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTLS = Field(default_factory=DestinationTLS)
    retrieve: Literal["move", "get"] = "move"
    max_concurrent: int = Field(2, ge=1, le=16, description="studies retrieved at once (one association each)")
    window: str | None = Field(None, description="HH:MM-HH:MM, local time: studies start only inside it "
                                                 "(off-peak hours; may span midnight); null: any time")
    timeout: float = Field(300, gt=0, description="seconds to wait for each answer of the source")

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("tls", mode="before")
    @classmethod
    def _tls_flag(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None and not _WINDOW.match(value.strip()):
            raise ValueError(f"{value!r} is not HH:MM-HH:MM (e.g. 20:00-06:00)")
        return value.strip() if value is not None else None


class DispatchSettings(Section):
    max_attempts: int = Field(5, ge=1)
    backoff_seconds: float = Field(2.0, ge=0)
    backoff_max_seconds: float = Field(300, ge=0)


class InferenceSettings(Section):
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    pneumonia_arch: Literal["regnety_064", "resnetrs50", "efficientnetv2_s"] = "regnety_064"
    gradcam: bool = True
    summary_image: bool = False
    max_pixels_per_frame: int = Field(100_000_000, ge=1, description="Rows x Columns x Samples per Pixel of one "
                                                                     "frame, checked before pixels are decoded")
    max_pixels_per_series: int = Field(1_000_000_000, ge=1, description="pixels of a whole series (frames "
                                                                        "included), checked before decoding")
    max_bits_allocated: int = Field(32, ge=1, le=64, description="Bits Allocated above this: refused")


class TrainingSettings(Section):
    """``cradle train`` and ``cradle labels import`` (see training/)."""

    reviewer_aets: list[str] = Field(
        default_factory=list,
        description="SEGs received from these calling AE titles count as person-made ground truth "
                    "even when their SegmentAlgorithmType says AUTOMATIC (a reviewer's corrections)")
    runs_dir: Path = Field(Path("var/training"), description="run directories: manifest, checkpoints, report")
    cache_dir: Path = Field(Path("var/cache/preprocessed"), description="preprocessed images, keyed by content")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    time_limit_hours: float = Field(24, gt=0, description="hard limit of a queued training run")
    checkpoints: dict[str, Path] = Field(
        default_factory=dict,
        description="architecture (timm name, e.g. resnet50) -> a site checkpoint (file or Hugging Face hub "
                    "folder): `init: auto`'s second choice, after the view model of that architecture")

    _aes = field_validator("reviewer_aets")(lambda values: [_check_ae_title(v) for v in values])


class PromotionSettings(Section):
    """What ``cradle models promote`` asks of a version beyond the training gate (0: nothing)."""

    min_shadow_cases: int = Field(0, ge=0, description="studies the version must have run on in shadow")
    min_shadow_agreement: float = Field(0.0, ge=0, le=1, description="agreement with the active version in "
                                                                     "shadow (segmentation: mean Dice)")


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = Field("text", description="json: one object per line, with row ids")
    audit_file: Path | None = Field(None, description="append-only JSON lines; default "
                                                      "<storage.archive_dir>/../audit.jsonl")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CRADLE_", env_nested_delimiter="__", extra="forbid", yaml_file=None
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    destinations: list[Destination] = Field(default_factory=list)
    sources: list[Source] = Field(default_factory=list)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    models_dir: Path = Path("var/models")
    task_catalogue: Path | None = Field(None, description="a site's own tasks (config/tasks.yaml's layout), "
                                                          "added to the shipped catalogue")
    populations: dict[str, PopulationOverride] = Field(
        default_factory=dict, description="task name -> the keys of its catalogue population this site changes "
                                          "(e.g. bpd: {max_age_days: 7}); a version still never runs outside "
                                          "the population it was validated on")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    @field_validator("sources")
    @classmethod
    def _source_names_unique(cls, sources: list[Source]) -> list[Source]:
        names = [source.name for source in sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"source name(s) given twice: {', '.join(duplicates)}")
        return sources

    @model_validator(mode="after")
    def _catalogue_loads(self) -> "Settings":
        if self.task_catalogue is not None or self.populations:
            try:
                self.catalogue()
            except CatalogueError as exc:
                raise ValueError(f"task_catalogue: {exc}") from None
            except KeyError as exc:
                raise ValueError(f"populations: {exc.args[0]}") from None
        return self

    def catalogue(self) -> TaskCatalogue:
        """The task catalogue: the shipped tasks plus ``task_catalogue``'s, with ``populations`` applied."""
        return load_catalogue(self.task_catalogue).with_populations(self.populations)

    def audit_path(self) -> Path:
        """Where the audit trail is appended: ``logging.audit_file``, else beside the archive."""
        if self.logging.audit_file is not None:
            return Path(self.logging.audit_file)
        return Path(self.storage.archive_dir).resolve().parent / "audit.jsonl"

    def redacted(self) -> dict[str, Any]:
        """The resolved settings as plain data, with passwords in URLs hidden."""
        data = self.model_dump(mode="json")
        for section, key in (("storage", "database_url"), ("queue", "broker_url")):
            data[section][key] = redact_url(data[section][key])
        return data


class ConfigError(Exception):
    """The configuration file or environment is invalid; the message names the key and why."""


def redact_url(url: str) -> str:
    """``url`` with its passwords hidden: in the authority (``user:password@``, the password may itself
    contain ``@``; also ``redis://:password@host``) and in the query (``?password=``, ``&sslpassword=``)."""
    url = re.sub(r"(://[^:/?#@]*:)[^/?#]*@", r"\1***@", url)  # up to the last @ of the authority
    return re.sub(r"([?&][^=&#]*(?:password|passwd|pwd|secret|token)[^=&#]*=)[^&#]*", r"\1***", url,
                  flags=re.IGNORECASE)


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path | None:
    """``--config``, else ``$CRADLE_CONFIG``, else the first existing default path, else None."""
    if path:
        return Path(path)
    if os.environ.get("CRADLE_CONFIG"):
        return Path(os.environ["CRADLE_CONFIG"])
    return next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (see :func:`resolve_config_path`); raise ConfigError on bad input."""
    config_path = resolve_config_path(path)
    if config_path is not None:
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
        try:
            content = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_path}: not valid YAML: {exc}") from exc
        if content is not None and not isinstance(content, dict):
            raise ConfigError(f"{config_path}: the top level must be a mapping of keys")
    bound = type(
        "Settings", (Settings,),
        {"model_config": {**Settings.model_config, "yaml_file": str(config_path) if config_path else None}},
    )
    try:
        return bound(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_path)) from None


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f"{path}: " if path else ""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        reason = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"{where}{key}: {reason}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
