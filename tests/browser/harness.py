"""Browser-test harness: Orthanc serving DICOMweb and the prebuilt OHIF viewer on one origin.

One Orthanc process (Debian's ``orthanc`` with its DICOMweb and ServeFolders plugins)
listens on a free loopback port with a generated configuration:

- ``/dicom-web/``  the DICOMweb API (QIDO-RS, WADO-RS) OHIF reads the study from;
- ``/ohif/``       OHIF's prebuilt ``dist/`` (npm ``@ohif/app``), served by ServeFolders.

Serving OHIF from a sub-path needs a few rewrites, because the published ``dist/`` is
built for the site root: ``index.html`` sets ``window.PUBLIC_URL="/"`` and links every
asset absolutely (``/app.bundle....js``), and the main bundle and its worker bundles
hard-code webpack's public path (``__webpack_require__.p = "/"``), from which chunks,
workers and WASM codecs are fetched. :func:`prepare_ohif_site` builds a folder of
symlinks to ``dist/`` plus rewritten copies of those files, of the CSS that loads fonts
from ``/`` and of ``manifest.json`` (and of ``app-config.js``,
generated with ``routerBasename: "/ohif"`` and the DICOMweb data source), and checks
that each rewrite matched exactly where expected, so an upgraded OHIF fails loudly here
rather than with a blank page. ServeFolders serves files only (no single-page-app
fallback), so the ``viewer`` route is a copy of ``index.html`` with no extension,
served as ``text/html`` through ServeFolders' ``Extensions`` setting.

The browser side lives in ``ohif_check.mjs`` (playwright-core driving Debian's
Chromium); :func:`run_ohif_check` runs it and returns its JSON summary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
NODE_MODULES = HERE / "node_modules"
OHIF_DIST = NODE_MODULES / "@ohif" / "app" / "dist"
PLAYWRIGHT_CORE = NODE_MODULES / "playwright-core"
CHECK_SCRIPT = HERE / "ohif_check.mjs"
ORTHANC_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
OHIF_BASE = "/ohif/"
#: The routes of OHIF's default mode ("longitudinal") that the test opens.
OHIF_ROUTES = ("viewer",)
_PUBLIC_PATH_RE = re.compile(r'__webpack_require__\.p = "/";')


class HarnessError(RuntimeError):
    """The harness could not bring up Orthanc or OHIF, or the browser run failed."""


# --------------------------------------------------------------------------
# Prerequisites
# --------------------------------------------------------------------------


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None
    )


def orthanc_plugin(name: str) -> Path | None:
    """Path of an Orthanc plugin shared library, e.g. ``OrthancDicomWeb``."""
    for folder in ORTHANC_PLUGIN_DIRS:
        for candidate in sorted(folder.glob(f"lib{name}.so*")):
            if candidate.is_file():
                return candidate
    return None


def chromium_binary() -> str | None:
    override = os.environ.get("CRADLE_CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in CHROMIUM_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


def missing_prerequisites() -> list[str]:
    """What is missing to run the browser test, each with how to get it (empty: all there)."""
    missing = []
    setup = "run tests/browser/setup.sh"
    if orthanc_binary() is None:
        missing.append(f"Orthanc ({setup}: apt-get install orthanc)")
    for plugin, package in (("OrthancDicomWeb", "orthanc-dicomweb"), ("ServeFolders", "orthanc")):
        if orthanc_plugin(plugin) is None:
            missing.append(f"Orthanc plugin {plugin} ({setup}: apt-get install {package})")
    if chromium_binary() is None:
        missing.append(f"Chromium ({setup}: apt-get install chromium)")
    if shutil.which("node") is None:
        missing.append("Node.js (node)")
    if not (OHIF_DIST / "index.html").is_file():
        missing.append(f"OHIF viewer dist ({setup}: npm ci in tests/browser)")
    if not (PLAYWRIGHT_CORE / "package.json").is_file():
        missing.append(f"playwright-core ({setup}: npm ci in tests/browser)")
    return missing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------
# OHIF served from a sub-path
# --------------------------------------------------------------------------


def ohif_version() -> str:
    return json.loads((OHIF_DIST.parent / "package.json").read_text())["version"]


def app_config(origin: str, base: str = OHIF_BASE) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, the Orthanc on ``origin``.

    ``origin`` is e.g. ``http://127.0.0.1:8042``. No dialogs a test would have to
    dismiss (investigational-use banner, CPU-rendering warning, cross-origin warning).
    """
    dicomweb = f"{origin}/dicom-web"
    config = {
        "routerBasename": base.rstrip("/") or "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "cradle test Orthanc",
                    "name": "orthanc",
                    "wadoUriRoot": f"{origin}/wado",
                    "qidoRoot": dicomweb,
                    "wadoRoot": dicomweb,
                    "qidoSupportsIncludeField": False,
                    "supportsReject": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    return (
        "/** Generated by cradle's browser-test harness (tests/browser/harness.py). */\n"
        f"window.config = {json.dumps(config, indent=2)};\n"
    )


def _rewrite_index(html: str, base: str) -> str:
    rewritten, n_public = re.subn(
        r'window\.PUBLIC_URL="/"', f"window.PUBLIC_URL={json.dumps(base)}", html
    )
    if n_public < 1:
        raise HarnessError("OHIF index.html: window.PUBLIC_URL=\"/\" not found")
    # Absolute asset links (href="/x", src="/x") -> under base; leave "//host" alone.
    rewritten, n_links = re.subn(r'(href|src)="/(?!/)', rf'\1="{base}', rewritten)
    if n_links < 3:
        raise HarnessError(f"OHIF index.html: expected absolute asset links, found {n_links}")
    return rewritten


def prepare_ohif_site(dest: Path, origin: str, base: str = OHIF_BASE) -> Path:
    """Build the folder ServeFolders serves at ``base``; returns it.

    ``dest`` must not contain a dot anywhere in its path: ServeFolders takes a file's
    MIME type from the last dot of its full path, and the extension-less ``viewer``
    route relies on the empty extension.
    """
    if "." in str(dest):
        raise HarnessError(f"{dest}: the served folder's path must contain no dot")
    if not base.startswith("/") or not base.endswith("/"):
        raise HarnessError(f"base must start and end with '/', got {base!r}")
    dest.mkdir(parents=True, exist_ok=False)
    generated = {"index.html", "app-config.js"}
    patched = 0
    for entry in sorted(OHIF_DIST.iterdir()):
        if entry.name in generated:
            continue
        target = dest / entry.name
        if entry.is_file() and entry.suffix in (".css", ".json") and entry.name != "serve.json":
            text = entry.read_text(encoding="utf-8")
            # url(/font.woff2) in CSS, "src": "/assets/..." in manifest.json
            rewritten = re.sub(r'(url\(|"src": ?")/(?!/)', rf"\1{base}", text)
            if rewritten != text:
                target.write_text(rewritten, encoding="utf-8")
                continue
        if entry.is_file() and entry.suffix == ".js":
            text = entry.read_text(encoding="utf-8", errors="surrogateescape")
            if _PUBLIC_PATH_RE.search(text):
                text, n = _PUBLIC_PATH_RE.subn(
                    f"__webpack_require__.p = {json.dumps(base)};", text
                )
                target.write_text(text, encoding="utf-8", errors="surrogateescape")
                patched += n
                continue
        target.symlink_to(entry)
    if patched < 2:  # the app bundle and at least one worker bundle
        raise HarnessError(
            f"OHIF {ohif_version()}: webpack public path found in {patched} bundle(s); "
            "the dist layout changed, update harness.prepare_ohif_site"
        )
    index = _rewrite_index((OHIF_DIST / "index.html").read_text(encoding="utf-8"), base)
    (dest / "index.html").write_text(index, encoding="utf-8")
    for route in OHIF_ROUTES:
        (dest / route).write_text(index, encoding="utf-8")
    (dest / "app-config.js").write_text(app_config(origin, base), encoding="utf-8")
    return dest


# --------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------


@dataclass
class Orthanc:
    """An Orthanc on a free loopback port, storage and config under ``workdir``.

    Use as a context manager. ``base_url`` is e.g. ``http://127.0.0.1:41234``.
    """

    workdir: Path
    serve_ohif: bool = True
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _ohif_dir: Path | None = field(default=None, init=False, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ohif_dir(self) -> Path:
        """The served OHIF folder: under ``workdir``, or a fresh dot-free folder if
        ``workdir``'s path has a dot (see :func:`prepare_ohif_site`)."""
        if self._ohif_dir is None:
            if "." not in str(self.workdir):
                self._ohif_dir = self.workdir / "ohif"
            else:
                for parent in (tempfile.gettempdir(), "/tmp", "/dev/shm"):
                    if "." not in parent and os.path.isdir(parent):
                        fresh = tempfile.mkdtemp(prefix="cradle_ohif_", dir=parent)
                        self._ohif_dir = Path(fresh) / "ohif"
                        break
                else:
                    raise HarnessError("no folder without a dot in its path to serve OHIF from")
        return self._ohif_dir

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def config(self) -> dict:
        plugins = [str(orthanc_plugin("OrthancDicomWeb"))]
        config = {
            "Name": "cradle-browser-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,  # loopback clients only
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,  # uploads go through the REST API
            "HttpCompressionEnabled": False,
            "SyncStorageArea": False,
            "Plugins": plugins,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        if self.serve_ohif:
            plugins.append(str(orthanc_plugin("ServeFolders")))
            config["ServeFolders"] = {
                "Folders": {OHIF_BASE.rstrip("/"): str(self.ohif_dir)},
                "AllowCache": True,
                "GenerateETag": True,
                # The extension-less SPA route files ("viewer") are HTML.
                "Extensions": {"": "text/html", "mjs": "application/javascript"},
            }
        return config

    def start(self, timeout: float = 30.0) -> Orthanc:
        binary = orthanc_binary()
        if binary is None:
            raise HarnessError("Orthanc is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.serve_ohif:
            prepare_ohif_site(self.ohif_dir, self.base_url)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [binary, str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(
                    f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                self.get_json("/system")
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise HarnessError(f"Orthanc did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=5)
            self.process = None
        if self._ohif_dir is not None and self.workdir not in self._ohif_dir.parents:
            shutil.rmtree(self._ohif_dir.parent, ignore_errors=True)  # the dot-free fallback

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---- REST -----------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None, timeout: float = 30.0) -> bytes:
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str):
        return json.loads(self.request("GET", path, timeout=5.0))

    def upload(self, paths: Iterable[Path]) -> list[dict]:
        """POST each DICOM file to ``/instances``; raises unless each is stored."""
        answers = []
        for path in paths:
            try:
                answer = json.loads(
                    self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")
                )
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                raise HarnessError(f"Orthanc rejected {path}: HTTP {exc.code} {detail}") from exc
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise HarnessError(f"Orthanc did not store {path}: {answer}")
            answers.append(answer)
        return answers


# --------------------------------------------------------------------------
# The browser run
# --------------------------------------------------------------------------


def run_ohif_check(
    spec: dict,
    *,
    timeout: float = 150.0,
    log_path: Path | None = None,
) -> dict:
    """Run ``ohif_check.mjs`` with ``spec`` (see that script) and return its JSON summary.

    The script prints progress on stderr (kept in ``log_path`` if given) and one JSON
    object as the last line of stdout. A run that produced no summary raises.
    """
    chromium = chromium_binary()
    if chromium is None:
        raise HarnessError("Chromium is not installed")
    spec = {"chromium": chromium, **spec}
    env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
    try:
        proc = subprocess.run(
            ["node", str(CHECK_SCRIPT)],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr or ""
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        if log_path is not None:
            log_path.write_text(stderr)
        raise HarnessError(
            f"ohif_check.mjs timed out after {timeout:.0f} s:\n{stderr[-3000:]}"
        ) from exc
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        summary = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise HarnessError(
            f"ohif_check.mjs exited with {proc.returncode} and no JSON summary:\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
        ) from exc
    summary["exit_code"] = proc.returncode
    return summary
