"""A background thread that writes received instances into the index in batches.

The receive handler answers Success once the file is fsynced and renamed; the index row follows
within milliseconds. If the node dies in between, start-up recovery indexes the file from disk,
so the index never needs its own synchronous commit per image.

The common batch (new instances of series that are receiving or new) is written with a few
core SQL statements; anything else (re-sent instances, series that re-open after completion)
goes through ``storage.index.index_instances`` and its ORM logic. The indexer shares the GIL
with the receive threads, so its cost per instance counts against every association.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.index import IndexOutcome, InstanceRecord, index_instances, set_checkpoint
from storage.models import Instance, Series, Study, utcnow

log = logging.getLogger(__name__)


class Indexer:
    """Batches ``InstanceRecord``s into database transactions on its own thread."""

    def __init__(self, factory: sessionmaker[Session], *, batch_size: int = 2000, max_delay: float = 0.5,
                 on_indexed: Callable[[IndexOutcome], None] | None = None):
        self.factory = factory
        self.batch_size = batch_size
        self.max_delay = max_delay
        self.on_indexed = on_indexed
        self._queue: queue.Queue[InstanceRecord | None] = queue.Queue()
        self._submitted = 0
        self._done = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
        self._stopping = False

    def start(self) -> "Indexer":
        """Start the indexing thread."""
        self._thread.start()
        return self

    def submit(self, record: InstanceRecord) -> None:
        """Queue one record (never blocks)."""
        with self._cond:
            self._submitted += 1
        self._queue.put(record)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything submitted so far is committed; False on timeout."""
        with self._cond:
            target = self._submitted
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what is queued and stop the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [] if first is None else [first]
            deadline = time.monotonic() + self.max_delay
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._stopping = True
                    break
                batch.append(item)
            if batch:
                self._commit(batch)
            if self._stopping and self._queue.empty():
                return

    def _commit(self, batch: list[InstanceRecord]) -> None:
        delay = 0.5
        while True:
            try:
                started = utcnow()
                outcome = index_new_instances(self.factory, batch)
                if outcome is None:
                    outcome = index_instances(self.factory, batch)
                break
            except Exception:  # the database is down or locked: the files are safe; keep trying
                log.exception("indexing %d instances failed; retrying in %.1f s (files are stored)",
                              len(batch), delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        if self._queue.empty():
            try:
                set_checkpoint(self.factory, started)
            except Exception:
                log.exception("could not record the index checkpoint")
        with self._cond:
            self._done += len(batch)
            self._cond.notify_all()
        if self.on_indexed is not None:
            try:
                self.on_indexed(outcome)
            except Exception:
                log.exception("index callback failed")


class _NotCommon(Exception):
    """The batch needs the ORM logic of ``index_instances``."""


def index_new_instances(factory: sessionmaker[Session], records: list[InstanceRecord]) -> IndexOutcome | None:
    """Insert a batch of new instances of new or receiving series with core SQL, in one transaction.

    Returns None, having written nothing, when the batch needs ``index_instances`` instead: an
    instance already indexed (or twice in the batch), a series that completed and re-opens, or a
    concurrent insert by another node process.
    """
    sop_uids = [r.sop_uid for r in records]
    if len(set(sop_uids)) != len(sop_uids):
        return None
    outcome = IndexOutcome()
    try:
        with factory.begin() as session:
            if session.scalar(select(func.count()).select_from(Instance)
                              .where(Instance.sop_instance_uid.in_(sop_uids))):
                raise _NotCommon
            series_uids = list(dict.fromkeys(r.series_uid for r in records))
            known = {row.series_instance_uid: row for row in session.execute(
                select(Series.id, Series.series_instance_uid, Series.state, Series.is_result,
                       Series.last_received).where(Series.series_instance_uid.in_(series_uids)))}
            if any(row.state != "receiving" and not row.is_result for row in known.values()):
                raise _NotCommon
            study_uids = list(dict.fromkeys(r.study_uid for r in records))
            known_studies = set(session.scalars(select(Study.study_instance_uid)
                                                .where(Study.study_instance_uid.in_(study_uids))))
            new_studies = [{"study_instance_uid": u} for u in sorted(set(study_uids) - known_studies)]
            if new_studies:
                session.execute(insert(Study), new_studies)
            first = {}
            last = {}
            for r in records:
                first.setdefault(r.series_uid, r)
                if r.series_uid not in last or r.received_at > last[r.series_uid]:
                    last[r.series_uid] = r.received_at
            new_series = [u for u in series_uids if u not in known]
            if new_series:
                session.execute(insert(Series), [{
                    "series_instance_uid": u, "study_instance_uid": first[u].study_uid,
                    "modality": first[u].modality, "calling_ae": first[u].calling_ae,
                    "called_ae": first[u].called_ae, "peer_host": first[u].peer_host,
                    "first_received": first[u].received_at, "last_received": last[u],
                    "is_result": first[u].is_result, "source_series_uid": first[u].source_series_uid,
                    "state": "complete" if first[u].is_result else "receiving"} for u in new_series])
                outcome.new_series = new_series
            ids = {uid: id_ for uid, id_ in session.execute(
                select(Series.series_instance_uid, Series.id).where(Series.series_instance_uid.in_(series_uids)))}
            for uid, row in known.items():
                if last[uid] > row.last_received:
                    session.execute(update(Series).where(Series.id == row.id).values(last_received=last[uid]))
            session.execute(insert(Instance), [{
                "sop_instance_uid": r.sop_uid, "series_id": ids[r.series_uid], "sop_class_uid": r.sop_class_uid,
                "transfer_syntax_uid": r.transfer_syntax_uid, "path": r.relpath, "size": r.size,
                "received_at": r.received_at} for r in records])
    except (_NotCommon, IntegrityError):
        return None
    return outcome
