"""Real-browser viewer harness: OHIF served beside Orthanc, driven by Debian's Chromium.

Pieces, each a context manager that stops what it started:

- ``ohif_dist()``: the pinned OHIF build unpacked by ``tests/viewer/install_ohif.sh``.
- ``OhifServer``: a threaded HTTP server on 127.0.0.1 that serves the OHIF build at the root path
  (unknown paths fall back to ``index.html``, as OHIF's router expects), replaces its
  ``app-config.js`` with ours (one DICOMweb data source on the same origin), and proxies
  ``/dicom-web/`` and ``/wado`` to Orthanc's HTTP port.
- ``Browser``: headless Chromium through Playwright, closed-network flags, a fresh profile,
  software WebGL, every console message (``console.debug`` included) and page error recorded.

Nothing here downloads anything: OHIF comes from the npm package installed before the tests,
Chromium from Debian.
"""

from __future__ import annotations

import http.client
import importlib.util
import logging
import mimetypes
import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

log = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"
REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "tests" / "viewer" / "install_ohif.sh"
APP_CONFIG = Path(__file__).with_name("ohif_app_config.js")
CHROMIUM = "/usr/bin/chromium"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # as tests/peers.py loads it

# Chromium for a closed network: no background fetches, no component or sync traffic, no QUIC.
# WebGL runs on SwiftShader (CPU): --disable-gpu keeps the GPU process off real hardware, and
# --enable-unsafe-swiftshader lets WebGL fall back to SwiftShader, which Chromium no longer does
# by itself.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
    "--disable-dev-shm-usage",
]

# Run before OHIF's scripts on every page; about:blank has no localStorage, hence the try.
QUIET_OHIF = """try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); }
catch (e) {}"""

# Records OHIF's toast notifications (sonner), which vanish after a few seconds, in
# window.__toasts as {type, text}; polled because the text is filled in after insertion.
TOAST_RECORDER = """(() => {
  window.__toasts = [];
  const seen = new Set();
  setInterval(() => {
    for (const t of document.querySelectorAll('li[data-sonner-toast]')) {
      const item = {type: t.getAttribute('data-type') || '', text: t.textContent || ''};
      const key = item.type + '|' + item.text;
      if (item.text && !seen.has(key)) { seen.add(key); window.__toasts.push(item); }
    }
  }, 100);
})();"""

# Paths answered by Orthanc rather than by the static OHIF build.
PROXIED_PREFIXES = ("/dicom-web/", "/wado")

# Hop-by-hop headers (RFC 9110 7.6.1) are not forwarded by a proxy.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "content-length", "host"}

MIME = {".js": "application/javascript", ".mjs": "application/javascript", ".wasm": "application/wasm",
        ".css": "text/css", ".html": "text/html; charset=utf-8", ".json": "application/json",
        ".svg": "image/svg+xml", ".woff2": "font/woff2", ".ico": "image/x-icon"}


def ohif_dist() -> Path:
    """The unpacked OHIF ``dist/`` directory, or fail the test saying how to install it."""
    dist = REPO / ".cache" / "ohif" / OHIF_VERSION / "dist"
    if not (dist.parent / ".installed").is_file() or not (dist / "index.html").is_file():
        hint = "" if shutil.which("npm") else " (it needs npm: `apt-get install nodejs npm`)"
        pytest.fail(f"OHIF {OHIF_VERSION} is not installed in {dist.parent}: run "
                    f"`bash {INSTALL_SCRIPT.relative_to(REPO)}`{hint}; `make test` does this")
    return dist


def require_dicomweb_plugin() -> None:
    """Fail saying what to install when Orthanc's DICOMweb plugin is missing."""
    if not Path(DICOMWEB_PLUGIN).is_file():
        pytest.fail(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is missing: run "
                    "`apt-get install orthanc-dicomweb` (or `make test` as root)")


