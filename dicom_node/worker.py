"""Worker processes: claim jobs from the database and run their actions.

Workers are separate processes (spawned, never forked from the SCP) and keep long-lived state,
such as loaded models, in ``WorkerContext.cache`` between jobs. SIGTERM lets the current job finish.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback

from dicom_node import jobs, logs
from dicom_node.actions import ACTIONS, PermanentError, RetryableError, WorkerContext
from dicom_node.config import Config
from storage.db import make_engine, session_factory
from storage.filestore import FileStore

log = logging.getLogger(__name__)


class Worker:
    """Runs jobs one at a time until stopped."""

    def __init__(self, config: Config, *, kinds: list[str] | None = None, parent_pid: int | None = None):
        self.config = config
        self.kinds = kinds
        engine = make_engine(config.database_url)
        self.factory = session_factory(engine)
        self.ctx = WorkerContext(config, self.factory,
                                 FileStore(config.data_dir / "files", min_free_mb=0), cache={})
        self.id = jobs.worker_id()
        self.stop_event = threading.Event()
        self.parent_pid = parent_pid  # the node that spawned us: we stop when it is gone

    def run_once(self) -> bool:
        """Claim and run one job; False when there was none."""
        wc = self.config.workers
        job = jobs.claim(self.factory, self.id, wc.lease, self.kinds)
        if job is None:
            return False
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, beat_stop), daemon=True)
        beat.start()
        started = time.monotonic()
        try:
            fn = ACTIONS.get(job.kind)
            if fn is None:
                raise PermanentError(f"unknown job kind {job.kind!r}")
            result = fn(job, self.ctx)
        except PermanentError as exc:
            jobs.fail(self.factory, job.id, str(exc), base=wc.backoff_base, cap=wc.backoff_max, retry=False)
        except RetryableError as exc:
            state = jobs.fail(self.factory, job.id, str(exc), base=wc.backoff_base, cap=wc.backoff_max)
            log.warning("job %d (%s) attempt %d failed: %s -> %s", job.id, job.kind, job.attempts, exc, state)
        except Exception as exc:  # a bug or an unexpected input: record it with its traceback, retry
            log.exception("job %d (%s) crashed", job.id, job.kind)
            jobs.fail(self.factory, job.id, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}",
                      base=wc.backoff_base, cap=wc.backoff_max)
        else:
            jobs.finish(self.factory, job.id, result)
            log.info("job %d (%s) done in %.1f s", job.id, job.kind, time.monotonic() - started)
        finally:
            beat_stop.set()
            beat.join()
        return True

    def _heartbeat(self, job_id: int, stop: threading.Event) -> None:
        interval = max(0.5, self.config.workers.lease / 4)
        while not stop.wait(interval):
            try:
                jobs.heartbeat(self.factory, job_id, self.id)
            except Exception:
                log.exception("heartbeat for job %d failed", job_id)

    def preload(self) -> None:
        """Load the pipelines the rules use now, so the first analysis does not wait for them."""
        if self.kinds is not None and "analyze" not in self.kinds:
            return
        names = sorted({r.analyze for r in self.config.rules if r.analyze})
        if names and self.config.workers.analysis_threads:
            import torch

            torch.set_num_threads(self.config.workers.analysis_threads)
        for name in names:
            try:
                from dicom_node.analysis import _pipeline

                _pipeline(self.ctx, name)
            except Exception as exc:  # the analyze job reports it properly when it runs
                log.error("pipeline %r could not be loaded at start: %s", name, exc)
        if names:
            try:
                from ai_core.encode import warm_up

                log.info("result encoders warmed up in %.1f s", warm_up())
            except Exception as exc:  # only the first series pays for it then
                log.warning("result encoders could not be warmed up: %s", exc)

    def run(self) -> None:
        """Loop until ``stop_event`` is set."""
        log.info("worker %s started", self.id)
        self.preload()
        while not self.stop_event.is_set():
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                # the node died without stopping us (kill -9, OOM killer): an orphan would poll forever
                log.warning("worker %s: the node process %d is gone; stopping", self.id, self.parent_pid)
                break
            try:
                busy = self.run_once()
            except Exception:  # database unreachable: wait and try again
                log.exception("worker loop error")
                busy = False
            if not busy:
                self.stop_event.wait(self.config.workers.poll_interval)
        log.info("worker %s stopped", self.id)


def lower_priority(nice: int, idle: bool) -> None:
    """Lower this process's CPU priority: ``nice`` added to its niceness, then SCHED_IDLE if ``idle``.

    Applied to every thread that exists now; threads started later inherit it.
    """
    if nice:
        for tid in _threads():
            # per thread on Linux; os.nice() would change the calling thread only
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    if not idle:
        return
    if not hasattr(os, "SCHED_IDLE"):
        log.warning("workers.analysis_idle: this system has no SCHED_IDLE; analysis runs at niceness %d only", nice)
        return
    try:
        for tid in _threads():
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:  # e.g. a seccomp filter that forbids it
        log.warning("workers.analysis_idle: cannot set SCHED_IDLE (%s); analysis runs at niceness %d only", exc, nice)


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: this thread only
        return [0]


def worker_main(config: Config, log_level: int = logging.INFO, kinds: list[str] | None = None,
                parent_pid: int | None = None) -> None:
    """Entry point of a spawned worker process (``kinds``: only claim these job kinds).

    ``parent_pid``: the node's pid, passed by the node (a ``getppid()`` here would already read
    1 if the node died while this process was still importing).
    """
    logs.configure_child(log_level)  # the worker's log is about jobs, not every DIMSE message
    if kinds is None or "analyze" in kinds:
        lower_priority(config.workers.analysis_nice, config.workers.analysis_idle)  # receiving first
    worker = Worker(config, kinds=kinds, parent_pid=parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop_event.set())
    worker.run()


def spawn_workers(config: Config, count: int, log_level: int = logging.INFO, kinds: list[str] | None = None,
                  name: str = "worker") -> list[multiprocessing.Process]:
    """Start ``count`` worker processes with the spawn method."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i in range(count):
        p = ctx.Process(target=worker_main, args=(config, log_level, kinds, os.getpid()), name=f"{name}-{i + 1}",
                        daemon=False)
        p.start()
        procs.append(p)
    return procs
