"""The ``analyze`` job: run an AI pipeline on a series, store its SEG/SR/SC, queue their delivery.

Results are stored and indexed like received instances (new series in the original study) and
sent through the same ``forward`` jobs, so they get the same retries and visible failures.
A series analysed again gets new objects whose SR names the previous SR as its predecessor; the
previous results are marked superseded. The same source instances analysed again by the same
model reuse the existing results instead of making duplicates.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from pydicom import dcmread
from sqlalchemy import select

from dicom_node import jobs
from dicom_node.actions import PermanentError, WorkerContext
from storage.index import InstanceRecord, index_instances
from storage.models import Instance, Job, Result, Series

if TYPE_CHECKING:  # the AI side is imported only by workers that analyse
    from ai_core.encode.parallel import EncodedBytes
    from storage.filestore import StoredFile

log = logging.getLogger(__name__)


def _pipeline(ctx: WorkerContext, name: str):
    """The loaded pipeline for a config name, kept in the worker between jobs."""
    key = f"pipeline:{name}"
    if key not in ctx.cache:
        settings = ctx.config.pipelines.get(name)
        if settings is None:
            raise PermanentError(f"pipeline {name!r} is not configured (known: {sorted(ctx.config.pipelines)})")
        try:
            from ai_core.pipeline import Pipeline, PipelineError, PipelineSettings
        except ImportError as exc:
            raise PermanentError(f"pipeline not installed: {exc}") from exc
        try:
            ctx.cache[key] = Pipeline(PipelineSettings.from_mapping(settings.model_dump()))
        except PipelineError as exc:  # a setting the user can fix (device, model path ...)
            raise PermanentError(f"pipeline {name!r}: {exc}") from exc
    return ctx.cache[key]


def _identity(pipeline) -> str:
    """What makes results of the same instances reusable: the model and segmenter identities."""
    m, sg = pipeline.model_info, pipeline.segmenter_info
    return f"{m.name} {m.version} {m.spec_hash} | {sg.name} {sg.version} {sg.spec_hash}"


def _digest(instances: list[Instance], model_label: str) -> str:
    h = hashlib.sha256(model_label.encode())
    for i in sorted(instances, key=lambda i: i.sop_instance_uid):
        h.update(f"{i.sop_instance_uid}:{i.size};".encode())
    return h.hexdigest()


def run_analyze_job(job: Job, ctx: WorkerContext) -> dict:
    """Analyse the job's series and queue the results for the destinations named by the rule."""
    params = job.params or {}
    name = params.get("pipeline", "default")
    results_to = list(params.get("results_to", []))
    for d in results_to:
        if d not in ctx.config.destinations:
            raise PermanentError(f"results destination {d!r} is not configured")
    pipeline = _pipeline(ctx, name)

    with ctx.factory() as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == job.series_instance_uid))
        if series is None:
            raise PermanentError(f"series {job.series_instance_uid} is not in the index")
        instances = list(series.instances)
        files = [ctx.store.path(i.path) for i in instances]
        digest = _digest(instances, _identity(pipeline))
        previous = s.scalars(select(Result).where(Result.source_series_uid == job.series_instance_uid,
                                                  Result.superseded_by.is_(None))).all()
    same = [r for r in previous if r.source_digest == digest]
    if same:
        log.info("job %d: series %s unchanged since its last analysis; reusing %d result objects", job.id,
                 job.series_instance_uid, len(same))
        _queue_deliveries(ctx, job, {r.kind: r.sop_instance_uid for r in same}, results_to)
        return {"reused": True, "objects": {r.kind: r.sop_instance_uid for r in same}}

    result = pipeline.analyze(files)
    with ctx.factory() as s:
        if s.get(Job, job.id).superseded:  # the series grew while we analysed it: a newer job covers it
            log.info("job %d: series %s changed during the analysis; results discarded", job.id,
                     job.series_instance_uid)
            return {"superseded": True, "objects": {}}
    if result.refused:
        # The job records why, visibly; the report and summary tell the radiologist too (below).
        log.warning("job %d: series %s cannot be analysed safely: %s", job.id, job.series_instance_uid,
                    result.refused)
        with ctx.factory.begin() as s:
            jobs.audit(s, "analysis_refused", job.series_instance_uid, job.id, reason=result.refused)
    kinds = {"seg", "sr"} | {k for d in results_to for k in ctx.config.destinations[d].results}
    predecessor = None
    prev_sr = next((r for r in previous if r.kind == "sr"), None)
    if prev_sr is not None:
        with ctx.factory() as s:
            inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == prev_sr.sop_instance_uid))
        if inst is not None:
            predecessor = dcmread(ctx.store.path(inst.path))
    from ai_core.encode import encode_to_bytes

    device = f"{ctx.config.listeners[0].ae_title} ct-vlp-dicom-node"
    analysis_timings = dict(result.timings)  # the encoder adds its own keys (and its own "encode")
    written: list[tuple[str, EncodedBytes, StoredFile]] = []

    def keep(kind: str, encoded: EncodedBytes) -> None:
        # each object goes to the file store as soon as it is ready; the SR (built in a forked
        # child beside the SEG and SC) arrives as the bytes the child encoded
        written.append((kind, encoded, ctx.store.write(encoded.study_uid, encoded.series_uid, encoded.sop_uid,
                                                     encoded.data)))

    try:
        encode_to_bytes(result, keep, kinds=sorted(kinds), device_name=device, predecessor_sr=predecessor)
    except ValueError as exc:
        if not result.refused:
            raise
        # e.g. images without positions: nothing a report could point into; the job says why
        log.warning("job %d: no report for the refused series %s: %s", job.id, job.series_instance_uid, exc)
        return {"refused": result.refused, "objects": {}}
    timings = {**analysis_timings, "dicom_encode": result.timings.get("encode", 0.0)}
    stored = _index_results(ctx, job, written, digest, previous)
    _queue_deliveries(ctx, job, stored, results_to)
    present = [f"{f.organ}:{f.finding}" for f in result.findings if f.decision == "present"]
    return {"objects": stored, "refused": result.refused, "present": present,
            "timings": {k: round(v, 3) for k, v in timings.items()}}


