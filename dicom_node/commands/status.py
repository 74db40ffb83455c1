"""``dicom-node status``: listening state, series by state, queue depth, failures."""

from __future__ import annotations

import json

from dicom_node.commands._common import add_config_argument, config_from, open_db

NAME = "status"
HELP = "show whether the node listens, series by state, queue depth and failures"


def add_arguments(parser) -> None:
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _listening(ae_title: str, host: str, port: int) -> bool:
    """True when a DICOM node answers on the port (an accepted or a rejected association both count).

    A bare TCP connection would hold one of the node's association slots until its ACSE timeout;
    a real A-ASSOCIATE is answered at once.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="CTVLP_STATUS")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 3
    assoc = ae.associate("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, ae_title=ae_title)
    if assoc.is_established:
        assoc.release()
        return True
    return bool(assoc.is_rejected)


def collect(config, factory=None) -> dict:
    """The status as a dict (also used by tests and the demo)."""
    from sqlalchemy import func, select

    from dicom_node.jobs import age
    from storage.models import Delivery, Job, Meta, Series

    factory = factory or open_db(config)
    with factory() as s:
        series = dict(s.execute(select(Series.state, func.count()).group_by(Series.state)).all())
        job_states = {f"{k}/{st}": n for k, st, n in s.execute(
            select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)).all()}
        deliveries = dict(s.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        failed = [{"id": j.id, "kind": j.kind, "series": j.series_instance_uid, "error": (j.last_error or "")[:200]}
                  for j in s.scalars(select(Job).where(Job.state == "failed").order_by(Job.id.desc()).limit(10))]
        beat = s.get(Meta, "node_heartbeat")
    return {
        "listeners": [{"ae_title": l.ae_title, "host": l.host, "port": l.port,
                       "listening": _listening(l.ae_title, l.host, l.port)} for l in config.listeners],
        "node": json.loads(beat.value) | {"age": age(beat.updated_at)} if beat else None,
        "series": series,
        "jobs": job_states,
        "queue_depth": sum(n for k, n in job_states.items() if k.endswith(("/queued", "/running"))),
        "deliveries": deliveries,
        "failed_jobs": failed,
    }


def run(args) -> int:
    st = collect(config_from(args))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    for l in st["listeners"]:
        print(f"listener {l['ae_title']}@{l['host']}:{l['port']}: {'listening' if l['listening'] else 'NOT listening'}")
    if st["node"]:
        print(f"node process: pid {st['node']['pid']} on {st['node']['host']}, last heartbeat {st['node']['age']} ago")
    print("series:     " + (", ".join(f"{k} {v}" for k, v in sorted(st["series"].items())) or "none"))
    print("jobs:       " + (", ".join(f"{k} {v}" for k, v in sorted(st["jobs"].items())) or "none"))
    print(f"queue:      {st['queue_depth']} queued or running")
    print("deliveries: " + (", ".join(f"{k} {v}" for k, v in sorted(st["deliveries"].items())) or "none"))
    for f in st["failed_jobs"]:
        print(f"FAILED job {f['id']} ({f['kind']} {f['series']}): {f['error'].splitlines()[0] if f['error'] else ''}")
    return 0
