"""End-to-end latency: last instance received → the destination's acknowledgement of the last result,
against the sum of the bare model forward times of the same architectures and inputs, in one run.

    python -m benchmarks.latency [--slices 60] [--size 256] [--repeat 2] [--json]

Starts ``cradle serve`` (embedded defaults) with imported test weights and a destination SCP, pushes a
neonatal CR and a chest MR series with DCMTK ``storescu``, then a second MR series after promoting the
3D lung U-Net (``dynunet3d_small``, sliding window) in place of the 2D one, and prints latency,
forward sum and the overhead (targets: ≤ 1.5 s for a CR, ≤ 3 s for a 60-slice MR series, 2D or 3D),
the 3D model's time beside the 2D model's.

The clock starts when the node received the series' last instance (its index row, committed just
before the node answers the C-STORE; ``storescu`` exits a little later, after the association's
release) and stops when the destination SCP acknowledged the job's last result. In between, per
round, the job's own timestamps split the time into: completion (last instance → series complete:
the expected count, not the quiet period), routing (→ job row), queue (→ a worker claims the job),
run (→ results archived; the pipeline's own stages from the job's summary, the rest being reading
the series and archiving the results) and dispatch (→ the destination's acknowledgement).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import func, select

from inference.models import create_model
from storage.db import create_db_engine, session_factory
from storage.models import Instance, Job, Series
from training.synth import generate

TEST_MODELS = {  # task: (arch, outputs, image size) — small, as in the test suite
    "view": ("resnet18", 7, 128), "bpd": ("resnet18", 1, 128), "pneumonia": ("resnet18", 3, 128),
    "fracture": ("resnet18", 1, 128), "bone-age": ("resnet18", 1, 128), "lung-seg": ("flexible_unet_resnet18", 1, 64),
}
LUNG_3D = ("dynunet3d_small", 64, "16,64,64")  # arch, image size, sliding-window patch: as in the tests
TARGETS = {"cr": 1.5, "mr": 3.0, "mr3d": 3.0}
DESTINATION_AE = "BENCH-PACS"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cradle(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cradle.cli", *args, "--config", str(config)],
                          check=True, capture_output=True, text=True)


def import_test_weights(config: Path, folder: Path, *, lung_3d: bool = False) -> str | None:
    """Random but registered weights, activated by the admin's explicit act (``--activate``); with
    ``lung_3d`` a 3D lung-seg version first (validated the same way, then replaced by the 2D one as
    active), whose version is returned."""
    torch.manual_seed(0)
    version = None
    if lung_3d:
        arch, size, patch = LUNG_3D
        weights = folder / "lung-seg-3d.pt"
        torch.save(create_model(arch, "lung-seg").state_dict(), weights)
        output = cradle(config, "models", "import", "lung-seg", str(weights), "--arch", arch, "--activate",
                        "--image-size", str(size), "--patch", patch).stdout
        version = output.split()[1]  # "registered lung-seg-1 (...)"
    for task, (arch, outputs, size) in TEST_MODELS.items():
        weights = folder / f"{task}.pt"
        torch.save(create_model(arch, task, num_classes=outputs).state_dict(), weights)
        cradle(config, "models", "import", task, str(weights), "--arch", arch, "--activate",
               "--image-size", str(size))
    return version


def write_config(folder: Path, node_port: int, pacs_port: int, *, quiet_seconds: float = 30,
                 destination_ae: str = DESTINATION_AE, models_dir: Path | None = None) -> Path:
    """``folder/cradle.yaml``: a whole node in ``folder`` (SQLite index and broker) accepting MODALITY and
    sending to one destination on ``pacs_port``; tests of the real path use it too."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "cradle.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"port": node_port, "allowed_calling_aets": ["MODALITY"]},
        "storage": {"archive_dir": str(folder / "archive"), "database_url": f"sqlite:///{folder / 'c.db'}"},
        "queue": {"broker_url": f"sqla+sqlite:///{folder / 'broker.db'}"},
        "completion": {"quiet_seconds": quiet_seconds, "poll_seconds": 0.2},
        "destinations": [{"name": "pacs", "ae_title": destination_ae, "host": "127.0.0.1", "port": pacs_port}],
        "models_dir": str(models_dir or folder / "models"),
    }))
    return config


