"""What ``cradle retrieve`` asks a PACS for and what came back: the requested rows (the labels CSV's
keys), the studies a C-FIND found, each study's and row's outcome, the run's summary, and the
off-peak time window. Plain data: :mod:`node.retrieve` does the talking."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

KEY_COLUMNS = ("StudyInstanceUID", "AccessionNumber", "PatientID")
"""The row keys a retrieval accepts (those of the labels CSV), most specific first."""

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE_RANGE = re.compile(r"^(\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8})$")


@dataclass(frozen=True)
class RetrieveKey:
    """One requested row. ``where`` names it in reports and logs ("line 4", "--accession 2"): the
    key itself (an accession number, a patient ID) is never logged."""

    key_column: str
    key: str
    where: str
    study_date: str = ""
    """PatientID rows: a DICOM date or range (``20250102``, ``20250101-20250131``); empty: any date."""

    def __post_init__(self) -> None:
        if self.key_column not in KEY_COLUMNS:
            raise ValueError(f"{self.where}: key column {self.key_column!r} is not one of {', '.join(KEY_COLUMNS)}")
        if not self.key.strip():
            raise ValueError(f"{self.where}: empty {self.key_column}")
        # C-FIND matching: "*" and "?" are wildcards and "\\" separates values; a key is matched exactly,
        # never widened (a PatientID "*" would bring the whole PACS)
        if any(c in self.key for c in "*?\\"):
            raise ValueError(f"{self.where}: the {self.key_column} contains a wildcard (* ?) or a backslash; "
                             "keys are matched exactly")
        if self.key_column == "StudyInstanceUID" and (len(self.key) > 64 or not _UID.match(self.key)):
            raise ValueError(f"{self.where}: not a UID (digits and dots, at most 64 characters)")
        if self.study_date and not _DATE_RANGE.match(self.study_date):
            raise ValueError(f"{self.where}: StudyDate is not a DICOM date or range (YYYYMMDD[-YYYYMMDD])")

    @property
    def shown(self) -> str | None:
        """The key as it may be printed: only a UID."""
        return self.key if self.key_column == "StudyInstanceUID" else None


@dataclass(frozen=True)
class FoundStudy:
    study_uid: str
    instances: int | None
    """NumberOfStudyRelatedInstances as the source reports it (None: it did not say)."""
    sop_classes: tuple[str, ...] = ()


@dataclass
class StudyOutcome:
    study_uid: str
    status: str  # retrieved, already_archived, failed
    expected: int | None
    archived: int
    received: int = 0
    reason: str = ""
    seconds: float = 0.0
    retrieval_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "status": self.status, "instances_at_source": self.expected,
                "instances_archived": self.archived, "instances_received": self.received,
                "reason": self.reason, "seconds": round(self.seconds, 3), "retrieval_id": self.retrieval_id}


@dataclass
class RowOutcome:
    key: RetrieveKey
    status: str = "pending"  # retrieved, already_archived, missing, failed
    reason: str = ""
    studies: list[StudyOutcome] = field(default_factory=list)
    found: list[FoundStudy] = field(default_factory=list, repr=False)

    def settle(self) -> None:
        """The row's status from its studies' (unless the query already decided it)."""
        if self.status in ("missing", "failed") and not self.studies:
            return
        failed = [s for s in self.studies if s.status == "failed"]
        if failed:
            self.status = "failed"
            self.reason = "; ".join(f"study {s.study_uid}: {s.reason}" for s in failed)
        elif all(s.status == "already_archived" for s in self.studies):
            self.status, self.reason = "already_archived", ""
        else:
            self.status, self.reason = "retrieved", ""

    def as_dict(self) -> dict[str, Any]:
        row = {"row": self.key.where, "key_column": self.key.key_column, "status": self.status,
               "reason": self.reason, "studies": [s.as_dict() for s in self.studies]}
        if self.key.shown is not None:
            row["study_uid"] = self.key.shown
        return row


@dataclass
class RetrieveSummary:
    source: str
    method: str
    rows: list[RowOutcome]
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows if row.status == status)

    @property
    def found(self) -> int:
        return sum(1 for row in self.rows if row.studies)

    def as_dict(self) -> dict[str, Any]:
        studies = [s for row in self.rows for s in row.studies]
        return {
            "requested": len(self.rows), "found": self.found, "retrieved": self.count("retrieved"),
            "already_archived": self.count("already_archived"), "missing": self.count("missing"),
            "failed": self.count("failed"), "source": self.source, "method": self.method,
            "studies": {"found": len(studies), "retrieved": sum(s.status == "retrieved" for s in studies),
                        "already_archived": sum(s.status == "already_archived" for s in studies),
                        "failed": sum(s.status == "failed" for s in studies)},
            "instances_received": sum(s.received for s in studies),
            "seconds": round(self.seconds, 3),
            "rows": [row.as_dict() for row in self.rows],
        }


# --- the time window --------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """``HH:MM-HH:MM`` in local time; may span midnight (``20:00-06:00``); equal ends: all day."""

    start: dt.time
    end: dt.time

    @classmethod
    def parse(cls, text: str) -> "Window":
        try:
            start, end = (dt.datetime.strptime(part.strip(), "%H:%M").time() for part in text.split("-"))
        except ValueError:
            raise ValueError(f"{text!r} is not HH:MM-HH:MM (e.g. 20:00-06:00)") from None
        return cls(start, end)

    def contains(self, moment: dt.datetime) -> bool:
        now = moment.time()
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def seconds_until_open(self, moment: dt.datetime) -> float:
        if self.contains(moment):
            return 0.0
        opening = dt.datetime.combine(moment.date(), self.start)
        if opening <= moment:
            opening += dt.timedelta(days=1)
        return (opening - moment).total_seconds()

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"
