"""Child processes: stopped the way every cradle process expects to be stopped."""

from __future__ import annotations

import logging
import signal
import subprocess
from collections.abc import Mapping

log = logging.getLogger(__name__)


def stop_processes(processes: Mapping[str, subprocess.Popen], grace: float) -> dict[str, int]:
    """SIGTERM to every one still running, then up to ``grace`` seconds each for a clean exit, then
    SIGKILL; their exit codes by name."""
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes = {}
    for name, process in processes.items():
        try:
            codes[name] = process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in %.0f s; killing it", name, process.pid, grace)
            process.kill()
            codes[name] = process.wait()
    return codes


def stop_process(process: subprocess.Popen, grace: float, name: str = "child") -> int:
    """:func:`stop_processes` for one process."""
    return stop_processes({name: process}, grace)[name]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB; Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
