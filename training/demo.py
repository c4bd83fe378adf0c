"""``cradle demo``: the whole node on synthetic studies, end to end, for a newcomer.

Starts ``cradle serve`` on embedded defaults in a work directory, pushes a synthetic training set
(DCMTK ``storescu`` when installed, else pynetdicom), imports its labels, trains small models,
pushes fresh studies, receives the SR/SEG at a local destination SCP, and prints what arrived.
Everything is synthetic and marked so: nothing here is clinical.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

from config.settings import Settings
from training.synth import generate

DEMO_AE = "DEMO-MODALITY"
PACS_AE = "DEMO-PACS"
BANNER = "SYNTHETIC DEMO - NOT FOR CLINICAL USE"

# Small recipes so that four models train in a few minutes on two CPU cores.
TRAIN_SETTINGS: dict[str, list[str]] = {
    "view": ["arch=resnet18", "image_size=128", "epochs=4", "folds=2", "batch_size=16"],
    "bpd": ["arch=resnet18", "image_size=128", "epochs=6", "folds=2", "batch_size=16", "strategy=full",
            "init=random"],
    "pneumonia": ["arch=resnet18", "image_size=128", "epochs=6", "folds=2", "batch_size=16", "strategy=full",
                  "init=random"],
    "lung-seg": ["arch=flexible_unet_resnet18", "image_size=96", "epochs=6", "folds=2", "batch_size=16"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DemoPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "cradle-demo.yaml"

    @property
    def training_set(self) -> Path:
        return self.root / "synthetic-training"

    @property
    def fresh_set(self) -> Path:
        return self.root / "synthetic-fresh"

    @property
    def received(self) -> Path:
        return self.root / "received-at-pacs"


def write_config(paths: DemoPaths, node_port: int, pacs_port: int) -> None:
    node_dir = paths.root / "node"
    config = {
        "node": {"ae_title": "CRADLE", "host": "127.0.0.1", "port": node_port,
                 "allowed_calling_aets": [DEMO_AE]},
        "storage": {"archive_dir": str(node_dir / "archive"),
                    "database_url": f"sqlite:///{node_dir / 'cradle.db'}"},
        "queue": {"broker_url": f"sqla+sqlite:///{node_dir / 'broker.db'}"},
        "completion": {"quiet_seconds": 3, "poll_seconds": 0.5},
        "destinations": [{"name": "demo-pacs", "ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs_port}],
        "dispatch": {"max_attempts": 3, "backoff_seconds": 1},
        "models_dir": str(node_dir / "models"),
    }
    paths.config.write_text(f"# {BANNER}\n" + yaml.safe_dump(config, sort_keys=False))


@dataclass
class Pacs:
    """A destination SCP that keeps what it receives (the radiologist's PACS, for the demo)."""

    folder: Path
    port: int
    received: list[Path] = field(default_factory=list)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=PACS_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        path = self.folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        self.received.append(path)
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def cradle(config: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "node.cli", *args, "--config", str(config)]
    return subprocess.run(command, check=True, text=True, capture_output=capture)


def push(folder: Path, port: int) -> int:
    """Send every DICOM file under ``folder`` to the node; return how many were accepted."""
    files = sorted(p for p in folder.rglob("*.dcm"))
    if shutil.which("storescu"):
        subprocess.run(["storescu", "-R", "-aet", DEMO_AE, "-aec", "CRADLE", "-nh", "127.0.0.1", str(port),
                        *map(str, files)], check=True)
        return len(files)
    ae = AE(ae_title=DEMO_AE)
    ae.requested_contexts = AllStoragePresentationContexts[:128]
    association = ae.associate("127.0.0.1", port, ae_title="CRADLE")
    accepted = 0
    try:
        for path in files:
            status = association.send_c_store(dcmread(path))
            accepted += int(getattr(status, "Status", 0xFFFF) == 0)
    finally:
        association.release()
    return accepted


def wait_for_node(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ae = AE(ae_title=DEMO_AE)
        ae.add_requested_context("1.2.840.10008.1.1")
        association = ae.associate("127.0.0.1", port, ae_title="CRADLE")
        if association.is_established:
            association.send_c_echo()
            association.release()
            return
        time.sleep(0.5)
    raise TimeoutError("the node did not answer C-ECHO")


def wait_for_results(pacs: Pacs, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(pacs.received) < expected and time.monotonic() < deadline:
        time.sleep(0.5)


def train_models(config: Path) -> dict[str, dict]:
    summaries = {}
    for task, overrides in TRAIN_SETTINGS.items():
        sets = [arg for item in overrides for arg in ("--set", item)]
        started = time.monotonic()
        result = cradle(config, "train", task, *sets, "--json", capture=True)
        summary = json.loads(result.stdout)
        summary["seconds"] = round(time.monotonic() - started, 1)
        summaries[task] = summary
        print(f"  trained {task}: {summary['version']} {_score(summary['metrics'])}, "
              f"{'promoted' if summary['promoted'] else 'not promoted'} ({summary['seconds']} s)")
    return summaries


def _score(metrics: dict) -> str:
    if "dice_mean" in metrics:
        return f"Dice {metrics['dice_mean']:.3f}"
    return f"AUROC {metrics.get('auroc_mean', float('nan')):.3f}"


def describe_results(paths: DemoPaths, received: list[Path]) -> list[str]:
    """One line per received object: SR values, SEG volumes against the phantom's truth."""
    from training.demo_report import describe, overlay_png

    truth = json.loads((paths.fresh_set / "truth.json").read_text())
    datasets = [dcmread(p) for p in received]
    lines = [describe(ds, truth) for ds in datasets]
    segs = [ds for ds in datasets if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"]
    if segs:
        png = overlay_png(segs[0], paths.fresh_set, paths.root / "mr-slice-with-seg.png")
        lines.append(f"overlay of one MR slice with the SEG: {png}")
    return lines


def run(args: argparse.Namespace, settings: Settings) -> int:  # noqa: ARG001 - the demo makes its own config
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    paths = DemoPaths(Path(getattr(args, "workdir", None) or "var/demo").resolve())
    if paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True)
    node_port, pacs_port = free_port(), free_port()
    write_config(paths, node_port, pacs_port)
    print(f"{BANNER}\nwork directory: {paths.root}")
    pacs = Pacs(paths.received, pacs_port)
    pacs.start()
    node = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(paths.config)],
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=open(paths.root / "node.log", "w"))
    started = time.monotonic()
    try:
        wait_for_node(node_port)
        print("1. generating a synthetic training set and pushing it over C-STORE")
        generate(paths.training_set, n_cxr=120, n_mri=8, seed=11, cxr_size=512, mri_shape=(24, 96, 96))
        print(f"   pushed {push(paths.training_set, node_port)} instances")
        print("2. importing labels")
        cradle(paths.config, "labels", "import", str(paths.training_set / "labels.csv"))
        print("3. training small models (cradle train …)")
        trained = train_models(paths.config)
        print("4. pushing fresh studies; waiting for SR and SEG at the demo PACS")
        generate(paths.fresh_set, n_cxr=3, n_mri=1, seed=12, cxr_size=512, mri_shape=(24, 96, 96),
                 adult_share=0.0, non_chest_share=0.0)
        shutil.rmtree(paths.fresh_set / "seg")  # the reviewer's masks stay with the demo's truth
        pushed = push(paths.fresh_set, node_port)
        expected = 3 + 2  # one SR per radiograph; SEG + SR for the MR series
        wait_for_results(pacs, expected, timeout=180)
        print(f"   pushed {pushed} instances; the PACS received {len(pacs.received)} result objects")
        for line in describe_results(paths, list(pacs.received)):
            print(f"   {line}")
        status = cradle(paths.config, "status", "--json", capture=True).stdout
        (paths.root / "summary.json").write_text(json.dumps(
            {"trained": trained, "received": [p.name for p in pacs.received], "status": json.loads(status)},
            indent=2, default=str))
        print(f"done in {time.monotonic() - started:.0f} s. {BANNER}")
        return 0 if len(pacs.received) >= expected else 1
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()
        pacs.stop()
