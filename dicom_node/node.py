"""The node process: listeners, indexer, completion timers, routing, and its worker processes."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta

from pydicom import dcmread
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import jobs
from dicom_node.completion import CompletionTracker
from dicom_node.config import Config
from dicom_node.errors import ConfigError
from dicom_node.indexer import Indexer
from dicom_node.receive import PeerPolicy, build_ae, start_listener
from dicom_node.receivers import ReceiverPool
from dicom_node.retention import apply_retention
from dicom_node.routing import Router, SeriesAttributes
from dicom_node.worker import spawn_workers
from storage.db import open_database
from storage.filestore import FileStore
from storage.index import InstanceRecord, rebuild_index
from storage.models import Instance, Meta, Series, utcnow

log = logging.getLogger(__name__)
HEARTBEAT_KEY = "node_heartbeat"


class Node:
    """Everything ``dicom-node serve`` runs, with a start/stop life cycle."""

    def __init__(self, config: Config, *, workers: int | None = None):
        self.config = config
        try:
            self.router = Router(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.n_workers = config.workers.count if workers is None else workers
        self.engine, self.factory = open_database(config.database_url)
        self.store = FileStore(config.data_dir / "files", min_free_mb=config.storage.min_free_mb,
                               fsync=config.storage.fsync)
        self.indexer = Indexer(self.factory)
        self.tracker = CompletionTracker(self.complete_series)
        self.receivers: ReceiverPool | None = None
        self.ae = None
        self.servers: list = []
        self.worker_procs: list = []
        self._stop = threading.Event()
        # stop() and the heartbeat's worker restarts exclude each other: a worker that exits on the
        # same SIGTERM as the node (systemd signals the whole cgroup) must not be respawned after
        # stop() has collected the workers, or it outlives the node
        self._workers_lock = threading.Lock()
        self._beat: threading.Thread | None = None

    # --- life cycle ---
    def start(self) -> "Node":
        """Recover, start listening, start workers."""
        t0 = time.monotonic()
        added = rebuild_index(self.factory, self.store)
        jobs.requeue_orphans(self.factory)
        self.indexer.start()
        self.tracker.start()
        self._rearm_pending()
        self.tracker.scheduler.add_job(self._retention, "interval", hours=1, id="retention",
                                       next_run_time=utcnow() + timedelta(minutes=1))
        self.ae = build_ae(self.config)
        policy = PeerPolicy(self.config)
        level = logging.getLogger().level
        if self.config.network.receive_processes:
            try:
                self.receivers = ReceiverPool(self.config, self.config.network.receive_processes, self.on_stored,
                                              level).start()
            except RuntimeError as exc:
                self.stop()
                raise ConfigError(f"{exc}; or set network.receive_processes: 0 to receive in the node "
                                  "process") from None
        for i, listener in enumerate(self.config.listeners):
            server_class = self.receivers.server_class(i) if self.receivers else ThreadedAssociationServer
            try:
                self.servers.append(start_listener(self.ae, listener, policy, self.store, self.on_stored,
                                                   server_class))
            except OSError as exc:
                self.stop()
                raise ConfigError(f"cannot listen on {listener.host}:{listener.port}: {exc.strerror}; "
                                  "another process holds the port or it needs privileges: change "
                                  "listeners[].port") from None
        self.worker_procs = spawn_workers(self.config, self.n_workers, level)
        if self.n_workers:
            self.worker_procs += spawn_workers(self.config, self.config.workers.delivery_count, level,
                                               kinds=["forward"], name="delivery")
        self._beat = threading.Thread(target=self._heartbeat_loop, name="node-heartbeat", daemon=True)
        self._beat.start()
        log.info("node started in %.1f s (%d instances re-indexed from disk, %d workers)",
                 time.monotonic() - t0, added, len(self.worker_procs))
        return self

    def stop(self) -> None:
        """Stop listening, flush the index, stop workers (they finish their current job)."""
        with self._workers_lock:
            self._stop.set()
        for server in self.servers:
            server.shutdown()
        self.servers = []
        if self.receivers is not None:
            self.receivers.stop()  # their open associations finish and are indexed first
            self.receivers = None
        self.tracker.stop()
        self.indexer.stop()
        for p in self.worker_procs:
            p.terminate()
        for p in self.worker_procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        self.worker_procs = []

    def _heartbeat_loop(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "listeners": [f"{l.ae_title}@{l.host}:{l.port}" for l in self.config.listeners]}
        while not self._stop.is_set():
            try:
                with self.factory.begin() as s:
                    row = s.get(Meta, HEARTBEAT_KEY)
                    value = json.dumps({**info, "at": utcnow().isoformat()})
                    if row is None:
                        s.add(Meta(key=HEARTBEAT_KEY, value=value))
                    else:
                        row.value = value
            except Exception:
                log.exception("node heartbeat failed")
            if self.receivers is not None:
                self.receivers.check()
            # restart dead workers: a crash in a model must not stop the queue
            with self._workers_lock:
                for i, p in enumerate(self.worker_procs):
                    if not p.is_alive() and not self._stop.is_set():
                        log.error("worker %s exited with %s; restarting it", p.name, p.exitcode)
                        kinds = ["forward"] if p.name.startswith("delivery") else None
                        self.worker_procs[i] = spawn_workers(self.config, 1, logging.getLogger().level,
                                                             kinds=kinds, name=p.name.rsplit("-", 1)[0])[0]
            self._stop.wait(5)

    def _rearm_pending(self) -> None:
        """Give every series still receiving (e.g. before a crash) its completion timer back."""
        stable = {l.ae_title: l.stable_after for l in self.config.listeners}
        default = self.config.listeners[0].stable_after
        with self.factory() as s:
            rows = s.execute(select(Series.series_instance_uid, Series.last_received, Series.called_ae)
                             .where(Series.state == "receiving")).all()
        for uid, last, called in rows:
            age = max(0.0, (utcnow() - last).total_seconds())
            self.tracker.touch(uid, stable.get(called, default), age=age)
        if rows:
            log.info("%d series were still receiving; their completion timers are re-armed", len(rows))

    def _retention(self) -> None:
        st = self.config.storage
        try:
            apply_retention(self.factory, self.store, received_days=st.retention_days,
                            result_days=st.result_retention_days)
        except Exception:
            log.exception("retention run failed; will try again in an hour")

    def on_stored(self, record: InstanceRecord, stable_after: float) -> None:
        """A new instance is on disk: index it and (re)start its series' completion timer."""
        self.indexer.submit(record)
        self.tracker.touch(record.series_uid, stable_after)

    # --- completion and routing ---
    def complete_series(self, series_uid: str) -> None:
        """The series is stable: route it and queue its jobs."""
        if not self.indexer.flush(60):
            raise RuntimeError("index not flushed in 60 s")
        with self.factory.begin() as s:
            series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
            if series is None or series.state != "receiving":
                return
            if series.is_result:
                series.state = "complete"
                return
            route_series(s, series, self.store, self.router, self.config)


