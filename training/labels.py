"""Training labels: outcomes from a CSV, lung masks from person-made SEGs, views from headers.

``cradle labels import FILE.csv`` attaches outcomes to archived studies. The header names one key
column (``StudyInstanceUID``, ``AccessionNumber`` or ``PatientID``; when several are present a row
uses its most specific non-empty one) and any of the label columns: each task of the task catalogue
whose labels come from a csv column (its accepted values by kind: binary 0/1, yes/no, true/false;
multiclass its class names and aliases; regression a number within its range), and the covariates
below; an optional ``StudyDate`` column (a DICOM date or range) narrows a PatientID row to those
studies, as ``cradle retrieve`` reads the same file. Every row is validated against the file and the index; when any row is rejected nothing is
applied and each rejection is reported with its line number and reason. Accepted files are applied in
one transaction (an empty cell means unknown and leaves an existing label alone). Rejection reasons
never repeat the identifier itself: the line number is enough to find it, and terminals end up in logs.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.tasks import YES_NO_POSITIVE, TaskCatalogue, TaskDefinition, load_catalogue
from config.views import load_view_taxonomy
from storage.archive import Archive
from storage.db import transaction
from storage.models import Instance, Patient, Series, Study, StudyLabel

KEY_COLUMNS = ("StudyInstanceUID", "AccessionNumber", "PatientID")
"""Most specific first."""
STUDY_DATE_COLUMN = "StudyDate"
"""Optional: narrows a PatientID row to the studies of that DICOM date or range (YYYYMMDD,
YYYYMMDD-YYYYMMDD, open-ended with a leading or trailing dash), as ``cradle retrieve`` reads it."""
_DATE_RANGE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")

BINARY_TASKS = tuple(task.name for task in load_catalogue() if task.kind == "binary")
"""The shipped catalogue's binary tasks (derived: the catalogue is the definition)."""

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


def parse_class(text: str, classes: Sequence[str], aliases: dict[str, str]) -> float:
    """A class name (or an alias of one), any case → its index in ``classes``."""
    value = text.strip().lower()
    names = {c.lower(): c for c in classes} | {a.lower(): c for a, c in aliases.items()}
    if value not in names or names[value] not in classes:
        raise ValueError(f"{text.strip()!r} is not one of {', '.join(classes)}")
    return float(list(classes).index(names[value]))


def parse_class_or_yes_no(text: str, classes: Sequence[str], aliases: dict[str, str]) -> float:
    """A class name, or 0/1 (yes/no): 0 is the first class, 1 is "some other class" (YES_NO_POSITIVE)."""
    try:
        return parse_class(text, classes, aliases)
    except ValueError:
        try:
            return YES_NO_POSITIVE if parse_binary(text) else 0.0
        except ValueError:
            raise ValueError(f"{text.strip()!r} is not one of {', '.join(classes)} (or 0/1)") from None


COVARIATE_PARSERS: dict[str, Callable[[str], float]] = {
    "irds_grade": parse_irds_grade,
    "gestational_age_weeks": parse_gestational_age,
    "birth_weight_g": parse_birth_weight,
}
COVARIATES = tuple(COVARIATE_PARSERS)
"""Columns that describe the baby rather than a task's outcome; any label CSV may carry them."""


def task_parser(task: TaskDefinition) -> Callable[[str], float]:
    """The values a task's label column accepts, by the task's kind."""
    if task.kind == "binary":
        return parse_binary
    if task.kind == "multiclass":
        classes = load_view_taxonomy().classes if task.classes == "taxonomy" else tuple(task.classes or ())
        if task.labels.yes_no:
            return lambda text: parse_class_or_yes_no(text, classes, task.labels.aliases)
        return lambda text: parse_class(text, classes, task.labels.aliases)
    if task.kind == "regression" and task.labels.range is not None:
        low, high = task.labels.range
        what = f"{task.name} ({task.labels.units})" if task.labels.units else task.name
        return lambda text: _number_in(text, low, high, what)
    raise LabelFileError(f"task {task.name}: a {task.kind} task takes no labels from a csv column")


@dataclass(frozen=True)
class LabelColumn:
    """A column of the label CSV: the label it records (a task's name, or a covariate's) and its parser."""

    name: str
    label: str
    parse: Callable[[str], float]


def label_columns(catalogue: TaskCatalogue | None = None) -> dict[str, LabelColumn]:
    """The label columns: the catalogue's csv-labelled tasks (in catalogue order), then the covariates."""
    columns = {task.labels.column: LabelColumn(task.labels.column, task.name, task_parser(task))
               for task in catalogue or load_catalogue() if task.labels.source == "csv" and task.labels.column}
    columns.update({name: LabelColumn(name, name, parse) for name, parse in COVARIATE_PARSERS.items()})
    return columns


LABEL_COLUMNS = tuple(label_columns())
"""The shipped catalogue's label columns and the covariates (derived)."""


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
    study_dates: tuple[dt.date | None, dt.date | None] | None = None


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


