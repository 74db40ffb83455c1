"""A background thread that writes received instances into the index in batches.

The receive handler answers Success once the file is fsynced and renamed; the index row follows
within milliseconds. If the node dies in between, start-up recovery indexes the file from disk,
so the index never needs its own synchronous commit per image.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from storage.index import IndexOutcome, InstanceRecord, index_instances, set_checkpoint
from storage.models import utcnow

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