def _index_results(ctx: WorkerContext, job: Job, files: list[tuple[str, EncodedBytes, StoredFile]], digest: str,
                   previous: list[Result]) -> dict:
    """Index stored result objects, record their Result rows, supersede the old ones."""
    records, uids = [], {}
    for kind, enc, sf in files:
        records.append(InstanceRecord(
            study_uid=enc.study_uid, series_uid=enc.series_uid, sop_uid=enc.sop_uid,
            sop_class_uid=enc.sop_class_uid, transfer_syntax_uid=enc.transfer_syntax_uid, relpath=sf.relpath,
            size=sf.size, modality=enc.modality, is_result=True, source_series_uid=job.series_instance_uid))
        uids[kind] = enc.sop_uid
    index_instances(ctx.factory, records)
    with ctx.factory.begin() as s:
        new_rows = {}
        for kind, enc, _ in files:
            row = Result(job_id=job.id, source_series_uid=job.series_instance_uid, kind=kind,
                         sop_instance_uid=uids[kind], series_instance_uid=enc.series_uid,
                         source_digest=digest)
            s.add(row)
            new_rows[kind] = row
        s.flush()
        for old in previous:
            row = s.get(Result, old.id)
            row.superseded_by = (new_rows.get(old.kind) or next(iter(new_rows.values()))).id
        if previous:
            jobs.audit(s, "results_superseded", job.series_instance_uid, job.id, count=len(previous))
        jobs.audit(s, "results_stored", job.series_instance_uid, job.id, objects=sorted(uids))
    return uids


def _queue_deliveries(ctx: WorkerContext, job: Job, objects: dict[str, str], results_to: list[str]) -> None:
    """One forward job per destination with the result kinds that destination wants."""
    wc = ctx.config.workers
    with ctx.factory.begin() as s:
        for name in results_to:
            wanted = [uid for kind, uid in objects.items() if kind in ctx.config.destinations[name].results]
            if wanted:
                jobs.enqueue(s, "forward", job.series_instance_uid, generation=job.generation,
                             params={"destination": name, "sop_instance_uids": wanted, "results_of": job.id},
                             max_attempts=wc.max_attempts)
