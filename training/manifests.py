"""Training manifests as read back: the registered versions' (``models_dir/TASK/reports/VERSION/
manifest.json``), the studies they were trained on (kept by retention), and what of a manifest was
pruned from the archive since (said when it is read). Torch-free: ``cradle archive prune`` reads it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from storage.retention import pruned_studies

log = logging.getLogger(__name__)


def manifest_path(models_dir: Path, task: str, version: str) -> Path:
    return Path(models_dir) / task / "reports" / version / "manifest.json"


def registered_manifests(models_dir: Path) -> list[Path]:
    return sorted(Path(models_dir).glob("*/reports/*/manifest.json"))


def studies_used_by_models(models_dir: Path) -> frozenset[str]:
    """Study UIDs of every registered model version's manifest (training, validation and test)."""
    uids: set[str] = set()
    for path in registered_manifests(models_dir):
        uids.update(entry["study_uid"] for entry in json.loads(path.read_text()).get("entries", ())
                    if entry.get("study_uid"))
    return frozenset(uids)


def read_manifest(path: Path, session: Session) -> dict[str, Any]:
    """The manifest at ``path``; when some of its studies were pruned from the archive since, its
    ``pruned`` key says which and how many of its instances, and a warning is logged (by UID count)."""
    manifest = json.loads(Path(path).read_text())
    entries = manifest.get("entries", [])
    pruned = pruned_studies(session, (e["study_uid"] for e in entries if e.get("study_uid")))
    if pruned:
        instances = sum(1 for e in entries if e.get("study_uid") in pruned)
        manifest["pruned"] = {"studies": len(pruned), "instances": instances, "study_uids": sorted(pruned)}
        log.warning("manifest %s refers to %d instances of %d studies pruned from the archive", path, instances,
                    len(pruned))
    return manifest
