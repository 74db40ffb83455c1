"""Series completion: a series is complete after ``stable_after`` seconds without a new instance.

Each arrival only records a timestamp (cheap on the receive path); one APScheduler date job per
series fires at the earliest possible completion time and re-arms itself while instances keep
arriving, which is a timer reset on every arrival without rescheduling per image.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)


class CompletionTracker:
    """Calls ``on_complete(series_uid)`` once a series has been quiet for its ``stable_after``."""

    def __init__(self, on_complete: Callable[[str], None], *, retry_after: float = 5.0):
        self.on_complete = on_complete
        self.retry_after = retry_after
        self._last: dict[str, tuple[float, float]] = {}  # uid -> (monotonic last arrival, stable_after)
        self._armed: set[str] = set()
        self._lock = threading.Lock()
        self.scheduler = BackgroundScheduler(timezone=timezone.utc,
                                             job_defaults={"misfire_grace_time": None, "coalesce": True})

    def start(self) -> "CompletionTracker":
        """Start the scheduler thread."""
        self.scheduler.start()
        return self

    def stop(self) -> None:
        """Stop the scheduler (pending series are re-armed from the database at next start)."""
        self.scheduler.shutdown(wait=False)

    def touch(self, series_uid: str, stable_after: float, *, age: float = 0.0) -> None:
        """Record an arrival ``age`` seconds ago; arms the series' timer if it has none."""
        now = time.monotonic() - age
        with self._lock:
            self._last[series_uid] = (now, stable_after)
            if series_uid in self._armed:
                return
            self._armed.add(series_uid)
        self._arm(series_uid, max(0.0, stable_after - age))

    def pending(self) -> list[str]:
        """Series waiting for completion."""
        with self._lock:
            return sorted(self._armed)

    def complete_now(self, series_uid: str) -> None:
        """Complete a series immediately (``dicom-node complete``)."""
        with self._lock:
            self._armed.discard(series_uid)
            self._last.pop(series_uid, None)
        self.on_complete(series_uid)

    def _arm(self, series_uid: str, delay: float) -> None:
        run_at = datetime.now(timezone.utc) + timedelta(seconds=delay)
        self.scheduler.add_job(self._fire, "date", run_date=run_at, args=[series_uid],
                               id=f"complete:{series_uid}", replace_existing=True)

    def _fire(self, series_uid: str) -> None:
        with self._lock:
            last = self._last.get(series_uid)
            if last is None:
                self._armed.discard(series_uid)
                return
            quiet = time.monotonic() - last[0]
            if quiet < last[1]:
                self._arm(series_uid, last[1] - quiet)
                return
            self._armed.discard(series_uid)
            del self._last[series_uid]
        try:
            self.on_complete(series_uid)
        except Exception:
            log.exception("completing series %s failed; retrying in %.0f s", series_uid, self.retry_after)
            self.touch(series_uid, self.retry_after)
