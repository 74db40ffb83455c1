"""Latency of the whole path, modality → node → AI → PACS, with the demo models on the CPU.

A 300-slice 512×512 phantom study is sent with storescu to the node; Orthanc is the PACS. Measures
from the last image acknowledged to the SR acknowledged by Orthanc, split into waiting for
completion (stable_after), queueing, analysis stages, encoding and delivery; and the ingest rate of
a second study sent during the analysis compared with ingest when the node is idle.

    python benchmarks/latency.py [--slices 300] [--size 512] [--stable-after 2]

Last line: ``latency_s=X stable_after_s=Y ingest_during_job/idle=R``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import select  # noqa: E402

from ai_core.phantom.generator import generate_case, write_case  # noqa: E402
from benchmarks.ingest import copies  # noqa: E402
from benchmarks.workdir import run_in_workdir  # noqa: E402
from storage.db import make_engine, session_factory  # noqa: E402
from storage.models import AuditEvent, Delivery, Job, Result  # noqa: E402
from tests.nodeproc import NodeProcess  # noqa: E402
from tests.peers import Orthanc, storescu  # noqa: E402


def _send(port: int, files: list[Path]) -> tuple[float, float]:
    """storescu the files; returns (images/s, wall time when the last image was acknowledged)."""
    t0 = time.perf_counter()
    storescu(port, files, calling="CT_SCANNER", timeout=900)
    return len(files) / (time.perf_counter() - t0), time.time()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--stable-after", type=float, default=2.0)
    ap.add_argument("--keep", action="store_true", help="keep the working directory (about 1 GB)")
    args = ap.parse_args()
    return run_in_workdir("ctvlp-latency-", args, run)


def run(args: argparse.Namespace, work: Path) -> int:
    """Send the phantom, measure each stage, print the table and the last line."""
    spacing = (360 / args.size, 360 / args.size, 1.5)
    print(f"generating a {args.slices}-slice {args.size}x{args.size} phantom ...", flush=True)
    case = generate_case(7, spacing=spacing, size=(args.size, args.size, args.slices))
    truth = write_case(case, work / "phantom")
    files = sorted((truth.parent / "series").glob("*.dcm"))
    idle_copy, busy_copy = copies(files, work / "copies", 2)

    with Orthanc(work / "orthanc", aet="ORTHANC") as orthanc, NodeProcess(
            work / "node", stable_after=args.stable_after,
            destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
                                   "results": ["seg", "sr", "sc"]}},
            rules=[{"name": "ct-ai", "match": {"Modality": "CT", "SeriesInstanceUID": str(case.series_uid)},
                    "analyze": "default", "results_to": ["pacs"]}],
            extra={"pipelines": {"default": {"device": "cpu"}}}) as node:
        node.wait_for(lambda: "pipeline loaded" in node.log(), timeout=300, what="the worker's models to load")
        _, t_last = _send(node.port, files)
        node.wait_for(lambda: node.status()["jobs"].get("analyze/running"), timeout=600, interval=0.1,
                      what="the analysis to start")
        busy_rate, _ = _send(node.port, busy_copy)
        node.wait_for(lambda: node.status()["jobs"].get("forward/done"), timeout=1800, interval=0.5,
                      what="results delivered")
        # idle: models loaded, no job; the copies are not analysed (the rule names the phantom series)
        idle_rate, _ = _send(node.port, idle_copy)
        factory = session_factory(make_engine(f"sqlite:///{node.data_dir / 'node.sqlite'}"))
        with factory() as s:
            ev = {e.event: e.at for e in s.scalars(select(AuditEvent).where(
                AuditEvent.series_instance_uid == case.series_uid).order_by(AuditEvent.id))}
            analyze = s.scalar(select(Job).where(Job.kind == "analyze"))
            forward = s.scalar(select(Job).where(Job.kind == "forward", Job.series_instance_uid == case.series_uid))
            sr_uid = s.scalar(select(Result.sop_instance_uid).where(Result.kind == "sr"))
            sr_delivered = s.scalar(select(Delivery.updated_at).where(Delivery.sop_instance_uid == sr_uid))
    last = datetime.fromtimestamp(t_last, timezone.utc)
    timings = (analyze.result or {}).get("timings", {})
    rows = [
        ("wait for completion", (ev["series_complete"] - last).total_seconds()),
        ("queue (analysis)", (analyze.started_at - ev["series_complete"]).total_seconds()),
    ]
    rows += [(f"  {k}", v) for k, v in timings.items()]
    rows += [
        ("analysis job total", (analyze.finished_at - analyze.started_at).total_seconds()),
        ("queue (delivery)", (forward.started_at - analyze.finished_at).total_seconds()),
        ("delivery to SR ack", (sr_delivered - forward.started_at).total_seconds()),
    ]
    latency = (sr_delivered - last).total_seconds()
    print(f"{'stage':28} seconds")
    for name, sec in rows:
        print(f"{name:28} {sec:8.2f}")
    print(f"{'total (last image -> SR ack)':28} {latency:8.2f}")
    print(f"ingest idle {idle_rate:.0f} img/s, during analysis {busy_rate:.0f} img/s")
    print(f"latency_s={latency:.1f} stable_after_s={args.stable_after:g} ingest_during_job/idle={busy_rate / idle_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
