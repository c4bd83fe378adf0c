"""Ingest benchmark: the node against a minimal pynetdicom SCP, pushed the same files by DCMTK storescu.

    python -m benchmarks.ingest [--count 300] [--size-mb 2] [--repeat 5] [--pdu 262144] [--json]
                                [--no-fsync]

The minimal SCP only writes ``event.encoded_dataset()`` to a file (no fsync, no index). The node
runs as ``cradle listen`` with durable writes (fsync of file and directory), the SQLite index,
completion and routing. Both are separate processes, both are started fresh (empty output) for
every push and are up before the clock starts, and both accept the same maximum PDU. The pushes
alternate (baseline, node, node, baseline, ...) and the page cache is flushed between them
(untimed), so one push's write-back does not land on the next. Reported: the median of each and
their ratio (target: node / baseline ≤ 1.2), and per instance the wall time and the CPU time the
receiving process used (user + system, all its threads), which tells work from waiting when
other processes load the machine. ``--no-fsync`` runs the node without its fsyncs, to show the
disk's share (a diagnostic, not a configuration to run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from common.processes import stop_process

CALLING_AE = "BENCHSCU"
NODE_AE = "CRADLE"
BASELINE_AE = "BASELINE"
DEFAULT_PDU = 262144
READY_TIMEOUT = 60.0
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BenchReport:
    count: int
    size_mb: float
    max_pdu: int
    baseline_seconds: list[float] = field(default_factory=list)
    node_seconds: list[float] = field(default_factory=list)
    baseline_cpu_seconds: list[float] = field(default_factory=list)
    node_cpu_seconds: list[float] = field(default_factory=list)
    node_fsync: bool = True

    @property
    def baseline(self) -> float:
        return statistics.median(self.baseline_seconds)

    @property
    def node(self) -> float:
        return statistics.median(self.node_seconds)

    @property
    def ratio(self) -> float:
        return self.node / self.baseline

    def as_dict(self) -> dict:
        return {**asdict(self), "baseline_median": self.baseline, "node_median": self.node, "ratio": self.ratio}

    def summary(self) -> str:
        mb = self.count * self.size_mb
        fsync = "" if self.node_fsync else ", node WITHOUT fsync (diagnostic)"
        return (f"{self.count} MR slices, {mb:.0f} MB, max PDU {self.max_pdu}{fsync}\n"
                f"  minimal SCP: {self.baseline:6.2f} s  ({', '.join(f'{s:.2f}' for s in self.baseline_seconds)})\n"
                f"  cradle node: {self.node:6.2f} s  ({', '.join(f'{s:.2f}' for s in self.node_seconds)})\n"
                f"  ratio node / minimal SCP: {self.ratio:.2f}  (target <= 1.2); per push: "
                f"{', '.join(f'{n / b:.2f}' for b, n in zip(self.baseline_seconds, self.node_seconds))}\n"
                f"  per instance, wall / receiver CPU (ms):  minimal SCP {self._per_instance(self.baseline_seconds)} / "
                f"{self._per_instance(self.baseline_cpu_seconds)},  node {self._per_instance(self.node_seconds)} / "
                f"{self._per_instance(self.node_cpu_seconds)}")

    def _per_instance(self, seconds: list[float]) -> str:
        return f"{statistics.median(seconds) / self.count * 1000:.1f}" if seconds else "n/a"


# --- the files --------------------------------------------------------------------------------

def make_mr_series(outdir: Path, count: int, size_mb: float, seed: int = 0) -> list[Path]:
    """``count`` MR slices of one neonatal chest series, each about ``size_mb`` MB (16-bit, square)."""
    outdir.mkdir(parents=True, exist_ok=True)
    side = max(16, int((size_mb * 1024 * 1024 / 2) ** 0.5))
    pixels = np.random.default_rng(seed).integers(0, 4096, (side, side), dtype=np.uint16).tobytes()
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for number in range(1, count + 1):
        ds = _mr_slice(study_uid, series_uid, frame_uid, number, count, side, pixels)
        path = outdir / f"mr{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _mr_slice(study_uid: str, series_uid: str, frame_uid: str, number: int, count: int, side: int,
              pixels: bytes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Baby", "BENCH0001", "20260101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20260102"
    ds.StudyTime, ds.AccessionNumber, ds.StudyID = "101010", "BENCHACC1", "1"
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = "MR", "CHEST", "T2 HASTE cor"
    ds.SeriesNumber, ds.InstanceNumber, ds.ImagesInAcquisition = 1, number, count
    ds.ImagePositionPatient = [0, 0, float(number)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels
    return ds


# --- the two receivers ------------------------------------------------------------------------

def serve_baseline(port: int, outdir: Path, max_pdu: int) -> None:
    """The minimal SCP: every storage SOP class, uncompressed syntaxes, write encoded_dataset(), 0x0000."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    def handle_store(event, directory: Path) -> int:  # noqa: ANN001 - pynetdicom Event
        (directory / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title=BASELINE_AE)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = max_pdu
    ae.maximum_associations = 16
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store, [outdir]),
                                           (evt.EVT_C_ECHO, lambda event: 0x0000)])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping:
        time.sleep(0.1)
    server.shutdown()