@torch.inference_mode()
def bare_sliding_window_seconds(slices: int, repeat: int = 3) -> float:
    """The 3D network's sliding window over a letterboxed series, as the pipeline runs it."""
    from inference.pipelines.lung_mri import SLIDING_WINDOW_BATCH, SLIDING_WINDOW_OVERLAP
    from monai.inferers import sliding_window_inference

    arch, size, patch = LUNG_3D
    model = create_model(arch, "lung-seg").eval()
    x = torch.randn(1, 1, slices, size, size)
    roi = tuple(int(v) for v in patch.split(","))
    times = []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        sliding_window_inference(x, roi, SLIDING_WINDOW_BATCH, model, overlap=SLIDING_WINDOW_OVERLAP, mode="gaussian")
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:]))


@torch.inference_mode()
def bare_forward_seconds(task: str, batch: int, repeat: int = 3) -> float:
    arch, outputs, size = TEST_MODELS[task]
    model = create_model(arch, task, num_classes=outputs).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, size, size).to(memory_format=torch.channels_last)
    model(x)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


class Destination:
    """A destination SCP (the PACS) that writes what it receives and notes when it acknowledged each
    result (wall clock, to compare with the node's timestamps)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.acknowledged: dict[str, float] = {}  # SOP Instance UID → time.time()
        self._lock = threading.Lock()

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=DESTINATION_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        (self.folder / f"{uid}.dcm").write_bytes(event.encoded_dataset())
        with self._lock:
            self.acknowledged[uid] = time.time()
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def push(storescu: str, port: int, files: list[Path]) -> float:
    """Send ``files``; return the wall time ``storescu`` exited (after the last acknowledgement)."""
    subprocess.run([storescu, "-aet", "MODALITY", "-aec", "CRADLE", "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True)
    return time.time()


def _epoch(value: dt.datetime | None) -> float | None:
    """The index's naive UTC timestamps as seconds since the epoch."""
    return None if value is None else value.replace(tzinfo=dt.timezone.utc).timestamp()


@dataclass
class Round:
    """One series through the node, in seconds."""

    kind: str
    latency: float                 # last instance received → the destination acknowledged the last result
    push_tail: float               # last instance received → storescu exited (not counted)
    stages: dict[str, float]       # completion, routing, queue, run, dispatch: they add up to latency
    pipeline: dict[str, float] = field(default_factory=dict)  # the run's pipeline stages (lung-mri)
    forward_in_pipeline: float = 0.0
    results: int = 0


def wait_job(sessions, series_uid: str, destination: Destination, exited: float,  # noqa: ANN001
             timeout: float = 300) -> Round:
    """Wait until every result of the series' job reached the destination; read the job's timings."""
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            series = session.scalar(select(Series).where(Series.series_uid == series_uid))
            job = session.scalar(select(Job).where(Job.series_pk == series.id)) if series else None
            if job is not None and job.state.value == "done" and job.result:
                uids = [item["sop_uid"] for item in job.result["instances"]]
                if uids and all(uid in destination.acknowledged for uid in uids):
                    received = session.scalar(select(func.max(Instance.received_at))
                                              .where(Instance.series_pk == series.id))
                    return _round(series, job, received, [destination.acknowledged[u] for u in uids], exited)
            if job is not None and job.state.value in ("failed", "skipped"):
                raise RuntimeError(f"job {job.id} {job.state.value}: {job.error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete result for series {series_uid}")
        time.sleep(0.1)  # the destination notes its acknowledgements itself: polling slowly costs no accuracy


def _round(series: Series, job: Job, received: dt.datetime, acknowledged: list[float], exited: float) -> Round:
    marks = [_epoch(received), _epoch(series.completed_at), _epoch(job.created_at), _epoch(job.started_at),
             _epoch(job.finished_at), max(acknowledged)]
    names = ["completion", "routing", "queue", "run", "dispatch"]
    stages = {name: round(b - a, 3) for name, a, b in zip(names, marks, marks[1:])}
    summary = (job.result or {}).get("summary") or {}
    forward = sum((summary.get("forward_seconds") or {}).values())
    return Round(kind=job.pipeline, latency=round(marks[-1] - marks[0], 3),
                 push_tail=round(exited - marks[0], 3), stages=stages,
                 pipeline=dict(summary.get("stage_seconds") or {}), forward_in_pipeline=round(forward, 3),
                 results=len(acknowledged))