def check_header(header: Sequence[str], columns: Sequence[str] = LABEL_COLUMNS) -> list[str]:
    """Problems with the header row (line 1), given the known label ``columns``."""
    names = [h.strip() for h in header]
    columns = tuple(columns)
    problems = []
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"duplicate column(s): {', '.join(duplicates)}")
    unknown = [n for n in names if n not in KEY_COLUMNS and n not in columns and n != STUDY_DATE_COLUMN]
    if unknown:
        problems.append(f"unknown column(s): {', '.join(unknown)} (known: "
                        f"{', '.join(KEY_COLUMNS + columns)})")
    if not any(n in KEY_COLUMNS for n in names):
        problems.append(f"no key column; name one of {', '.join(KEY_COLUMNS)}")
    if not any(n in columns for n in names):
        problems.append(f"no label column; name at least one of {', '.join(columns)}")
    return problems


def parse_row(line: int, row: dict[str, str],
              columns: dict[str, LabelColumn] | None = None) -> tuple[LabelRow | None, list[Rejection]]:
    """One data row → a LabelRow (values by label), or the reasons it is rejected."""
    columns = columns if columns is not None else label_columns()
    key_column = next((k for k in KEY_COLUMNS if (row.get(k) or "").strip()), None)
    if key_column is None:
        return None, [Rejection(line, f"empty key: fill one of {', '.join(k for k in KEY_COLUMNS if k in row)}")]
    values: dict[str, float] = {}
    rejections = []
    for column in columns.values():
        text = (row.get(column.name) or "").strip()
        if not text:
            continue
        try:
            values[column.label] = column.parse(text)
        except ValueError as exc:
            rejections.append(Rejection(line, f"{column.name}: {exc}"))
    dates = None
    date_text = (row.get(STUDY_DATE_COLUMN) or "").strip()
    if date_text:
        try:
            dates = parse_study_dates(date_text)
        except ValueError as exc:
            rejections.append(Rejection(line, f"{STUDY_DATE_COLUMN}: {exc}"))
    if rejections:
        return None, rejections
    return LabelRow(line, key_column, row[key_column].strip(), values, dates), []


def parse_study_dates(text: str) -> tuple[dt.date | None, dt.date | None]:
    """A DICOM date or range → (first, last), either end open."""
    match = _DATE_RANGE.match(text)
    if not match or not (match[1] or match[3]) or (match[1] and match[3] and not match[2]):
        raise ValueError(f"{text!r} is not a DICOM date or range (YYYYMMDD, YYYYMMDD-YYYYMMDD)")
    try:
        first = dt.datetime.strptime(match[1], "%Y%m%d").date() if match[1] else None
        last = dt.datetime.strptime(match[3], "%Y%m%d").date() if match[3] else None
    except ValueError:
        raise ValueError(f"{text!r} is not a calendar date") from None
    return (first, first) if first and not match[2] else (first, last)


def read_label_file(path: Path, catalogue: TaskCatalogue | None = None) -> tuple[list[LabelRow], list[Rejection]]:
    """Parse and validate the values of every row (no database needed) against the catalogue's label
    columns (default: the shipped catalogue's)."""
    columns = label_columns(catalogue)
    text = _open_text(path)
    if not text.strip():
        return [], [Rejection(1, "the file is empty")]
    reader = csv.reader(io.StringIO(text, newline=""), _dialect(text))
    header = next(reader)
    problems = check_header(header, tuple(columns))
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
        row, problems_here = parse_row(line, dict(zip(names, cells)), columns)
        rejections.extend(problems_here)
        if row is not None:
            rows.append(row)
    if not rows and not rejections:
        rejections.append(Rejection(1, "the file has a header but no data rows"))
    return rows, rejections


# --- resolving keys against the index ---------------------------------------------------------

def studies_for(session: Session, key_column: str, key: str,
                study_dates: tuple[dt.date | None, dt.date | None] | None = None) -> tuple[list[int], str | None]:
    """Study primary keys the key designates, or the reason it designates none (or is ambiguous).
    ``study_dates`` narrows a PatientID to the studies of those dates."""
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
    query = select(Study.id).where(Study.patient_pk == patients[0])
    first, last = study_dates or (None, None)
    if first is not None:
        query = query.where(Study.study_date >= first)
    if last is not None:
        query = query.where(Study.study_date <= last)
    found = session.scalars(query).all()
    if study_dates is not None and not found:
        return [], "no archived study of this PatientID has that StudyDate"
    return list(found), None


def resolve(session: Session, rows: Iterable[LabelRow]) -> tuple[dict[tuple[int, str], tuple[float, int]],
                                                                  list[Rejection]]:
    """(study, task) → (value, line); rows whose key is unknown, ambiguous or that contradict an
    earlier row of the file for the same study are rejected."""
    assignments: dict[tuple[int, str], tuple[float, int]] = {}
    rejections = []
    for row in rows:
        studies, problem = studies_for(session, row.key_column, row.key, row.study_dates)
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


def import_labels(sessions: sessionmaker[Session], path: Path, catalogue: TaskCatalogue | None = None) -> ImportReport:
    """Validate ``path`` entirely, then apply it in one transaction only when no row is rejected.
    ``catalogue``: the settings' (``Settings.catalogue()``, with the site's tasks); default the shipped one."""
    rows, rejections = read_label_file(path, catalogue)
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
