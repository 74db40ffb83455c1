"""Storage against real databases: SQLite (WAL) and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import inspect, select, text

from dicom_node import jobs
from storage.db import open_database
from storage.filestore import FileStore
from storage.index import InstanceRecord, index_instances, rebuild_index
from storage.models import Instance, Job, Series, utcnow


def _rec(i: int, series: str = "1.2.3.1", study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=series, sop_uid=f"1.2.3.1.{i}",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                          relpath=f"{study}/{series}/1.2.3.1.{i}.dcm", size=100 + i, modality="CT")


def test_migrations_create_every_table(database_url):
    engine, _ = open_database(database_url)
    tables = set(inspect(engine).get_table_names())
    assert {"studies", "series", "instances", "jobs", "deliveries", "results", "audit_log", "meta",
            "alembic_version"} <= tables
    if engine.dialect.name == "sqlite":
        with engine.connect() as c:
            assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    # applying again is a no-op
    open_database(database_url)


def test_index_upserts_and_reopens_completed_series(database_url):
    _, factory = open_database(database_url)
    out = index_instances(factory, [_rec(i) for i in range(10)])
    assert out.new_series == ["1.2.3.1"]
    # same instances again (re-sent): no duplicates
    index_instances(factory, [_rec(i) for i in range(10)])
    with factory() as s:
        assert s.scalar(select(Instance).where(Instance.sop_instance_uid == "1.2.3.1.3")).size == 103
        assert len(s.scalars(select(Instance)).all()) == 10
    with factory.begin() as s:
        s.scalar(select(Series)).state = "complete"
    out = index_instances(factory, [_rec(10)])
    assert out.reopened == ["1.2.3.1"]
    with factory() as s:
        series = s.scalar(select(Series))
        assert (series.state, series.generation, len(series.instances)) == ("receiving", 2, 11)


def test_claim_is_atomic_across_concurrent_workers(database_url):
    _, factory = open_database(database_url)
    with factory.begin() as s:
        for i in range(20):
            jobs.enqueue(s, "forward", f"1.2.{i}", params={"destination": "x"})
    claimed: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while (job := jobs.claim(factory, f"w{n}", lease=60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 21))  # every job exactly once


def test_failed_attempts_back_off_then_fail_visibly_and_retry_requeues(database_url):
    _, factory = open_database(database_url)
    with factory.begin() as s:
        job_id = jobs.enqueue(s, "forward", "1.2.9", max_attempts=2).id
    job = jobs.claim(factory, "w", lease=60)
    assert jobs.fail(factory, job.id, "peer down", base=10, cap=100) == "queued"
    assert jobs.claim(factory, "w", lease=60) is None  # not before the backoff expires
    with factory() as s:
        j = s.get(Job, job_id)
        assert timedelta(seconds=9) < j.not_before - utcnow() <= timedelta(seconds=10)
    with factory.begin() as s:
        s.get(Job, job_id).not_before = utcnow()
    jobs.claim(factory, "w", lease=60)
    assert jobs.fail(factory, job_id, "peer still down", base=10, cap=100) == "failed"
    assert [j.id for j in jobs.list_jobs(factory, failed_only=True)] == [job_id]
    jobs.retry(factory, job_id)
    assert jobs.claim(factory, "w", lease=60).id == job_id


def test_running_job_of_a_dead_worker_is_taken_over_after_its_lease(database_url):
    _, factory = open_database(database_url)
    with factory.begin() as s:
        jobs.enqueue(s, "analyze", "1.2.10")
    job = jobs.claim(factory, "dead-worker", lease=60)
    assert jobs.claim(factory, "other", lease=60) is None
    with factory.begin() as s:
        s.get(Job, job.id).heartbeat_at = utcnow() - timedelta(seconds=120)
    again = jobs.claim(factory, "other", lease=60)
    assert again.id == job.id and again.attempts == 2 and again.worker == "other"
    assert not jobs.heartbeat(factory, job.id, "dead-worker")


def test_index_is_rebuilt_from_files_after_a_crash(database_url, tmp_path):
    from ai_core.phantom.series import make_ct_series

    _, factory = open_database(database_url)
    store = FileStore(tmp_path / "files")
    files = make_ct_series(tmp_path / "ct", n_slices=4, rows=32, cols=32)
    from pydicom import dcmread

    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        store.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, f.read_bytes())
    # a complete temporary whose rename was lost, and a partial one that was never acknowledged
    ds = dcmread(files[0], stop_before_pixels=True)
    series_dir = store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID
    data = files[1].read_bytes()
    (series_dir / f"{ds.SOPInstanceUID}.dcm").unlink()
    (series_dir / f".{ds.SOPInstanceUID}.dcm.{len(files[0].read_bytes())}.abcd.tmp").write_bytes(files[0].read_bytes())
    (series_dir / f".1.2.3.999.dcm.{len(data)}.ef01.tmp").write_bytes(data[:1000])
    assert rebuild_index(factory, store) == 4
    assert not list(series_dir.glob(".*.tmp"))
    with factory() as s:
        assert len(s.scalars(select(Instance)).all()) == 4
    assert rebuild_index(factory, store, full=True) == 0  # idempotent


def test_retention_removes_old_idle_series_and_keeps_busy_and_recent_ones(database_url, tmp_path):
    from dicom_node.retention import apply_retention

    _, factory = open_database(database_url)
    store = FileStore(tmp_path / "files")
    for series in ("1.2.3.1", "1.2.3.2", "1.2.3.3"):
        recs = []
        for i in range(3):
            sf = store.write("1.2.3", series, f"{series}.{i}", b"data" * 10)
            recs.append(InstanceRecord(study_uid="1.2.3", series_uid=series, sop_uid=f"{series}.{i}",
                                       sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                       transfer_syntax_uid="1.2.840.10008.1.2.1", relpath=sf.relpath,
                                       size=sf.size))
        index_instances(factory, recs)
    old = utcnow() - timedelta(days=40)
    with factory.begin() as s:
        for series in s.scalars(select(Series)):
            series.state = "complete"
            if series.series_instance_uid != "1.2.3.3":
                series.last_received = old
        jobs.enqueue(s, "forward", "1.2.3.2")  # still queued: keep
    assert apply_retention(factory, store, received_days=30, result_days=365) == 1
    with factory() as s:
        assert sorted(s.scalars(select(Series.series_instance_uid))) == ["1.2.3.2", "1.2.3.3"]
        assert len(s.scalars(select(Instance)).all()) == 6
    assert not (store.root / "1.2.3" / "1.2.3.1").exists()
    assert apply_retention(factory, store, received_days=0, result_days=0) == 0  # 0 keeps forever


def test_jobs_of_dead_workers_on_this_host_are_requeued_at_start(database_url):
    import os
    import socket
    import subprocess

    _, factory = open_database(database_url)
    with factory.begin() as s:
        jobs.enqueue(s, "analyze", "1.2.20")
        jobs.enqueue(s, "analyze", "1.2.21")
    dead = subprocess.Popen(["true"])
    dead.wait()
    jobs.claim(factory, f"{socket.gethostname()}:{dead.pid}", lease=3600)  # its worker died
    jobs.claim(factory, f"{socket.gethostname()}:{os.getpid()}", lease=3600)  # alive: keep
    assert jobs.requeue_orphans(factory) == 1
    again = jobs.claim(factory, "new-worker", lease=3600)
    assert again is not None and again.series_instance_uid == "1.2.20"