def measure(slices: int, repeat: int, folder: Path, size: int = 256) -> dict[str, object]:
    storescu = shutil.which("storescu", path="/usr/bin") or "storescu"
    node_port, pacs_port = free_port(), free_port()
    config = write_config(folder, node_port, pacs_port)
    lung_3d = import_test_weights(config, folder, lung_3d=True)
    lung_2d = json.loads(cradle(config, "models", "list", "--json").stdout)
    destination = Destination(folder / "pacs", pacs_port)
    destination.start()
    node = subprocess.Popen([sys.executable, "-m", "cradle.cli", "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sessions = session_factory(create_db_engine(f"sqlite:///{folder / 'c.db'}"))
    lung_2d = _active(lung_2d, "lung-seg")
    rounds: dict[str, list[Round]] = {"cr": [], "mr": [], "mr3d": []}
    try:
        for _ in range(60):
            if subprocess.run([shutil.which("echoscu", path="/usr/bin") or "echoscu", "-aet", "MODALITY",
                               "-aec", "CRADLE", "127.0.0.1", str(node_port)], capture_output=True).returncode == 0:
                break
            time.sleep(1)
        time.sleep(15)  # the worker loads torch and the pipelines once at start
        for round_ in range(repeat + 1):  # the first round warms the models up and is not counted
            summary = generate(folder / f"synth-{round_}", n_cxr=1, n_mri=2, seed=100 + round_, cxr_size=1024,
                               mri_shape=(slices, size, size), adult_share=0.0, non_chest_share=0.0)
            for kind, files in (("cr", list(summary.cxr_paths)),
                                ("mr", sorted(summary.mri_series_dirs[0].glob("*.dcm"))),
                                ("mr3d", sorted(summary.mri_series_dirs[1].glob("*.dcm")))):
                if kind.startswith("mr"):  # the worker reloads the model when the active version changes
                    cradle(config, "models", "promote", "lung-seg", lung_3d if kind == "mr3d" else lung_2d)
                series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                result = wait_job(sessions, series_uid, destination, push(storescu, node_port, files))
                if round_:
                    rounds[kind].append(result)
    finally:
        node.terminate()
        node.wait(timeout=90)
        destination.stop()
    forwards = {"cr": sum(bare_forward_seconds(t, 1) for t in ("view", "bpd")),  # what runs on a day-1 film
                "mr": bare_forward_seconds("lung-seg", slices), "mr3d": bare_sliding_window_seconds(slices)}
    return {"slices": slices, "size": size, "forward": forwards,
            "rounds": {k: [asdict(r) for r in v] for k, v in rounds.items()}}


def _active(listing: dict[str, dict], task: str) -> str:
    """The active version of ``task`` in ``cradle models list --json``."""
    return listing[task]["active"]


def report(result: dict[str, object]) -> list[str]:
    lines = []
    shape = f"{result['slices']} slices, {result.get('size', 128)} px"
    names = {"cr": "CR", "mr": f"MR 2D U-Net ({shape})", "mr3d": f"MR 3D U-Net ({shape})"}
    for kind in [k for k in ("cr", "mr", "mr3d") if result["rounds"].get(k)]:
        rounds = result["rounds"][kind]
        forward = result["forward"][kind]
        for number, r in enumerate(rounds, start=1):
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
            line = (f"  {names[kind]} round {number}: latency {r['latency']:.2f} s = {stages}; "
                    f"forward in the pipeline {r['forward_in_pipeline']:.2f} s")
            if r["pipeline"]:
                inside = sum(r["pipeline"].values())
                line += (" | run: " + ", ".join(f"{k} {v:.2f}" for k, v in r["pipeline"].items())
                         + f", read series + archive results {r['stages']['run'] - inside:.2f}")
            lines.append(line + f" | storescu exited {r['push_tail']:.2f} s after the last receipt")
        latency = statistics.median(r["latency"] for r in rounds)
        own = statistics.median(r["latency"] - r["forward_in_pipeline"] for r in rounds)
        lines.append(f"{names[kind]}: latency {latency:.2f} s (median of {len(rounds)}), model forward"
                     f"{'s' if kind == 'cr' else ''} {forward:.2f} s, overhead {latency - forward:.2f} s "
                     f"(target <= {TARGETS[kind]:g} s); latency less each round's own forward time: {own:.2f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--size", type=int, default=256, help="MR rows and columns")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="cradle-latency-") as folder:
        result = measure(args.slices, args.repeat, Path(folder), args.size)
    lines = report(result)
    if result["rounds"]["mr"] and result["rounds"]["mr3d"]:
        two, three = (statistics.median(r["latency"] for r in result["rounds"][k]) for k in ("mr", "mr3d"))
        lines.append(f"MR 3D / 2D latency: {three:.2f} s / {two:.2f} s = {three / two:.2f}")
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
