"""The instance index: batched upserts of received instances, and its rebuild from the files."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.filestore import FileStore
from storage.models import AuditEvent, Instance, Meta, Series, Study, utcnow

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "index_checkpoint"


@dataclass(frozen=True)
class InstanceRecord:
    """What the index needs to know about one stored instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    relpath: str
    size: int
    modality: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    peer_host: str | None = None
    received_at: datetime = field(default_factory=utcnow)
    is_result: bool = False
    source_series_uid: str | None = None


@dataclass
class IndexOutcome:
    """Series touched by a batch: which are new and which re-opened after completion."""

    new_series: list[str] = field(default_factory=list)
    reopened: list[str] = field(default_factory=list)


def _index_batch(session: Session, records: list[InstanceRecord]) -> IndexOutcome:
    outcome = IndexOutcome()
    study_uids = {r.study_uid for r in records}
    known_studies = set(session.scalars(select(Study.study_instance_uid)
                                        .where(Study.study_instance_uid.in_(study_uids))))
    for uid in sorted(study_uids - known_studies):
        session.add(Study(study_instance_uid=uid))

    series_uids = {r.series_uid for r in records}
    series = {s.series_instance_uid: s for s in session.scalars(
        select(Series).where(Series.series_instance_uid.in_(series_uids)))}
    sop_uids = [r.sop_uid for r in records]
    existing = {i.sop_instance_uid: i for i in session.scalars(
        select(Instance).where(Instance.sop_instance_uid.in_(sop_uids)))}

    for r in records:
        s = series.get(r.series_uid)
        if s is None:
            s = Series(series_instance_uid=r.series_uid, study_instance_uid=r.study_uid,
                       modality=r.modality, calling_ae=r.calling_ae, called_ae=r.called_ae,
                       peer_host=r.peer_host, first_received=r.received_at, last_received=r.received_at,
                       is_result=r.is_result, source_series_uid=r.source_series_uid,
                       state="complete" if r.is_result else "receiving")
            session.add(s)
            series[r.series_uid] = s
            outcome.new_series.append(r.series_uid)
        else:
            if s.state != "receiving" and not s.is_result:
                # new data after completion: re-open; the next completion routes it again
                s.state = "receiving"
                s.generation += 1
                outcome.reopened.append(r.series_uid)
                session.add(AuditEvent(event="series_reopened", series_instance_uid=r.series_uid,
                                       detail={"generation": s.generation}))
            if r.received_at > s.last_received:
                s.last_received = r.received_at
        inst = existing.get(r.sop_uid)
        if inst is None:
            inst = Instance(sop_instance_uid=r.sop_uid, sop_class_uid=r.sop_class_uid,
                            transfer_syntax_uid=r.transfer_syntax_uid, path=r.relpath, size=r.size,
                            received_at=r.received_at)
            inst.series = s
            session.add(inst)
            existing[r.sop_uid] = inst
        else:
            inst.path, inst.size, inst.received_at = r.relpath, r.size, r.received_at
            inst.sop_class_uid, inst.transfer_syntax_uid = r.sop_class_uid, r.transfer_syntax_uid
            if inst.series_id != s.id:
                inst.series = s
    return outcome


def index_instances(factory: sessionmaker[Session], records: list[InstanceRecord]) -> IndexOutcome:
    """Insert or update a batch of instances (with their studies and series) in one transaction."""
    for attempt in range(3):
        try:
            with factory.begin() as session:
                return _index_batch(session, records)
        except IntegrityError:
            # another node process inserted the same study/series concurrently: retry once it is visible
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def set_checkpoint(factory: sessionmaker[Session], when: datetime) -> None:
    """Record that every file written before ``when`` is indexed."""
    with factory.begin() as session:
        row = session.get(Meta, CHECKPOINT_KEY)
        if row is None:
            session.add(Meta(key=CHECKPOINT_KEY, value=when.isoformat()))
        else:
            row.value = when.isoformat()


def get_checkpoint(factory: sessionmaker[Session]) -> datetime | None:
    """When the index was last known to be complete."""
    with factory() as session:
        row = session.get(Meta, CHECKPOINT_KEY)
        return datetime.fromisoformat(row.value) if row else None


def record_from_file(store: FileStore, path: Path) -> InstanceRecord | None:
    """Read the header of a stored file into an index record (None if it is not readable DICOM)."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
        rel = path.relative_to(store.root).as_posix()
        return InstanceRecord(
            study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
            sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), relpath=rel,
            size=path.stat().st_size, modality=ds.get("Modality"),
            received_at=datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))
    except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
        log.error("file store: %s is not a readable DICOM file (%s); moved aside", path, exc)
        return None


def rebuild_index(factory: sessionmaker[Session], store: FileStore, *, full: bool = False,
                  margin_s: float = 120.0) -> int:
    """Index files the database does not know (after a crash); returns how many were added.

    Only series directories modified since the last checkpoint (minus a margin) are scanned,
    unless ``full`` is set.
    """
    started = utcnow()
    checkpoint = None if full else get_checkpoint(factory)
    since = checkpoint.timestamp() - margin_s if checkpoint else None
    dirs = store.series_dirs(modified_since=since)
    store.recover_temporaries(dirs)
    added = 0
    for d in dirs:
        files = [p for p in d.glob("*.dcm")]
        if not files:
            continue
        rels = [p.relative_to(store.root).as_posix() for p in files]
        with factory() as session:
            known = set(session.scalars(select(Instance.path).where(Instance.path.in_(rels))))
        missing = [p for p, rel in zip(files, rels) if rel not in known]
        records = [r for r in (record_from_file(store, p) for p in missing) if r is not None]
        if records:
            index_instances(factory, records)
            added += len(records)
    if added:
        log.warning("index rebuilt from the file store: %d instances were on disk but not indexed", added)
    set_checkpoint(factory, started)
    return added
