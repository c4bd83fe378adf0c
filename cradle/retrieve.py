"""``cradle retrieve --from NAME (--csv FILE | --study UID … | --accession A …) [--json] [--run-pipelines]``.

The command above the layers it joins: the labels CSV is read with ``training.labels``' rules (the
key columns, most specific non-empty key per row, the same encoding and delimiter detection), and
the parsed keys go down to ``node.retrieve`` (which knows nothing of training). Columns other than
the keys (the labels) are left to ``cradle labels import``; an optional ``StudyDate`` column (a DICOM
date or range) narrows a ``PatientID`` row to the studies of that date.

Exit status: 0 when no row failed (missing rows are reported, not failures of the run), 1 when any
row failed, 2 for a bad command line, configuration or CSV (nothing is retrieved then).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from config.settings import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2
STUDY_DATE_COLUMN = "StudyDate"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="NAME", help="a source of `sources`")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--csv", metavar="FILE", help="the labels CSV (StudyInstanceUID, AccessionNumber or "
                                                     "PatientID [+ StudyDate]; other columns are ignored)")
    which.add_argument("--study", nargs="+", metavar="UID", help="Study Instance UIDs")
    which.add_argument("--accession", nargs="+", metavar="A", help="accession numbers")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--run-pipelines", action="store_true",
                        help="route the retrieved series like a live push (jobs, results sent); default: "
                             "archive them for training only")
    parser.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="studies retrieved at once (default: the source's max_concurrent)")
    parser.add_argument("--window", default=None, metavar="HH:MM-HH:MM",
                        help="start studies only in this local-time window (default: the source's window)")


class KeyFileError(ValueError):
    """The CSV cannot give the keys (header, encoding, a row without a key or with a bad date)."""


def read_keys(path: Path) -> list:
    """The keys of a labels CSV, one per data row, named by line number (never by the key itself)."""
    from node.cohort import RetrieveKey
    from training.labels import KEY_COLUMNS, LabelFileError, _dialect, _open_text

    try:
        text = _open_text(path)
    except LabelFileError as exc:
        raise KeyFileError(str(exc)) from None
    if not text.strip():
        raise KeyFileError(f"{path.name}: the file is empty")
    reader = csv.reader(io.StringIO(text, newline=""), _dialect(text))
    names = [h.strip() for h in next(reader)]
    if not any(name in KEY_COLUMNS for name in names):
        raise KeyFileError(f"{path.name}: line 1: no key column; name one of {', '.join(KEY_COLUMNS)}")
    keys, problems = [], []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(names):
            problems.append(f"line {line}: {len(cells)} fields, the header has {len(names)}")
            continue
        row = dict(zip(names, (c.strip() for c in cells)))
        key_column = next((k for k in KEY_COLUMNS if row.get(k)), None)  # the most specific non-empty key
        if key_column is None:
            problems.append(f"line {line}: empty key: fill one of {', '.join(k for k in KEY_COLUMNS if k in row)}")
            continue
        date = row.get(STUDY_DATE_COLUMN, "") if key_column == "PatientID" else ""
        try:
            keys.append(RetrieveKey(key_column, row[key_column], f"line {line}", date))
        except ValueError as exc:  # names the line, never the key
            problems.append(str(exc))
    if problems:
        raise KeyFileError(f"{path.name}:\n  " + "\n  ".join(problems))
    if not keys:
        raise KeyFileError(f"{path.name}: the file has a header but no data rows")
    return keys


def _keys(args: argparse.Namespace) -> list:
    from node.cohort import RetrieveKey

    if args.csv:
        return read_keys(Path(args.csv))
    column, values, flag = (("StudyInstanceUID", args.study, "--study") if args.study
                            else ("AccessionNumber", args.accession, "--accession"))
    return [RetrieveKey(column, value.strip(), f"{flag} {n}") for n, value in enumerate(values, start=1)
            if value.strip()]


def retrieve(args: argparse.Namespace, settings: Settings) -> int:
    from node.cohort import Window
    from node.retrieve import ListenerNotRunning, Retriever

    sources = {source.name: source for source in settings.sources}
    source = sources.get(args.source)
    if source is None:
        known = ", ".join(sorted(sources)) or "none configured"
        print(f"cradle retrieve: no source named {args.source!r} in `sources` ({known})", file=sys.stderr)
        return EXIT_USAGE
    try:
        keys = _keys(args)
        window = Window.parse(args.window) if args.window else None
    except (KeyFileError, ValueError) as exc:
        print(f"cradle retrieve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.concurrency is not None and args.concurrency < 1:
        print("cradle retrieve: --concurrency must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    _warn_about_setup(settings, source)

    from node import handlers
    from storage.db import open_configured_index

    sessions = open_configured_index(settings.storage)
    enqueue = None
    if args.run_pipelines:
        from node.commands import load_enqueue
        enqueue = load_enqueue(settings)
    bar = _ProgressBar(source.name, source.retrieve)
    retriever = Retriever(settings, source, sessions, run_pipelines=args.run_pipelines,
                          max_concurrent=args.concurrency, window=window, progress=bar, enqueue=enqueue)
    previous = handlers.receive_to_files(True) if source.retrieve == "get" else None
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines above the bar, not through it
            summary = retriever.run(keys)
    except ListenerNotRunning as exc:
        print(f"cradle retrieve: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        bar.close()
        if previous is not None:
            handlers.receive_to_files(previous)
        sessions.kw["bind"].dispose()
    result = summary.as_dict()
    if args.json:
        from common.output import print_json
        print_json(result)
    else:
        print(format_summary(result))
    return EXIT_FAILED if result["failed"] else 0


def _warn_about_setup(settings: Settings, source: Any) -> None:
    """C-MOVE: the source's C-STOREs come from its AE title, which the listener must accept."""
    node = settings.node
    if source.retrieve == "move" and not node.loopback_only and source.ae_title not in node.calling_ae_hosts():
        print(f"cradle retrieve: warning: node.allowed_calling_aets does not list {source.ae_title}: the "
              "listener will reject the source's C-STOREs unless it sends them under a listed title",
              file=sys.stderr)


class _ProgressBar:
    """A tqdm bar on stderr over the studies to retrieve (created once their number is known)."""

    def __init__(self, source: str, method: str) -> None:
        self.description = f"retrieve {source} ({method})"
        self.bar = None
        self.counts: dict[str, int] = {}

    def __call__(self, what: str, total: int | None) -> None:
        from tqdm import tqdm

        if what == "total":
            self.bar = tqdm(total=total, desc=self.description, unit="study", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)
            return
        self.counts[what] = self.counts.get(what, 0) + 1
        if self.bar is not None:
            self.bar.set_postfix(self.counts, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(result: dict) -> str:
    lines = [f"retrieve from {result['source']} ({result['method']}) in {result['seconds']:.1f} s",
             f"  rows requested    {result['requested']:>6}",
             f"  found             {result['found']:>6}",
             f"  retrieved         {result['retrieved']:>6}",
             f"  already archived  {result['already_archived']:>6}",
             f"  missing           {result['missing']:>6}",
             f"  failed            {result['failed']:>6}",
             f"  studies retrieved {result['studies']['retrieved']:>6} of {result['studies']['found']}, "
             f"{result['instances_received']} instances received"]
    trouble = [row for row in result["rows"] if row["status"] in ("missing", "failed")]
    if trouble:
        lines.append("rows that did not arrive:")
        lines += [f"  {row['row']} ({row['key_column']}): {row['status']}: {row['reason']}" for row in trouble]
    return "\n".join(lines)
