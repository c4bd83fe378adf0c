"""What makes every result object reproducible, shared by the SR, SEG and SC writers.

Every object is reproducible: its UIDs come from :func:`inference.uids.result_uid`
(source series + pipeline + model version) and its dates and times from the
source (or a time passed in), so a re-run of the same model gives identical bytes
and a PACS replaces the earlier result instead of keeping a duplicate. The values
highdicom would take from the clock or a random UID are pinned the same way.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, UID
from pydicom.valuerep import DA, DT, TM

from inference.results import MANUFACTURER, SHADOW_RUN, AlgorithmIdentity, WriterInputError, long_string
from inference.uids import result_uid

__all__ = ["ResultUIDs", "pin_generated_values", "resolve_datetime", "slug", "sop_kwargs"]

# Used when the source carries no usable date at all (Study Date is type 2).
_FALLBACK_DATETIME = dt.datetime(1970, 1, 1)


def _source_datetime(source: Dataset) -> dt.datetime:
    """The first complete date/time the source carries (study, series, ...)."""
    for date_kw, time_kw in (
        ("StudyDate", "StudyTime"),
        ("SeriesDate", "SeriesTime"),
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
    ):
        date_value = source.get(date_kw)
        if not date_value:
            continue
        date = DA(date_value)
        time_value = source.get(time_kw)
        time = TM(time_value) if time_value else dt.time(0, 0)
        return dt.datetime.combine(date, time).replace(tzinfo=None)
    return _FALLBACK_DATETIME


def resolve_datetime(source: Dataset, when: dt.datetime | None) -> dt.datetime:
    """The content date/time of a result: ``when`` if given, else the source's."""
    if when is None:
        return _source_datetime(source)
    if not isinstance(when, dt.datetime):
        raise WriterInputError(f"content_datetime must be a datetime, got {when!r}")
    return when.replace(tzinfo=None)


def sop_kwargs(algorithm: AlgorithmIdentity, description: str, when: dt.datetime) -> dict:
    """Equipment, description and date/time arguments shared by every object (a shadow run's
    description starts with :data:`~inference.results.SHADOW_RUN`)."""
    if not algorithm.clinical:
        description = f"{SHADOW_RUN}: {description}"
    return {
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": algorithm.name,
        "software_versions": algorithm.version,
        "device_serial_number": algorithm.version,
        "series_description": long_string(description),
        "content_date": when.date(),
        "content_time": when.time(),
        "series_date": when.date(),
        "series_time": when.time(),
    }


def pin_generated_values(
    ds: Dataset, when: dt.datetime, dimension_uid: str | None = None
) -> None:
    """Replace the values highdicom takes from the clock or a random UID."""
    ds.InstanceCreationDate = DA(when.date())
    ds.InstanceCreationTime = TM(when.time())
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(when)
    if dimension_uid is None:
        return
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dimension_uid
    for item in ds.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dimension_uid


@dataclass(frozen=True)
class ResultUIDs:
    """UID factory for one (source series, pipeline, model version)."""

    source_series_uid: str
    pipeline: str
    model_version: str
    prefix: str = PYDICOM_ROOT_UID

    def __call__(self, kind: str) -> UID:
        return result_uid(
            self.source_series_uid,
            self.pipeline,
            self.model_version,
            kind,
            prefix=self.prefix,
        )


def slug(text: str) -> str:
    """``text`` as a UID ``kind`` part: lower-case letters and digits joined by "-"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"