def require_browser() -> str:
    """Chromium's path and Playwright's import check, or fail saying what to install."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `apt-get install chromium` (or `make test` as root)")
    if importlib.util.find_spec("playwright") is None:
        pytest.fail("the playwright Python package is missing: run `make install-test` "
                    "(never `playwright install`: the tests use Debian's Chromium)")
    return CHROMIUM


class _Handler(BaseHTTPRequestHandler):
    """Static OHIF files with SPA fallback, and a pass-through proxy to Orthanc."""

    protocol_version = "HTTP/1.1"  # keep-alive: OHIF fetches many small files
    server: "_Server"

    def log_message(self, fmt: str, *args) -> None:  # route to logging, not stderr
        log.debug("ohif-server: " + fmt, *args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        self.server.activity(+1)
        try:
            if path.startswith(PROXIED_PREFIXES):
                self._proxy()
            elif self.command in ("GET", "HEAD"):
                self._static(path)
            else:
                self._send(405, b"method not allowed", "text/plain")
        finally:
            self.server.activity(-1)

    def _static(self, path: str) -> None:
        if path == "/app-config.js":
            target = self.server.app_config
        else:
            target = (self.server.dist / path.lstrip("/")).resolve()
            # Unknown paths (client-side routes such as /viewer) get index.html; never leave dist.
            if not target.is_file() or self.server.dist not in target.parents:
                target = self.server.dist / "index.html"
        ctype = MIME.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(200, target.read_bytes(), ctype)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()  # phantom studies are small; read() also undoes chunking
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self._finish(data)
        except OSError as e:
            log.warning("proxy to Orthanc failed for %s: %s", self.path, e)
            self._send(502, f"Orthanc unreachable: {e}".encode(), "text/plain")
        finally:
            conn.close()

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Cache-Control", "no-store")
        self._finish(data)

    def _finish(self, data: bytes) -> None:
        # Cross-origin isolation gives OHIF SharedArrayBuffer, which its volume loaders prefer.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, app_config: Path, orthanc_port: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        self.app_config = app_config
        self.orthanc_port = orthanc_port
        self._lock = threading.Lock()
        self.in_flight = 0
        self.last_activity = time.monotonic()

    def activity(self, delta: int) -> None:
        """Count a request starting (+1) or ending (-1)."""
        with self._lock:
            self.in_flight += delta
            self.last_activity = time.monotonic()


class OhifServer:
    """OHIF at the root path of a loopback server whose ``/dicom-web/`` is Orthanc's."""

    def __init__(self, orthanc_http_url: str, dist: Path | None = None,
                 app_config: Path = APP_CONFIG):
        self.dist = dist or ohif_dist()
        port = urlsplit(orthanc_http_url).port
        if port is None:
            raise ValueError(f"Orthanc URL needs an explicit port: {orthanc_http_url!r}")
        self._server = _Server(self.dist, app_config, port)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "OhifServer":
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
            self._thread = None
        self._server.server_close()

    def wait_idle(self, quiet: float = 1.0, timeout: float = 20.0) -> None:
        """Block until no request has been in flight for ``quiet`` seconds (OHIF done fetching)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._server._lock:
                idle = self._server.in_flight == 0 and time.monotonic() - self._server.last_activity >= quiet
            if idle:
                return
            time.sleep(0.05)
        raise TimeoutError(f"OHIF kept fetching for {timeout} s")

    def viewer_url(self, study_uid: str) -> str:
        """The OHIF viewer route that opens one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"

    def __enter__(self) -> "OhifServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class ConsoleEntry:
    """One console message or uncaught page error."""

    type: str
    text: str

    def __str__(self) -> str:
        return f"[{self.type}] {self.text}"


@dataclass
class Browser:
    """Headless Debian Chromium through Playwright with one page and its console recorded."""

    profile_dir: Path
    viewport: tuple[int, int] = (1280, 800)
    console: list[ConsoleEntry] = field(default_factory=list)

    def __enter__(self) -> "Browser":
        require_browser()
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            # A persistent context is the only way to hand Chromium our own fresh profile dir.
            self.context = self._pw.chromium.launch_persistent_context(
                str(self.profile_dir), executable_path=CHROMIUM, headless=True,
                args=CHROMIUM_ARGS, viewport={"width": self.viewport[0], "height": self.viewport[1]},
                service_workers="block", timeout=30_000)
        except Exception:
            self._pw.stop()
            raise
        # OHIF's onboarding tour would cover the viewport; mark it as already shown.
        self.context.add_init_script(QUIET_OHIF)
        self.context.add_init_script(TOAST_RECORDER)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.on("console", lambda m: self.console.append(ConsoleEntry(m.type, m.text)))
        self.page.on("pageerror", lambda e: self.console.append(ConsoleEntry("pageerror", str(e))))
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.context.close()
        finally:
            self._pw.stop()

    def errors(self) -> list[ConsoleEntry]:
        """Console errors and uncaught exceptions seen so far."""
        return [e for e in self.console if e.type in ("error", "pageerror")]

    def toasts(self) -> list[ConsoleEntry]:
        """OHIF's toast notifications shown on the current page so far (type: warning, error, ...)."""
        items = self.page.evaluate("() => window.__toasts || []")
        return [ConsoleEntry(t["type"], t["text"]) for t in items]

    def dump_console(self, path: Path) -> None:
        """Write every console entry to a text file (a test artefact)."""
        path.write_text("\n".join(map(str, self.console)) + "\n")


def artifacts_dir() -> Path:
    """``test-artifacts/viewer`` in the repo (git-ignored), created on demand."""
    out = REPO / "test-artifacts" / "viewer"
    out.mkdir(parents=True, exist_ok=True)
    return out
