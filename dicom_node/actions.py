"""What a job does, by kind: ``forward`` sends a series (or result objects) to a destination,
``analyze`` runs an AI pipeline and queues its results for delivery.

Each action takes a job and a ``WorkerContext`` and either returns a result dict (the job is done)
or raises: ``RetryableError`` (retry with backoff) or ``PermanentError`` (fail now).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config
from dicom_node.errors import DeliveryError, NodeError
from dicom_node.send import Outgoing, send_files
from storage.filestore import FileStore
from storage.models import Delivery, Instance, Job, Series

log = logging.getLogger(__name__)


class RetryableError(NodeError):
    """The attempt failed for a reason that may go away (peer down, busy, timeout)."""


class PermanentError(NodeError):
    """Retrying cannot help (unknown destination, pipeline not installed, bad data)."""


@dataclass
class WorkerContext:
    """What actions need: configuration, database, file store, and long-lived state such as models."""

    config: Config
    factory: sessionmaker[Session]
    store: FileStore
    cache: dict


Action = Callable[[Job, WorkerContext], dict]
ACTIONS: dict[str, Action] = {}


def action(kind: str) -> Callable[[Action], Action]:
    """Register an action for a job kind."""

    def register(fn: Action) -> Action:
        ACTIONS[kind] = fn
        return fn

    return register


def _instances_to_send(session: Session, job: Job) -> list[Instance]:
    params = job.params or {}
    if params.get("sop_instance_uids"):
        return list(session.scalars(select(Instance).where(
            Instance.sop_instance_uid.in_(params["sop_instance_uids"]))))
    series = session.scalar(select(Series).where(Series.series_instance_uid == job.series_instance_uid))
    if series is None:
        raise PermanentError(f"series {job.series_instance_uid} is not in the index")
    return list(series.instances)


@action("forward")
def forward(job: Job, ctx: WorkerContext) -> dict:
    """Send every instance of the job (a series, or listed result objects) not yet delivered."""
    name = job.params.get("destination")
    dest = ctx.config.destinations.get(name)
    if dest is None:
        raise PermanentError(f"destination {name!r} is not configured (known: {sorted(ctx.config.destinations)})")
    with ctx.factory.begin() as session:
        instances = _instances_to_send(session, job)
        if not instances:
            raise PermanentError("nothing to send: the series has no stored instances")
        existing = {d.sop_instance_uid: d for d in session.scalars(select(Delivery).where(
            Delivery.destination == name,
            Delivery.sop_instance_uid.in_([i.sop_instance_uid for i in instances])))}
        todo = []
        for inst in instances:
            d = existing.get(inst.sop_instance_uid)
            if d is None:
                d = Delivery(job_id=job.id, sop_instance_uid=inst.sop_instance_uid, destination=name)
                session.add(d)
            elif d.state == "done" and d.job_id == job.id:
                continue  # delivered by an earlier attempt of this job
            else:
                d.job_id, d.state = job.id, "pending"
            todo.append(Outgoing(inst.sop_instance_uid, inst.sop_class_uid, inst.transfer_syntax_uid,
                                 ctx.store.path(inst.path)))
    calling = ctx.config.listeners[0].ae_title
    try:
        outcomes = send_files(dest, todo, calling_ae=calling) if todo else {}
    except DeliveryError as exc:
        with ctx.factory.begin() as session:
            for d in session.scalars(select(Delivery).where(Delivery.job_id == job.id, Delivery.state == "pending")):
                d.attempts += 1
                d.last_error = str(exc)
        raise RetryableError(str(exc)) from exc
    failed = []
    with ctx.factory.begin() as session:
        rows = {d.sop_instance_uid: d for d in session.scalars(select(Delivery).where(Delivery.job_id == job.id))}
        for uid, out in outcomes.items():
            d = rows[uid]
            d.attempts += 1
            d.status = out.status
            d.last_error = out.error
            if out.ok:
                d.state = "done"
            else:
                failed.append(f"{uid}: {out.error}")
    sent = sum(1 for o in outcomes.values() if o.ok)
    log.info("job %d: %d of %d instances delivered to %s", job.id, sent, len(todo), name)
    if failed:
        raise RetryableError(f"{len(failed)} of {len(todo)} instances not accepted by {name}; first: {failed[0]}")
    return {"destination": name, "sent": sent, "skipped": len(instances) - len(todo)}


@action("analyze")
def analyze(job: Job, ctx: WorkerContext) -> dict:
    """Run the job's pipeline on the series and queue its result objects for delivery."""
    try:
        from dicom_node import analysis
    except ImportError as exc:  # the AI core is optional at this layer
        raise PermanentError(f"pipeline not installed: {exc}") from exc
    return analysis.run_analyze_job(job, ctx)
