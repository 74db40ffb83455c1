"""The persisted job queue: queued → running → done | failed (| superseded).

Claims are atomic across processes and hosts: SQLite serialises writers (``BEGIN IMMEDIATE``),
PostgreSQL uses ``FOR UPDATE SKIP LOCKED``. A running job whose worker stopped sending heartbeats
for longer than the lease is claimed again, so a crashed worker's job resumes after restart.
"""

from __future__ import annotations

import logging
import socket
import os
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from storage.models import AuditEvent, Delivery, Job, utcnow

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, SUPERSEDED = "queued", "running", "done", "failed", "superseded"


def worker_id() -> str:
    """An identifier of this worker process: host and PID."""
    return f"{socket.gethostname()}:{os.getpid()}"


def audit(session: Session, event: str, series_uid: str | None = None, job_id: int | None = None,
          **detail) -> None:
    """Add an audit row (no patient identifiers: UIDs, AE titles, counts and errors only)."""
    session.add(AuditEvent(event=event, series_instance_uid=series_uid, job_id=job_id, detail=detail or None))


def enqueue(session: Session, kind: str, series_uid: str, *, generation: int = 1, params: dict | None = None,
            max_attempts: int = 5) -> Job:
    """Add a queued job to the session (committed by the caller)."""
    job = Job(kind=kind, series_instance_uid=series_uid, generation=generation, params=params or {},
              max_attempts=max_attempts, state=QUEUED, not_before=utcnow())
    session.add(job)
    session.flush()
    audit(session, "job_queued", series_uid, job.id, kind=kind, **{k: v for k, v in (params or {}).items()
                                                                    if isinstance(v, (str, int, list))})
    return job


def claim(factory: sessionmaker[Session], worker: str, lease: float, kinds: list[str] | None = None) -> Job | None:
    """Atomically take the oldest runnable job (queued and due, or running with an expired lease)."""
    now = utcnow()
    stale = now - timedelta(seconds=lease)
    with factory.begin() as session:
        q = select(Job.id).where(or_(
            and_(Job.state == QUEUED, Job.not_before <= now),
            and_(Job.state == RUNNING, Job.heartbeat_at < stale),
        )).order_by(Job.id).limit(1)
        if kinds:
            q = q.where(Job.kind.in_(kinds))
        if session.bind.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        job_id = session.scalar(q)
        if job_id is None:
            return None
        job = session.get(Job, job_id)
        if job.state == RUNNING:
            log.warning("job %d: worker %s stopped answering; taking it over", job.id, job.worker)
            audit(session, "job_taken_over", job.series_instance_uid, job.id, previous_worker=job.worker)
        job.state = RUNNING
        job.worker = worker
        job.attempts += 1
        job.started_at = now
        job.heartbeat_at = now
        audit(session, "job_started", job.series_instance_uid, job.id, attempt=job.attempts, worker=worker)
        return job


def requeue_orphans(factory: sessionmaker[Session]) -> int:
    """Requeue running jobs whose worker process on this host no longer exists (after a crash)."""
    host = socket.gethostname()
    n = 0
    with factory.begin() as session:
        for job in session.scalars(select(Job).where(Job.state == RUNNING, Job.worker.like(f"{host}:%"))):
            pid = int(job.worker.rsplit(":", 1)[1])
            try:
                os.kill(pid, 0)
                continue  # still alive (another node process on this host owns it)
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            job.state = QUEUED
            job.not_before = utcnow()
            audit(session, "job_orphaned", job.series_instance_uid, job.id, previous_worker=job.worker)
            n += 1
    if n:
        log.warning("%d jobs were running in workers that died with the previous node process; requeued", n)
    return n


def heartbeat(factory: sessionmaker[Session], job_id: int, worker: str) -> bool:
    """Extend a running job's lease; False if the job is no longer ours."""
    with factory.begin() as session:
        res = session.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.state == RUNNING)
                              .values(heartbeat_at=utcnow()))
        return res.rowcount == 1


def finish(factory: sessionmaker[Session], job_id: int, result: dict | None = None) -> None:
    """Mark a job done."""
    with factory.begin() as session:
        job = session.get(Job, job_id)
        job.state = DONE
        job.finished_at = utcnow()
        job.result = result
        job.last_error = None
        audit(session, "job_done", job.series_instance_uid, job.id)


def backoff_delay(attempts: int, base: float, cap: float) -> float:
    """Seconds to wait before attempt ``attempts + 1``: base, 2·base, 4·base, ... up to cap."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


def fail(factory: sessionmaker[Session], job_id: int, error: str, *, base: float, cap: float,
         retry: bool = True) -> str:
    """Record a failed attempt: requeue with backoff, or fail for good; returns the new state."""
    with factory.begin() as session:
        job = session.get(Job, job_id)
        job.last_error = error[:4000]
        if retry and job.attempts < job.max_attempts:
            job.state = QUEUED
            job.not_before = utcnow() + timedelta(seconds=backoff_delay(job.attempts, base, cap))
            audit(session, "job_retry", job.series_instance_uid, job.id, attempt=job.attempts, error=error[:500],
                  not_before=job.not_before.isoformat())
        else:
            job.state = FAILED
            job.finished_at = utcnow()
            session.execute(update(Delivery).where(Delivery.job_id == job.id, Delivery.state == "pending")
                            .values(state="failed", last_error=error[:4000]))
            audit(session, "job_failed", job.series_instance_uid, job.id, attempts=job.attempts, error=error[:500])
            log.error("job %d (%s of series %s) failed for good after %d attempts: %s", job.id, job.kind,
                      job.series_instance_uid, job.attempts, error)
        return job.state


def retry(factory: sessionmaker[Session], job_id: int) -> Job:
    """Requeue a failed job now, with a fresh attempt budget (``dicom-node retry``)."""
    with factory.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        if job.state not in (FAILED, DONE):
            raise ValueError(f"job {job_id} is {job.state}; only failed or done jobs can be retried")
        job.state = QUEUED
        job.max_attempts = job.attempts + max(1, job.max_attempts)
        job.not_before = utcnow()
        job.finished_at = None
        session.execute(update(Delivery).where(Delivery.job_id == job.id, Delivery.state == "failed")
                        .values(state="pending"))
        audit(session, "job_requeued", job.series_instance_uid, job.id)
        return job


def supersede_older(session: Session, series_uid: str, generation: int) -> int:
    """Mark jobs of earlier generations of a series superseded; returns how many."""
    jobs = session.scalars(select(Job).where(Job.series_instance_uid == series_uid, Job.generation < generation,
                                             Job.superseded.is_(False))).all()
    for job in jobs:
        job.superseded = True
        if job.state in (QUEUED, FAILED):
            job.state = SUPERSEDED
            job.finished_at = utcnow()
    if jobs:
        audit(session, "jobs_superseded", series_uid, None, count=len(jobs), generation=generation)
    return len(jobs)


def list_jobs(factory: sessionmaker[Session], *, failed_only: bool = False, limit: int = 50) -> list[Job]:
    """Most recent jobs first."""
    with factory() as session:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if failed_only:
            q = q.where(Job.state == FAILED)
        return list(session.scalars(q))


def age(dt: datetime | None) -> str:
    """A short human age for a timestamp."""
    if dt is None:
        return "-"
    s = (utcnow() - dt).total_seconds()
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"