@contextmanager
def running(command: Sequence[str], port: int, called_ae: str, log_path: Path) -> Iterator[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            wait_until_ready(port, called_ae, process)
            yield process
        finally:
            stop_process(process, grace=30, name="receiver")


def wait_until_ready(port: int, called_ae: str, process: subprocess.Popen) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{called_ae} exited with {process.returncode} before it was ready")
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            return
        time.sleep(0.1)
    raise RuntimeError(f"{called_ae} on port {port} not ready after {READY_TIMEOUT:.0f} s")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far, all threads (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_push(files_dir: Path, port: int, called_ae: str, receiver: subprocess.Popen) -> tuple[float, float | None]:
    """Wall seconds of one push, and the CPU seconds the receiver spent during it."""
    before = cpu_seconds(receiver.pid)
    elapsed = push(files_dir, port, called_ae)
    after = cpu_seconds(receiver.pid)
    return elapsed, (after - before if before is not None and after is not None else None)


def node_config(workdir: Path, port: int, max_pdu: int, fsync: bool = True) -> Path:
    config = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port, "allowed_calling_aets": [CALLING_AE],
                 "max_pdu_size": max_pdu},
        "storage": {"archive_dir": str(workdir / "archive"), "database_url": f"sqlite:///{workdir / 'cradle.db'}",
                    "fsync": fsync},
        "queue": {"broker_url": f"sqla+sqlite:///{workdir / 'broker.db'}"},
        "completion": {"quiet_seconds": 30, "poll_seconds": 1.0},
        "logging": {"level": "INFO"},
        "models_dir": str(workdir / "models"),
    }
    path = workdir / "cradle.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def storescu() -> str:
    """DCMTK's storescu (the virtualenv also has pynetdicom's app of that name)."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "storescu"
        if candidate.is_file() and os.access(candidate, os.X_OK) and _is_dcmtk(candidate):
            return str(candidate)
    raise RuntimeError("DCMTK storescu not found (apt-get install dcmtk)")


def _is_dcmtk(path: Path) -> bool:
    result = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
    return "dcmtk" in (result.stdout + result.stderr).lower()


def push(files_dir: Path, port: int, called_ae: str) -> float:
    command = [storescu(), "-aet", CALLING_AE, "-aec", called_ae, "+sd", "127.0.0.1", str(port), str(files_dir)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- one run ----------------------------------------------------------------------------------

def time_baseline(files_dir: Path, workdir: Path, max_pdu: int) -> tuple[float, float | None]:
    outdir = workdir / "baseline-out"
    outdir.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.ingest", "--serve-baseline", str(port), str(outdir),
               "--pdu", str(max_pdu)]
    try:
        with running(command, port, BASELINE_AE, workdir / "baseline.log") as receiver:
            return timed_push(files_dir, port, BASELINE_AE, receiver)
    finally:
        _discard(outdir)


def time_node(files_dir: Path, workdir: Path, max_pdu: int, expected: int,
              fsync: bool = True) -> tuple[float, float | None]:
    nodedir = workdir / "node"
    nodedir.mkdir()
    port = free_port()
    config = node_config(nodedir, port, max_pdu, fsync)
    command = [sys.executable, "-m", "cradle.cli", "listen", "--config", str(config)]
    try:
        with running(command, port, NODE_AE, workdir / "node.log") as receiver:
            timing = timed_push(files_dir, port, NODE_AE, receiver)
        stored = len(list((nodedir / "archive").rglob("*.dcm")))
        if stored != expected:
            raise RuntimeError(f"the node archived {stored} of {expected} files")
        return timing
    finally:
        _discard(nodedir)


def _discard(directory: Path) -> None:
    """Remove a push's output and flush the page cache (untimed) so the next push starts clean."""
    shutil.rmtree(directory, ignore_errors=True)
    os.sync()


def run(count: int = 300, size_mb: float = 2.0, repeat: int = 5, max_pdu: int = DEFAULT_PDU,
        workdir: Path | None = None, node_fsync: bool = True) -> BenchReport:
    """Generate the files, push them alternately to both receivers ``repeat`` times each, report."""
    with tempfile.TemporaryDirectory(prefix="cradle-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        files_dir = root / "files"
        make_mr_series(files_dir, count, size_mb)
        os.sync()
        report = BenchReport(count, size_mb, max_pdu, node_fsync=node_fsync)
        for round_number in range(repeat):
            order = ("baseline", "node") if round_number % 2 == 0 else ("node", "baseline")
            for which in order:
                if which == "baseline":
                    seconds, cpu = time_baseline(files_dir, root, max_pdu)
                    report.baseline_seconds.append(seconds)
                    if cpu is not None:
                        report.baseline_cpu_seconds.append(cpu)
                else:
                    seconds, cpu = time_node(files_dir, root, max_pdu, count, node_fsync)
                    report.node_seconds.append(seconds)
                    if cpu is not None:
                        report.node_cpu_seconds.append(cpu)
        return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="MR slices (default 300)")
    parser.add_argument("--size-mb", type=float, default=2.0, help="size of one slice (default 2 MB)")
    parser.add_argument("--repeat", type=int, default=5, help="pushes to each receiver (default 5)")
    parser.add_argument("--pdu", type=int, default=DEFAULT_PDU, help="max PDU both receivers accept")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary files go")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-fsync", action="store_true",
                        help="diagnostic: run the node without fsync, to show the disk's share")
    parser.add_argument("--serve-baseline", nargs=2, metavar=("PORT", "OUTDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        serve_baseline(int(args.serve_baseline[0]), Path(args.serve_baseline[1]), args.pdu)
        return 0
    report = run(args.count, args.size_mb, args.repeat, args.pdu, args.workdir, node_fsync=not args.no_fsync)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
