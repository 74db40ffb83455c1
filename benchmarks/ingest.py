"""Ingest and export throughput of the node against dcmtk storescp and Orthanc, in one run.

Sends the same 300-slice 512×512 CT series with storescu (TCP_NODELAY=1, same max PDU for all) to
the node, to storescp and to Orthanc: once over one association, once as four concurrent
associations (four copies with distinct UIDs). Then exports the series from the node (its own
SCU code, over ``--export-associations`` associations) and from Orthanc (REST
/modalities/.../store, one association) to a storescp that forks a child per association.

    python benchmarks/ingest.py [--slices 300] [--size 512] [--keep] [--receive-processes 2]
                                [--export-associations 1]

Its working directory (~5 GB for 300 slices: sources, copies and what each peer stored) is removed
at the end unless ``--keep`` is given.

Prints images/s for each and, last, one line:
``ingest node/orthanc=R1 ingest4 node/orthanc=R2 node/storescp=R3 export node/orthanc=R4``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from ai_core.phantom.series import make_ct_series  # noqa: E402
from benchmarks.workdir import run_in_workdir  # noqa: E402
from tests.nodeproc import NodeProcess  # noqa: E402
from tests.peers import PEER_ENV, Orthanc, StoreSCP, require_tool  # noqa: E402

MAX_PDU = 131072


def copies(src: list[Path], out: Path, n: int) -> list[list[Path]]:
    """n copies of a series with fresh Study/Series/SOP Instance UIDs."""
    result = []
    for c in range(n):
        study, series = generate_uid(), generate_uid()
        d = out / f"copy{c}"
        d.mkdir(parents=True)
        files = []
        for i, f in enumerate(src):
            ds = dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            p = d / f"{i:04d}.dcm"
            ds.save_as(p, enforce_file_format=True)
            files.append(p)
        result.append(files)
    return result


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live children (Linux /proc): the node's
    receiver processes count as the node."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except FileNotFoundError:  # exited meanwhile (a child): its time is no longer the node's to count
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(c) for c in children)


def send(port: int, aet: str, series: list[list[Path]]) -> float:
    """Send each series over its own concurrent storescu association; returns images/s."""
    binary = require_tool("storescu")
    t0 = time.perf_counter()
    procs = [subprocess.Popen([binary, "-aet", "BENCH", "-aec", aet, "--max-pdu", str(MAX_PDU), "-nh",
                               "127.0.0.1", str(port), *map(str, s)], env=PEER_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for s in series]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"storescu to {aet} failed: {err.decode()[-500:]}")
    return sum(len(s) for s in series) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    ap.add_argument("--receive-processes", type=int, default=0,
                    help="the node's network.receive_processes (default 0, as the node's default: the node "
                         "process receives; N: N receiver processes)")
    ap.add_argument("--export-associations", type=int, default=1,
                    help="the export destination's associations (default 1, as the node's default)")
    args = ap.parse_args()
    return run_in_workdir("ctvlp-bench-", args, run)


def run(args: argparse.Namespace, work: Path) -> int:
    """Prepare the series, run every measure, print the table and the ratios."""
    src = make_ct_series(work / "src", n_slices=args.slices, rows=args.size, cols=args.size, seed=1)
    one = copies(src, work / "one", 3)  # one copy per target: every target receives new UIDs
    four = [copies(src, work / f"four{t}", 4) for t in range(3)]
    n = len(src)
    print(f"series: {n} slices {args.size}x{args.size}, {sum(f.stat().st_size for f in src) / 2**20:.0f} MB; "
          f"max PDU {MAX_PDU}; node receive_processes {args.receive_processes}; "
          f"export associations {args.export_associations}")
    results: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}  # CPU time of the receiving process per image
    # the export target forks a child per association, as a PACS serves associations at once
    with StoreSCP(work / "scp", max_pdu=MAX_PDU) as scp, \
            StoreSCP(work / "export", aet="EXPORTSCP", max_pdu=MAX_PDU, extra_args=["--fork"]) as xscp, Orthanc(
            work / "orthanc", aet="ORTHANC", modalities={"SCP": (xscp.aet, "127.0.0.1", xscp.port)}) as orthanc, \
            NodeProcess(work / "node", stable_after=30, workers=0,
                        destinations={"scp": {"ae_title": xscp.aet, "host": "127.0.0.1", "port": xscp.port,
                                              "associations": args.export_associations}},
                        extra={"network": {"receive_processes": args.receive_processes}}) as node:
        targets = {"node": (node.port, node.ae_title, node.proc.pid), "storescp": (scp.port, scp.aet, scp.proc.pid),
                   "orthanc": (orthanc.dicom_port, orthanc.aet, orthanc.proc.pid)}
        for kind, data in (("ingest1", one), ("ingest4", four)):
            for i, (label, (port, aet, pid)) in enumerate(targets.items()):
                series = data[i] if kind == "ingest4" else [data[i]]
                os.sync()  # no dirty pages of the copies or of the previous measure: they would be
                #            written back during this one, into the fsyncs of whoever runs now
                before = cpu_seconds(pid)
                results[f"{kind}/{label}"] = send(port, aet, series)
                time.sleep(0.6)  # the node's index batches land within 0.5 s: count them too
                cpu_ms[f"{kind}/{label}"] = 1000 * (cpu_seconds(pid) - before) / sum(len(x) for x in series)
        assert len(node.files()) == 5 * n, f"node stored {len(node.files())} of {5 * n}"

        # export: node's SCU code path vs Orthanc's C-STORE SCU, both to storescp
        from dicom_node.config import load_config
        from dicom_node.send import Outgoing, send_files

        cfg = load_config(node.config_path)
        ds0 = dcmread(one[0][0], stop_before_pixels=True)
        stored = sorted((node.data_dir / "files" / ds0.StudyInstanceUID / ds0.SeriesInstanceUID).glob("*.dcm"))
        items = []
        for p in stored:
            d = dcmread(p, stop_before_pixels=True)
            items.append(Outgoing(d.SOPInstanceUID, d.SOPClassUID, d.file_meta.TransferSyntaxUID, p))
        os.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = send_files(cfg.destinations["scp"], items, calling_ae="CTVLP")
        results["export/node"] = len(items) / (time.perf_counter() - t0)
        cpu_ms["export/node"] = 1000 * (time.process_time() - c0) / len(items)
        assert all(o.ok for o in out.values())

        ds2 = dcmread(one[2][0], stop_before_pixels=True)
        oseries = orthanc.find_series(str(ds2.SeriesInstanceUID))
        req = urllib.request.Request(f"{orthanc.http_url}/modalities/SCP/store", method="POST",
                                     data=json.dumps({"Resources": [oseries["ID"]], "Synchronous": True}).encode())
        os.sync()
        t0, c0 = time.perf_counter(), cpu_seconds(orthanc.proc.pid)
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
        results["export/orthanc"] = n / (time.perf_counter() - t0)
        cpu_ms["export/orthanc"] = 1000 * (cpu_seconds(orthanc.proc.pid) - c0) / n

    print(f"{'measure':24} images/s  CPU ms/image (receiver; export: sender)")
    for k, v in results.items():
        print(f"{k:24} {v:8.0f}" + (f"  {cpu_ms[k]:6.2f}" if k in cpu_ms else ""))
    r1 = results["ingest1/node"] / results["ingest1/orthanc"]
    r2 = results["ingest4/node"] / results["ingest4/orthanc"]
    r3 = results["ingest1/node"] / results["ingest1/storescp"]
    r4 = results["export/node"] / results["export/orthanc"]
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print(f"ingest node/orthanc={r1:.2f} ingest4 node/orthanc={r2:.2f} node/storescp={r3:.2f} export node/orthanc={r4:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
