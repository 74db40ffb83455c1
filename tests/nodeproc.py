"""Run the real node (``dicom-node serve``) as a child process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification

from tests.peers import PEER_ENV, free_port, stop_process, wait_for_port


class NodeProcess:
    """A ``dicom-node serve`` child process with its own data directory and config."""

    def __init__(self, workdir: Path, *, stable_after: float = 1.0, ae_title: str = "CTVLP",
                 destinations: dict | None = None, rules: list | None = None, workers: int = 1,
                 extra: dict | None = None, env: dict | None = None, database_url: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ae_title = ae_title
        self.data_dir = self.workdir / "data"
        cfg = {
            "listeners": [{"ae_title": ae_title, "host": "127.0.0.1", "port": self.port,
                           "stable_after": stable_after}],
            "network": {"allowed_peers": [{"ae_title": "*", "hosts": ["127.0.0.1"]}]},
            "storage": {"data_dir": str(self.data_dir), "min_free_mb": 10},
            "destinations": destinations or {},
            "rules": rules or [],
            "workers": {"count": workers, "backoff_base": 0.5, "backoff_max": 2, "max_attempts": 5,
                        "lease": 5, "poll_interval": 0.2},
        }
        if database_url:
            cfg["database"] = {"url": database_url}
        for k, v in (extra or {}).items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
        self.config_path = self.workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "node.log"
        self._factory = None
        self._config = None

    def start(self, timeout: float = 60) -> "NodeProcess":
        """Start the node and wait until it listens."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config",
                                          str(self.config_path)], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.port, timeout=timeout, proc=self.proc)
        except Exception as exc:
            raise AssertionError(f"node did not start: {exc}\n{self.log()}") from exc
        return self

    def log(self) -> str:
        """The node's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM the node (it stops its workers) and wait."""
        stop_process(self.proc, timeout=60)
        self.proc = None

    def kill9(self) -> None:
        """SIGKILL the node and its whole process group (workers included), like a power cut of the service."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and exc_type is not KeyboardInterrupt:
            # the test failed inside the node's context: what the node said is the first thing to read
            sys.stderr.write(f"--- node log (tail) ---\n{self.log()[-6000:]}\n")
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.stop()

    # --- looking inside ---
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a ``dicom-node`` subcommand against this node's config."""
        cmd = [sys.executable, "-m", "dicom_node", args[0], "--config", str(self.config_path), *args[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}\n{r.stderr}")
        return r

    def status(self) -> dict:
        """What ``dicom-node status --json`` shows, read in-process (a CLI per poll is slow)."""
        from dicom_node.commands.status import collect
        from dicom_node.config import load_config
        from storage.db import make_engine, session_factory

        if self._factory is None:
            self._config = load_config(self.config_path, environ={})
            self._factory = session_factory(make_engine(self._config.database_url))
        return collect(self._config, self._factory)

    def jobs(self) -> list:
        """Every job row, oldest first (read in-process)."""
        from sqlalchemy import select

        from storage.models import Job

        self.status()  # opens the database
        with self._factory() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def files(self) -> list[Path]:
        """Stored instance files (not temporaries)."""
        root = self.data_dir / "files"
        return sorted(root.glob("*/*/*.dcm")) if root.exists() else []

    def temporaries(self) -> list[Path]:
        """Temporary files left in the store."""
        root = self.data_dir / "files"
        return sorted(root.glob("*/*/.*.tmp")) if root.exists() else []

    def wait_for(self, predicate, timeout: float = 60, interval: float = 0.3, what: str = "condition"):
        """Poll ``predicate()`` until it returns a truthy value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        try:  # what the node's database says is usually the quickest clue
            snapshot = {k: v for k, v in self.status().items() if k in ("series", "jobs", "deliveries", "failed_jobs")}
        except Exception as exc:  # the database may be the problem
            snapshot = f"unavailable: {exc}"
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value {last!r}\n"
                             f"status: {snapshot}\n--- node log ---\n{self.log()[-4000:]}")


def scu(port: int, called: str = "CTVLP", calling: str = "TESTSCU", contexts=None) -> tuple[AE, object]:
    """A pynetdicom association to the node, for tests that need exact statuses."""
    ae = AE(ae_title=calling)
    for cx in contexts or StoragePresentationContexts[:100]:
        ae.add_requested_context(cx.abstract_syntax if hasattr(cx, "abstract_syntax") else cx)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    return ae, assoc


def dataset_bytes_after_meta(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, without preamble and file meta group."""
    raw = Path(path).read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    # file meta group length + the 12 bytes of its own element + 128 preamble + 4 'DICM'
    return raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength):]


__all__ = ["NodeProcess", "scu", "dataset_bytes_after_meta", "PEER_ENV"]
