"""Real DICOM and database peers for tests: Orthanc, dcmtk storescp/storescu, PostgreSQL.

Every peer listens on 127.0.0.1 on a free port, gets ``TCP_NODELAY=1`` in its environment (dcmtk
and Orthanc otherwise stall ~45 ms per image) and is stopped by ``stop()`` / the context manager.
A missing tool fails the test with the package to install; it never skips.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}

# tool -> Debian package that provides it
PACKAGES = {
    "storescu": "dcmtk", "storescp": "dcmtk", "echoscu": "dcmtk", "dsrdump": "dcmtk",
    "dciodvfy": "dicom3tools", "Orthanc": "orthanc", "initdb": "postgresql",
    "chromium": "chromium",
}


def require_tool(name: str) -> str:
    """Path of a system tool, or fail the test saying which Debian package to install."""
    path = shutil.which(name)
    if name == "initdb":  # Debian keeps the server binaries out of PATH
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        path = str(found[-1]) if found else None
    if path is None:
        pkg = PACKAGES.get(name, name)
        pytest.fail(f"{name} is not installed: run `apt-get install {pkg}` (or `make test` as root)")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Terminate a process (and wait); kill it if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class Orthanc:
    """A throw-away Orthanc on loopback: DICOM on ``dicom_port``, REST on ``http_url``."""

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC", dicomweb: bool = False,
                 modalities: dict[str, tuple[str, str, int]] | None = None, dicom_port: int | None = None,
                 http_port: int | None = None):
        self.binary = require_tool("Orthanc")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicomweb = dicomweb
        self.modalities = dict(modalities or {})
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None

    def config(self) -> dict:
        """Orthanc JSON configuration for this instance."""
        cfg = {
            "Name": "test-orthanc",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "StableAge": 1,
            "HttpTimeout": 30,
            "Plugins": [],
        }
        if self.dicomweb:
            cfg["Plugins"] = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return cfg

    def start(self) -> "Orthanc":
        """Start Orthanc and wait until both ports answer."""
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=1))
        with open(self.workdir / "orthanc.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([self.binary, str(cfg_path)], env=PEER_ENV, stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for_port(self.http_port, proc=self.proc)
        wait_for_port(self.dicom_port, proc=self.proc)
        return self

    def stop(self) -> None:
        """Stop Orthanc and wait for its exit (a new one on the same index would find it locked)."""
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- REST ---
    def get(self, path: str):
        """GET a REST path and decode its JSON."""
        with urllib.request.urlopen(self.http_url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a REST path as raw bytes."""
        with urllib.request.urlopen(self.http_url + path, timeout=30) as r:
            return r.read()

    def upload(self, path: Path) -> dict:
        """Upload one DICOM file through the REST API."""
        req = urllib.request.Request(self.http_url + "/instances", data=Path(path).read_bytes(),
                                     method="POST", headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def find_series(self, series_uid: str) -> dict | None:
        """The Orthanc series resource with this Series Instance UID, or None."""
        req = urllib.request.Request(
            self.http_url + "/tools/find", method="POST",
            data=json.dumps({"Level": "Series", "Query": {"SeriesInstanceUID": series_uid},
                             "Expand": True}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            found = json.loads(r.read())
        return found[0] if found else None

    def find_instance(self, sop_uid: str) -> str | None:
        """Orthanc's ID of the instance with this SOP Instance UID, or None."""
        req = urllib.request.Request(
            self.http_url + "/tools/find", method="POST",
            data=json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            found = json.loads(r.read())
        return found[0] if found else None

    def study_series(self, study_uid: str) -> list[dict]:
        """Every series Orthanc holds in the study with this Study Instance UID."""
        req = urllib.request.Request(
            self.http_url + "/tools/find", method="POST",
            data=json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid},
                             "Expand": True}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def instance_count(self) -> int:
        """Number of instances stored."""
        return int(self.get("/statistics")["CountInstances"])


class StoreSCP:
    """dcmtk storescp writing what it receives into a directory."""

    def __init__(self, outdir: Path, *, aet: str = "STORESCP", port: int | None = None,
                 max_pdu: int = 131072, extra_args: list[str] | None = None):
        self.binary = require_tool("storescp")
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = port or free_port()
        self.max_pdu = max_pdu
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StoreSCP":
        """Start storescp and wait until it listens."""
        args = [self.binary, "--aetitle", self.aet, "--output-directory", str(self.outdir),
                "--max-pdu", str(self.max_pdu), "--accept-all", *self.extra_args, str(self.port)]
        with open(self.outdir.parent / f"storescp-{self.port}.log", "ab") as log:
            self.proc = subprocess.Popen(args, env=PEER_ENV, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        """Stop storescp."""
        stop_process(self.proc)
        self.proc = None

    def files(self) -> list[Path]:
        """Files received so far."""
        return sorted(p for p in self.outdir.iterdir() if p.is_file())

    def __enter__(self) -> "StoreSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def storescu(port: int, files: list[Path] | Path, *, called: str = "CTVLP", calling: str = "MODALITY",
             max_pdu: int = 131072, extra: list[str] | None = None, timeout: float = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    """Send files (or a directory, recursively) with dcmtk storescu over one association."""
    binary = require_tool("storescu")
    paths = [files] if isinstance(files, Path) else list(files)
    args = [binary, "-aet", calling, "-aec", called, "--max-pdu", str(max_pdu), "-nh"]
    if any(p.is_dir() for p in paths):
        args += ["--scan-directories", "--recurse"]
    args += [*(extra or []), "127.0.0.1", str(port), *map(str, paths)]
    proc = subprocess.run(args, env=PEER_ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"storescu failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class Postgres:
    """A private PostgreSQL cluster in a temp directory, on a free loopback port."""

    def __init__(self, workdir: Path):
        self.initdb = require_tool("initdb")
        self.bindir = Path(self.initdb).parent
        self.workdir = Path(workdir)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._as_root = os.geteuid() == 0

    def _cmd(self, args: list[str]) -> list[str]:
        # PostgreSQL refuses to run as root; use the postgres system user then.
        return ["runuser", "-u", "postgres", "--", *args] if self._as_root else args

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database."""
        return f"postgresql+psycopg://ctvlp@127.0.0.1:{self.port}/ctvlp"

    def start(self) -> "Postgres":
        """initdb, start and create the test role and database."""
        if self._as_root:
            # pytest's temp root is private to root: give postgres a directory it can reach
            import tempfile

            self.workdir = Path(tempfile.mkdtemp(prefix="ctvlp-pg-"))
            shutil.chown(self.workdir, "postgres")
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "pgdata"
        r = subprocess.run(self._cmd([self.initdb, "-D", str(data), "-A", "trust", "-U", "postgres"]),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr}")
        self.proc = subprocess.Popen(
            self._cmd([str(self.bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                       "-p", str(self.port), "-k", str(self.workdir), "-c", "fsync=off"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=30, proc=self.proc)
        psql = shutil.which("psql") or str(self.bindir / "psql")
        for sql in ("CREATE ROLE ctvlp LOGIN", "CREATE DATABASE ctvlp OWNER ctvlp"):
            for _ in range(50):
                r = subprocess.run([psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                    "-c", sql], capture_output=True, text=True)
                if r.returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"psql {sql!r} failed: {r.stderr}")
        return self

    def stop(self) -> None:
        """Stop the server (and remove its private directory when we made one)."""
        stop_process(self.proc)
        self.proc = None
        if self._as_root:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
