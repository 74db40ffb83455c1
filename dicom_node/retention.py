"""Retention: delete received series (and, separately, result objects) once they are old enough.

A series is only removed when no job of it is still queued or running, so retention never pulls
files from under a forward or an analysis. Audit rows stay.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import jobs
from storage.filestore import FileStore
from storage.models import Delivery, Job, Result, Series, utcnow

log = logging.getLogger(__name__)


def apply_retention(factory: sessionmaker[Session], store: FileStore, *, received_days: int,
                    result_days: int) -> int:
    """Delete expired series; returns the number of series removed. 0 days keeps forever."""
    now = utcnow()
    removed = 0
    with factory() as s:
        candidates = []
        for is_result, days in ((False, received_days), (True, result_days)):
            if days <= 0:
                continue
            cutoff = now - timedelta(days=days)
            candidates += s.execute(select(Series.last_received, Series.series_instance_uid).where(
                Series.is_result.is_(is_result), Series.last_received < cutoff,
                Series.state != "receiving")).all()
    # oldest first: an older result (superseded by a newer one) goes before the one it points to
    candidates = [uid for _, uid in sorted(candidates)]
    for uid in candidates:
        with factory.begin() as s:
            series = s.scalar(select(Series).where(Series.series_instance_uid == uid))
            busy = s.scalar(select(Job.id).where(Job.series_instance_uid.in_([uid, series.source_series_uid or ""]),
                                                 Job.state.in_(("queued", "running"))).limit(1))
            if busy is not None:
                continue
            paths = [i.path for i in series.instances]
            # files first: a crash before the rows go leaves rows without files (removed next run),
            # never files without rows that start-up recovery would index and route again
            for p in paths:
                store.delete(p)
            sops = [i.sop_instance_uid for i in series.instances]
            s.execute(delete(Delivery).where(Delivery.sop_instance_uid.in_(sops)))
            s.execute(delete(Result).where(Result.sop_instance_uid.in_(sops)).execution_options(
                synchronize_session=False))
            s.delete(series)  # and its instances (loaded above), by the relationship's cascade
            jobs.audit(s, "series_expired", uid, None, instances=len(paths), result=series.is_result)
        removed += 1
    if removed:
        log.info("retention: removed %d series", removed)
    return removed
