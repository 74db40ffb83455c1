"""The indexer's core-SQL batch writes what the ORM upsert writes, and leaves it the unusual batches."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from dicom_node.indexer import Indexer, index_new_instances
from storage.db import open_database
from storage.index import InstanceRecord, index_instances
from storage.models import Instance, Series, Study, utcnow


def _rec(i: int, series: str = "1.2.3.1", study: str = "1.2.3", at=None) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=series, sop_uid=f"{series}.{i}",
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                          relpath=f"{study}/{series}/{series}.{i}.dcm", size=100 + i, modality="CT",
                          calling_ae="SCU", called_ae="CTVLP", peer_host="127.0.0.1",
                          received_at=at or utcnow())


def _snapshot(factory) -> tuple:
    with factory() as s:
        studies = sorted(s.scalars(select(Study.study_instance_uid)))
        series = sorted((x.series_instance_uid, x.study_instance_uid, x.modality, x.calling_ae, x.called_ae,
                         x.peer_host, x.state, x.generation, x.is_result, x.first_received, x.last_received)
                        for x in s.scalars(select(Series)))
        instances = sorted((i.sop_instance_uid, i.series.series_instance_uid, i.sop_class_uid,
                            i.transfer_syntax_uid, i.path, i.size, i.received_at)
                           for i in s.scalars(select(Instance)))
    return studies, series, instances


def test_core_batches_match_the_orm_upsert(database_url, tmp_path):
    _, fast = open_database(database_url)
    _, orm = open_database(f"sqlite:///{tmp_path / 'orm.sqlite'}")
    t0 = utcnow()
    batches = [
        [_rec(i, at=t0 + timedelta(seconds=i)) for i in range(5)] + [_rec(0, "1.2.4.1", "1.2.4", at=t0)],
        [_rec(i, at=t0 + timedelta(seconds=i)) for i in range(5, 9)],  # the same series grows
    ]
    for batch in batches:
        out = index_new_instances(fast, batch)
        assert out is not None
        assert out.new_series == index_instances(orm, batch).new_series
    assert _snapshot(fast) == _snapshot(orm)
    assert len(_snapshot(fast)[2]) == 10


def test_unusual_batches_are_left_to_the_orm(database_url):
    _, factory = open_database(database_url)
    assert index_new_instances(factory, [_rec(0), _rec(1)]).new_series == ["1.2.3.1"]
    before = _snapshot(factory)
    assert index_new_instances(factory, [_rec(2), _rec(1)]) is None  # re-sent instance
    assert index_new_instances(factory, [_rec(3), _rec(3)]) is None  # twice in one batch
    assert _snapshot(factory) == before  # nothing half-written
    with factory.begin() as s:
        s.scalar(select(Series)).state = "complete"
    assert index_new_instances(factory, [_rec(4)]) is None  # re-opens: the ORM path audits it


def test_indexer_thread_uses_both_paths(database_url):
    _, factory = open_database(database_url)
    indexer = Indexer(factory, max_delay=0.01).start()
    try:
        for i in range(20):
            indexer.submit(_rec(i))
        assert indexer.flush(10)
        indexer.submit(_rec(3))  # re-sent: through index_instances
        assert indexer.flush(10)
    finally:
        indexer.stop()
    with factory() as s:
        assert len(s.scalars(select(Instance)).all()) == 20