def route_series(s: Session, series: Series, store: FileStore, router: Router, config: Config) -> None:
    """Apply the routing rules to a complete series and enqueue its jobs (in session ``s``)."""
    first = s.scalar(select(Instance).where(Instance.series_id == series.id).order_by(Instance.id).limit(1))
    ds = dcmread(store.path(first.path), stop_before_pixels=True) if first else None
    decision = router.decide(SeriesAttributes(ds, calling_ae=series.calling_ae, called_ae=series.called_ae))
    jobs.supersede_older(s, series.series_instance_uid, series.generation)
    wc = config.workers
    for dest in decision.forward:
        jobs.enqueue(s, "forward", series.series_instance_uid, generation=series.generation,
                     params={"destination": dest}, max_attempts=wc.max_attempts)
    for pipeline, results_to in decision.analyze:
        jobs.enqueue(s, "analyze", series.series_instance_uid, generation=series.generation,
                     params={"pipeline": pipeline, "results_to": results_to}, max_attempts=wc.max_attempts)
    names = ",".join(r.name for r in decision.rules) or ("default" if decision.default else "")
    series.state = "discarded" if decision.discard else "complete"
    series.completed_at = utcnow()
    series.routed_rule = names[:128] or None
    n = len(series.instances)
    jobs.audit(s, "series_complete", series.series_instance_uid, None, instances=n, generation=series.generation,
               rules=names, discarded=decision.discard)
    log.info("series %s complete (%d instances, generation %d): %s", series.series_instance_uid, n,
             series.generation, "discarded" if decision.discard else
             f"rules {names}: forward {decision.forward}, analyze {[p for p, _ in decision.analyze]}")

