"""Training labels: outcomes from a CSV, lung masks from person-made SEGs, views from headers.

``cradle labels import FILE.csv`` attaches outcomes to archived studies. The header names one key
column (``StudyInstanceUID``, ``AccessionNumber`` or ``PatientID``; when several are present a row
uses its most specific non-empty one) and any of the label columns below. Every row is validated
against the file and the index; when any row is rejected nothing is applied and each rejection is
reported with its line number and reason. Accepted files are applied in one transaction (an empty
cell means unknown and leaves an existing label alone). Rejection reasons never repeat the
identifier itself: the line number is enough to find it, and terminals end up in logs.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.archive import Archive
from storage.db import transaction
from storage.models import Instance, Patient, Series, Study, StudyLabel

KEY_COLUMNS = ("StudyInstanceUID", "AccessionNumber", "PatientID")
"""Most specific first."""

BINARY_TASKS = ("bpd", "pneumonia")
COVARIATES = ("irds_grade", "gestational_age_weeks", "birth_weight_g")
LABEL_COLUMNS = (*BINARY_TASKS, *COVARIATES)

_TRUE = {"1", "yes", "y", "true", "t"}
_FALSE = {"0", "no", "n", "false", "f"}
_ROMAN = {"0": 0, "i": 1, "ii": 2, "iii": 3, "iv": 4}
_GA_WEEKS_DAYS = re.compile(r"^(\d{2})\s*\+\s*([0-6])$")


class LabelFileError(ValueError):
    """The file cannot be read as a label CSV at all (header or encoding problem)."""


# --- value parsers: text → float, or ValueError with the reason -------------------------------

def parse_binary(text: str) -> float:
    value = text.strip().lower()
    if value in _TRUE:
        return 1.0
    if value in _FALSE:
        return 0.0
    raise ValueError(f"{text.strip()!r} is not 0/1, yes/no or true/false")


def parse_irds_grade(text: str) -> float:
    value = text.strip().lower()
    if value in _ROMAN:
        return float(_ROMAN[value])
    if value.isdigit() and 0 <= int(value) <= 4:
        return float(int(value))
    raise ValueError(f"{text.strip()!r} is not an IRDS grade 0-4 (or I-IV)")


def _number_in(text: str, low: float, high: float, what: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a number") from None
    if not low <= value <= high:
        raise ValueError(f"{value:g} is outside the plausible {what} range {low:g}-{high:g}")
    return value


def parse_gestational_age(text: str) -> float:
    """Weeks, as a decimal (``27.4``) or weeks+days (``27+3``)."""
    match = _GA_WEEKS_DAYS.match(text.strip())
    value = f"{int(match[1]) + int(match[2]) / 7:.4f}" if match else text
    return _number_in(value, 20, 45, "gestational age (weeks)")


def parse_birth_weight(text: str) -> float:
    return _number_in(text, 200, 6500, "birth weight (g)")


PARSERS: dict[str, Callable[[str], float]] = {
    "bpd": parse_binary,
    "pneumonia": parse_binary,
    "irds_grade": parse_irds_grade,
    "gestational_age_weeks": parse_gestational_age,
    "birth_weight_g": parse_birth_weight,
}


# --- the file ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rejection:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class LabelRow:
    line: int
    key_column: str
    key: str
    values: dict[str, float]


@dataclass
class ImportReport:
    rows: int = 0
    studies: int = 0
    labels_written: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    applied: bool = False

    @property
    def ok(self) -> bool:
        return not self.rejections


def _open_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFileError(f"{path.name}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise LabelFileError(f"{path}: {exc.strerror or exc}") from None


def _dialect(text: str) -> type[csv.Dialect] | csv.Dialect:
    first_line = text.split("\n", 1)[0]
    try:
        return csv.Sniffer().sniff(first_line, delimiters=",;\t")
    except csv.Error:
        return csv.excel


def check_header(header: Sequence[str]) -> list[str]:
    """Problems with the header row (line 1)."""
    names = [h.strip() for h in header]
    problems = []
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"duplicate column(s): {', '.join(duplicates)}")
    unknown = [n for n in names if n not in KEY_COLUMNS and n not in LABEL_COLUMNS]
    if unknown:
        problems.append(f"unknown column(s): {', '.join(unknown)} (known: "
                        f"{', '.join(KEY_COLUMNS + LABEL_COLUMNS)})")
    if not any(n in KEY_COLUMNS for n in names):
        problems.append(f"no key column; name one of {', '.join(KEY_COLUMNS)}")
    if not any(n in LABEL_COLUMNS for n in names):
        problems.append(f"no label column; name at least one of {', '.join(LABEL_COLUMNS)}")
    return problems


def parse_row(line: int, row: dict[str, str]) -> tuple[LabelRow | None, list[Rejection]]:
    """One data row → a LabelRow, or the reasons it is rejected."""
    key_column = next((k for k in KEY_COLUMNS if (row.get(k) or "").strip()), None)
    if key_column is None:
        return None, [Rejection(line, f"empty key: fill one of {', '.join(k for k in KEY_COLUMNS if k in row)}")]
    values: dict[str, float] = {}
    rejections = []
    for column in LABEL_COLUMNS:
        text = (row.get(column) or "").strip()
        if not text:
            continue
        try:
            values[column] = PARSERS[column](text)
        except ValueError as exc:
            rejections.append(Rejection(line, f"{column}: {exc}"))
    if rejections:
        return None, rejections
    return LabelRow(line, key_column, row[key_column].strip(), values), []


def read_label_file(path: Path) -> tuple[list[LabelRow], list[Rejection]]:
    """Parse and validate the values of every row (no database needed)."""
    text = _open_text(path)
    if not text.strip():
        return [], [Rejection(1, "the file is empty")]
    reader = csv.reader(io.StringIO(text, newline=""), _dialect(text))
    header = next(reader)
    problems = check_header(header)
    if problems:
        return [], [Rejection(1, p) for p in problems]
    names = [h.strip() for h in header]
    rows, rejections = [], []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(names):
            rejections.append(Rejection(line, f"{len(cells)} fields, the header has {len(names)}"))
            continue
        row, problems_here = parse_row(line, dict(zip(names, cells)))
        rejections.extend(problems_here)
        if row is not None:
            rows.append(row)
    if not rows and not rejections:
        rejections.append(Rejection(1, "the file has a header but no data rows"))
    return rows, rejections


# --- resolving keys against the index ---------------------------------------------------------

def studies_for(session: Session, key_column: str, key: str) -> tuple[list[int], str | None]:
    """Study primary keys the key designates, or the reason it designates none (or is ambiguous)."""
    if key_column == "StudyInstanceUID":
        found = session.scalars(select(Study.id).where(Study.study_uid == key)).all()
        return list(found), None if found else "no archived study has this StudyInstanceUID"
    if key_column == "AccessionNumber":
        found = session.scalars(select(Study.id).where(Study.accession_number == key)).all()
        if len(found) > 1:
            return [], f"this AccessionNumber matches {len(found)} archived studies; use StudyInstanceUID"
        return list(found), None if found else "no archived study has this AccessionNumber"
    patients = session.scalars(select(Patient.id).where(Patient.patient_id == key)).all()
    if len(patients) > 1:
        return [], (f"this PatientID matches {len(patients)} archived patients (other issuer or birth "
                    "date); use StudyInstanceUID")
    if not patients:
        return [], "no archived patient has this PatientID"
    found = session.scalars(select(Study.id).where(Study.patient_pk == patients[0])).all()
    return list(found), None


def resolve(session: Session, rows: Iterable[LabelRow]) -> tuple[dict[tuple[int, str], tuple[float, int]],
                                                                  list[Rejection]]:
    """(study, task) → (value, line); rows whose key is unknown, ambiguous or that contradict an
    earlier row of the file for the same study are rejected."""
    assignments: dict[tuple[int, str], tuple[float, int]] = {}
    rejections = []
    for row in rows:
        studies, problem = studies_for(session, row.key_column, row.key)
        if problem:
            rejections.append(Rejection(row.line, problem))
            continue
        for study in studies:
            for task, value in row.values.items():
                earlier = assignments.get((study, task))
                if earlier is not None and earlier[0] != value:
                    rejections.append(Rejection(row.line, f"{task}: {value:g} contradicts line {earlier[1]} "
                                                          f"({earlier[0]:g}) for the same study"))
                    continue
                assignments[(study, task)] = (value, row.line)
    return assignments, rejections


def _apply(session: Session, assignments: dict[tuple[int, str], tuple[float, int]], source: str) -> int:
    existing = {(label.study_pk, label.task): label for label in session.scalars(
        select(StudyLabel).where(StudyLabel.study_pk.in_({s for s, _ in assignments})))}
    for (study, task), (value, line) in assignments.items():
        label = existing.get((study, task))
        if label is None:
            session.add(StudyLabel(study_pk=study, task=task, value=value, source=f"{source}:{line}"))
        else:
            label.value, label.source = value, f"{source}:{line}"
    return len(assignments)


def import_labels(sessions: sessionmaker[Session], path: Path) -> ImportReport:
    """Validate ``path`` entirely, then apply it in one transaction only when no row is rejected."""
    rows, rejections = read_label_file(path)
    report = ImportReport(rows=len(rows) + len({r.line for r in rejections if r.line > 1}))
    with transaction(sessions) as session:
        assignments, unresolved = resolve(session, rows)
        report.rejections = sorted(rejections + unresolved, key=lambda r: r.line)
        if report.rejections:
            session.rollback()
            return report
        report.labels_written = _apply(session, assignments, path.name)
        report.studies = len({s for s, _ in assignments})
        report.applied = True
    return report


def study_labels(session: Session, task: str) -> dict[int, float]:
    """Study primary key → value of ``task``."""
    return dict(session.execute(select(StudyLabel.study_pk, StudyLabel.value).where(StudyLabel.task == task)).all())


# --- lung masks: SEGs that a person made ------------------------------------------------------

PERSON_MADE = {"MANUAL", "SEMIAUTOMATIC"}
LUNG_CODES = {"39607008", "44029006", "3341006"}  # SNOMED CT: lung, left lung, right lung


@dataclass(frozen=True)
class ReferenceSegmentation:
    """A SEG accepted as ground truth for an archived MR series."""

    seg_sop_uid: str
    seg_path: str
    mr_series_uid: str
    segment_numbers: tuple[int, ...]
    reason: str


def _lung_segments(ds) -> list[tuple[int, str]]:  # noqa: ANN001 - pydicom Dataset
    """(segment number, algorithm type) of the segments coded as lung (or all, if none is coded)."""
    segments = []
    for item in ds.get("SegmentSequence", []):
        codes = {str(c.get("CodeValue", "")) for key in ("SegmentedPropertyTypeCodeSequence",
                                                          "AnatomicRegionSequence")
                 for c in item.get(key, [])}
        label = str(item.get("SegmentLabel", "")).lower()
        is_lung = bool(codes & LUNG_CODES) or "lung" in label
        segments.append((int(item.SegmentNumber), str(item.get("SegmentAlgorithmType", "")).upper(), is_lung))
    lungs = [(n, t) for n, t, lung in segments if lung]
    return lungs or [(n, t) for n, t, _ in segments]


def _referenced_series(ds) -> set[str]:  # noqa: ANN001 - pydicom Dataset
    return {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])
            if "SeriesInstanceUID" in item}


def judge_segmentation(ds, calling_ae: str, reviewer_aets: Sequence[str]) -> tuple[tuple[int, ...], str | None]:  # noqa: ANN001
    """The lung segments of a SEG usable as ground truth and why, or () and None."""
    segments = _lung_segments(ds)
    if not segments:
        return (), None
    if calling_ae and calling_ae in set(reviewer_aets):
        return tuple(n for n, _ in segments), f"received from reviewer AE {calling_ae}"
    person_made = tuple(n for n, kind in segments if kind in PERSON_MADE)
    if person_made and len(person_made) == len(segments):
        kinds = sorted({kind for _, kind in segments})
        return person_made, f"SegmentAlgorithmType {'/'.join(kinds)}"
    return (), None


def reference_segmentations(session: Session, archive: Archive,
                            reviewer_aets: Sequence[str] = ()) -> list[ReferenceSegmentation]:
    """Person-made lung SEGs referencing an archived MR series; the node's own results never count.

    When several qualify for one MR series the last received wins (a correction supersedes).
    """
    mr_series = set(session.scalars(select(Series.series_uid).where(
        Series.modality == "MR", Series.is_result.is_(False))).all())
    candidates = session.execute(
        select(Instance.sop_uid, Instance.file_path, Instance.calling_ae_title)
        .join(Series, Instance.series_pk == Series.id)
        .where(Series.modality == "SEG", Series.is_result.is_(False))
        .order_by(Instance.received_at, Instance.id)).all()
    chosen: dict[str, ReferenceSegmentation] = {}
    for sop_uid, path, calling_ae in candidates:
        ds = dcmread(archive.absolute(path), stop_before_pixels=True)
        targets = _referenced_series(ds) & mr_series
        segments, reason = judge_segmentation(ds, calling_ae, reviewer_aets)
        if not targets or reason is None:
            continue
        for target in targets:
            chosen[target] = ReferenceSegmentation(sop_uid, path, target, segments, reason)
    return list(chosen.values())


# --- views from headers -----------------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


@dataclass(frozen=True)
class ViewRule:
    label: str
    body_parts: frozenset[str] = frozenset()
    view_positions: frozenset[str] = frozenset()
    description: re.Pattern[str] | None = None
    modalities: frozenset[str] = frozenset({"CR", "DX"})

    def matches(self, header: "ViewHeader") -> bool:
        if self.modalities and header.modality.upper() not in self.modalities:
            return False
        if self.body_parts and header.body_part.upper().replace(" ", "_") not in self.body_parts:
            return False
        if self.view_positions and header.view_position.upper() not in self.view_positions:
            return False
        text = " ".join((header.series_description, header.protocol_name, header.study_description))
        return self.description is None or bool(self.description.search(text))


@dataclass(frozen=True)
class ViewHeader:
    modality: str
    body_part: str = ""
    view_position: str = ""
    series_description: str = ""
    protocol_name: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class ViewTaxonomy:
    """A taxonomy's class list, each fine class's 7-class parent, and the header rules."""

    name: str
    classes: tuple[str, ...]
    parents: dict[str, str]
    rules: tuple[ViewRule, ...]

    def label_of(self, header: ViewHeader) -> str | None:
        """The class of an image from its header, or None when no rule matches."""
        for rule in self.rules:
            if rule.matches(header):
                return rule.label if rule.label in self.classes else self.parents.get(rule.label)
        return None


def _rule(entry: dict) -> ViewRule:
    upper = lambda items: frozenset(str(i).upper().replace(" ", "_") for i in items or [])  # noqa: E731
    pattern = entry.get("description")
    return ViewRule(label=entry["class"], body_parts=upper(entry.get("body_parts")),
                    view_positions=upper(entry.get("view_positions")),
                    description=re.compile(pattern, re.IGNORECASE) if pattern else None,
                    modalities=upper(entry.get("modalities", ["CR", "DX"])))


def load_view_taxonomy(name: str | None = None, *, views_file: Path | None = None,
                       rules_file: Path | None = None) -> ViewTaxonomy:
    """``config/views.yaml`` (classes) + ``config/view_rules.yaml`` (header rules, 30-class names;
    a 7-class taxonomy folds them to their parents)."""
    views = yaml.safe_load((views_file or CONFIG_DIR / "views.yaml").read_text())
    name = name or views.get("default", "views7")
    if name not in views["taxonomies"]:
        raise ValueError(f"unknown view taxonomy {name!r}; known: {', '.join(views['taxonomies'])}")
    classes = views["taxonomies"][name]["classes"]
    parents = dict(views["taxonomies"].get("views30", {}).get("classes", {}))
    parents.update({c: p for c, p in classes.items()})
    rules = yaml.safe_load((rules_file or CONFIG_DIR / "view_rules.yaml").read_text())["rules"]
    return ViewTaxonomy(name, tuple(classes), parents, tuple(_rule(r) for r in rules))
