"""Small stand-in pipelines and test data for the queue and dispatch tests (not clinical).

``test-copy`` turns a series into one tiny Secondary Capture with UIDs derived from the source
series (so a re-run replaces, like the real writers); ``test-nomodel`` raises NoActiveModel.
Behaviour is steered by environment variables so a worker subprocess can be told to be slow
(``CRADLE_TEST_SLEEP`` seconds, or the number in the file ``CRADLE_TEST_SLEEP_FILE`` when it
exists, read at each run), to busy the CPU (``CRADLE_TEST_CPU`` seconds) and to leave one marker
file per run (``CRADLE_TEST_RUNS_DIR``).

A worker subprocess registers them with :func:`register` before running ``cradle worker``
(see :func:`worker_command`); in-process tests hand :class:`FakeHost` to the JobRunner instead.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from config.settings import Settings
from inference.uids import result_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
MODEL_VERSION = "test-1"
TESTS_DIR = Path(__file__).resolve().parent


def make_cr(study_uid: str | None = None, series_uid: str | None = None) -> Dataset:
    """A small synthetic neonatal chest CR (fake patient)."""
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Test^Baby"
    ds.PatientID = "CRADLE-QUEUE-1"
    ds.PatientBirthDate = "20240301"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240302", "081500", "ACC-Q1"
    ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CR", "CHEST", 1, 1
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16).tobytes()
    _file_meta(ds)
    return ds


def _file_meta(ds: Dataset) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def secondary_capture(source: Dataset, pipeline: str, model_version: str = MODEL_VERSION,
                      value: int = 0) -> Dataset:
    """A tiny SC result for ``source``'s series with deterministic UIDs."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = result_uid(source.SeriesInstanceUID, pipeline, model_version, "sc-instance")
    ds.SeriesInstanceUID = result_uid(source.SeriesInstanceUID, pipeline, model_version, "sc-series")
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyDate", "StudyTime", "AccessionNumber"):
        setattr(ds, keyword, source.get(keyword, ""))
    ds.Modality, ds.ConversionType, ds.SeriesNumber, ds.InstanceNumber = "OT", "WSD", 9901, 1
    ds.SeriesDescription = "cradle test result"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes([value % 256]) * 64
    _file_meta(ds)
    return ds


def _output(model_version: str, datasets: list[Dataset], summary: dict[str, Any]) -> Any:
    from inference.pipelines import PipelineOutput

    return PipelineOutput(model_version=model_version, datasets=datasets, summary=summary)


def sleep_seconds() -> float:
    path = os.environ.get("CRADLE_TEST_SLEEP_FILE")
    if path and Path(path).is_file():
        return float(Path(path).read_text())
    return float(os.environ.get("CRADLE_TEST_SLEEP", "0"))


def note_run(sources: list[Dataset] | None = None) -> None:
    """One marker file per run: ``<pid>-<source series UID>-<random>`` (the series when known)."""
    runs = os.environ.get("CRADLE_TEST_RUNS_DIR")
    if runs:
        Path(runs).mkdir(parents=True, exist_ok=True)
        series = str(sources[0].SeriesInstanceUID) if sources else "unknown"
        (Path(runs) / f"{os.getpid()}-{series}-{uuid.uuid4().hex}").touch()


def spin(seconds: float) -> None:
    """Busy the CPU (one core, holding the GIL) for ``seconds``: a stand-in for a model on a CPU."""
    deadline = time.process_time() + seconds
    while time.process_time() < deadline:
        sum(i * i for i in range(2000))


class CopyPipeline:
    name = "test-copy"
    tasks: tuple[str, ...] = ()

    def run(self, sources: list[Dataset], context: Any) -> Any:
        note_run(sources)
        time.sleep(sleep_seconds())
        spin(float(os.environ.get("CRADLE_TEST_CPU", "0")))
        result = secondary_capture(sources[0], self.name, value=len(sources))
        return _output(MODEL_VERSION, [result], {"sources": len(sources), "probability": np.float32(0.25)})


class NoModelPipeline:
    name = "test-nomodel"
    tasks = ("bpd",)

    def run(self, sources: list[Dataset], context: Any) -> Any:
        from inference.pipelines import NoActiveModel

        raise NoActiveModel("bpd")


FAKE_PIPELINES = {"test-copy": "fake_pipelines:CopyPipeline", "test-nomodel": "fake_pipelines:NoModelPipeline"}


def register() -> None:
    """Add the fake pipelines to the registry of *this* process (a worker subprocess).

    With ``CRADLE_TEST_LIGHT_HOST=1`` the worker also gets a light pipeline host running only the fake
    pipelines (the real host imports torch, ~5-10 s per worker start); the rest of ``cradle worker``
    (Celery, leases, reconciler, archive, index) is the real one."""
    from inference import pipelines

    pipelines.PIPELINES.update(FAKE_PIPELINES)
    if os.environ.get("CRADLE_TEST_LIGHT_HOST") == "1":
        from inference import worker

        worker._default_pipeline_host = lambda _settings: FakeHost(_run_by_name)


def _run_by_name(pipeline: str, sources: list[Dataset]) -> Any:
    classes = {"test-copy": CopyPipeline, "test-nomodel": NoModelPipeline}
    if pipeline not in classes:
        from inference.worker import UnknownPipeline

        raise UnknownPipeline(pipeline)
    return classes[pipeline]().run(sources, None)


class FakeHost:
    """A PipelineHost for in-process runners: no torch, behaviour given by a callable."""

    def __init__(self, run: Any = None) -> None:
        self._run = run or (lambda pipeline, sources: CopyPipeline().run(sources, None))

    def run(self, pipeline: str, sources: list[Dataset], shadow: str = "") -> Any:
        return self._run(pipeline, sources)

    def shadow_versions(self, pipeline: str) -> list[str]:
        return []

    def is_no_active_model(self, exc: BaseException) -> bool:
        from inference.pipelines import NoActiveModel

        return isinstance(exc, NoActiveModel)

    def is_permanent(self, exc: BaseException) -> bool:
        from inference.pipelines import PipelineInputError

        return isinstance(exc, PipelineInputError)


def write_config(settings: Settings, path: Path) -> Path:
    """The resolved settings as a YAML file a subprocess can load with ``--config``."""
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path


def worker_command(config: Path) -> list[str]:
    """``cradle worker --config CONFIG`` with the fake pipelines registered first."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import fake_pipelines; "
            f"fake_pipelines.register(); from cradle.cli import main; "
            f"sys.exit(main(['worker', '--config', {str(config)!r}]))")
    return [sys.executable, "-c", code]
