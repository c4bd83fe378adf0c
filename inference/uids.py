"""Deterministic UIDs for cradle's result objects.

A result's Series and SOP Instance UIDs are hashed from the source series, the
pipeline and the model version, so re-running the same model on the same series
gives the same UIDs: a PACS replaces the earlier object instead of storing a
duplicate. A new model version gives new UIDs (a new result series).
"""

from __future__ import annotations

from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

__all__ = ["result_uid", "device_uid"]

_NAMESPACE = "cradle"


def _check_parts(**parts: str) -> None:
    for name, value in parts.items():
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def result_uid(
    source_series_uid: str,
    pipeline: str,
    model_version: str,
    kind: str,
    *,
    prefix: str = PYDICOM_ROOT_UID,
) -> UID:
    """UID of one result object (or series) derived from its inputs.

    ``kind`` names the object within the result, e.g. ``"sr-series"``,
    ``"sr-instance"``, ``"seg-series"``, ``"seg-instance"``, ``"sc-series"``.
    ``prefix`` is the organisation root (pydicom's by default); it must end
    with a dot.
    """
    _check_parts(
        source_series_uid=source_series_uid,
        pipeline=pipeline,
        model_version=model_version,
        kind=kind,
    )
    return generate_uid(
        prefix=prefix,
        entropy_srcs=[_NAMESPACE, source_series_uid, pipeline, model_version, kind],
    )


def device_uid(
    algorithm_name: str, algorithm_version: str, *, prefix: str = PYDICOM_ROOT_UID
) -> UID:
    """Device Observer UID of one model version (the same for every study)."""
    _check_parts(algorithm_name=algorithm_name, algorithm_version=algorithm_version)
    return generate_uid(
        prefix=prefix,
        entropy_srcs=[_NAMESPACE, "device", algorithm_name, algorithm_version],
    )
