"""The audit trail: append-only JSON lines, one event per line, written by every cradle process.

Who associated (accepted or rejected, and why), what arrived (UIDs and row ids only), what every
job did, which result went where with which status, which model became active, and which
configuration each process started with. ``logging.audit_file`` names the file; by default it lies
beside the archive (``<storage.archive_dir>/../audit.jsonl``).

Design:

* The trail is a logger (``cradle.audit``, not propagated to the ordinary logs) with one handler,
  installed per process by :func:`configure_audit`; code anywhere calls :func:`audit`. Without a
  handler (a library use, a unit test) events go nowhere.
* The file is opened ``O_APPEND`` and created ``0600``; each event is one ``write()`` of one line,
  so the listener, the workers and the dispatcher append to the same file without interleaving
  (lines stay below the size a local file system writes at once). Nothing rewrites or truncates it;
  rotate it with ``logrotate``'s ``copytruncate`` off (``create 0600 cradle cradle``).
* Patient identifiers cannot get in by accident: only the field names in :data:`FIELDS` are
  written (others are dropped and the drop is logged by name), and values are numbers, booleans,
  short strings or lists and mappings of them. Callers pass UIDs, row ids, AE titles, addresses,
  states and statuses, never data set values.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

AUDIT_LOGGER = "cradle.audit"

FIELDS = frozenset({
    # associations
    "calling_ae", "called_ae", "address", "port", "reason", "tls", "tls_version", "peer_certificate",
    "stored", "failed",
    # instances
    "sop_uid", "sop_class_uid", "series_uid", "study_uid", "instance_pk", "series_pk", "study_pk",
    "outcome", "status", "bytes", "reopened",
    # jobs and results
    "job_id", "job_ids", "pipeline", "pipelines", "rules", "state", "attempt", "generation", "owner",
    "model_version", "result_uids", "error_type", "action", "destination", "destination_ae", "round",
    "delivered", "dispatch_state", "shadow",
    # models and configuration
    "task", "version", "previous", "by", "config_file", "config_sha256", "changed_keys", "first",
    "component",
    # retention
    "instances", "rule", "dry_run",
})

_log = logging.getLogger(AUDIT_LOGGER)
_log.propagate = False
_log.setLevel(logging.INFO)
_problems = logging.getLogger(__name__)


def audit(event: str, **fields: Any) -> None:
    """Append one event (``"association.rejected"``, ``"job.done"`` ...) to the trail, if configured."""
    if not _log.handlers:
        return
    _log.info(event, extra={"audit_fields": fields})


def _clean(fields: Mapping[str, Any]) -> dict[str, Any]:
    kept, dropped = {}, []
    for key, value in fields.items():
        if key in FIELDS and _plain(value):
            kept[key] = value
        else:
            dropped.append(key)
    if dropped:
        _problems.warning("audit: fields dropped (not on the list of fields without patient data): %s",
                          ", ".join(sorted(dropped)))
    return kept


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= 512
    if depth < 3 and isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def open_private(path: Path, flags: int) -> int:
    """Open ``path`` with ``flags`` | O_CREAT, created 0600 (an existing file of ours is tightened)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    except OSError:
        pass
    return fd


class AuditFileHandler(logging.Handler):
    """Writes each audit record as one JSON line (``O_APPEND``, file mode 0600, opened on first use)."""

    def __init__(self, path: Path, component: str) -> None:
        super().__init__(logging.INFO)
        self.path = Path(path)
        self.component = component
        self.host = socket.gethostname()
        self._fd: int | None = None
        self._pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = {"ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
                     "event": record.getMessage(), "component": self.component, "host": self.host,
                     "pid": os.getpid()}
            entry.update(_clean(getattr(record, "audit_fields", {})))
            line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
            os.write(self._file(), line.encode("utf-8"))
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise into the caller
            self.handleError(record)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own descriptor
            self._fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
        super().close()


def configure_audit(path: Path, component: str) -> AuditFileHandler:
    """Send this process's audit events to ``path`` (replacing an earlier audit handler)."""
    for handler in list(_log.handlers):
        _log.removeHandler(handler)
        handler.close()
    handler = AuditFileHandler(path, component)
    _log.addHandler(handler)
    return handler


def unconfigure_audit() -> None:
    for handler in list(_log.handlers):
        _log.removeHandler(handler)
        handler.close()


def current_user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


# --- configuration changes -----------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def record_config(resolved: dict[str, Any], audit_path: Path, component: str,
                  config_file: str | None) -> list[str]:
    """Audit the configuration this process starts with: ``config.loaded`` with its digest and, when
    it differs from the one the last process started with, ``config.changed`` naming the changed keys
    (not their values). The last configuration (passwords hidden) is kept beside the trail, 0600.
    Returns the changed keys."""
    flat = _flatten(resolved)
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()
    snapshot = Path(f"{audit_path}.config.json")
    fd = open_private(snapshot, os.O_RDWR)
    with os.fdopen(fd, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        text = handle.read()
        try:
            before = json.loads(text) if text.strip() else None
        except ValueError:
            before = None
        changed: list[str] = []
        if before is not None:
            changed = sorted(k for k in flat.keys() | before.keys() if flat.get(k) != before.get(k))
        if before is None or changed:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(flat, sort_keys=True, default=str))
            handle.flush()
            os.fsync(handle.fileno())
    audit("config.loaded", component=component, config_file=config_file, config_sha256=digest,
          first=before is None)
    if changed:
        audit("config.changed", component=component, config_file=config_file, config_sha256=digest,
              changed_keys=changed, by=current_user())
    return changed
