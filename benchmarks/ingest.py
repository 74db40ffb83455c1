"""Ingest and export throughput of the node against dcmtk storescp and Orthanc, in one run.

Sends the same 300-slice 512×512 CT series with storescu (TCP_NODELAY=1, same max PDU for all) to
the node, to storescp and to Orthanc: once over one association, once as four concurrent
associations (four copies with distinct UIDs). Then exports the series from the node (its own
SCU code) and from Orthanc (REST /modalities/.../store) to storescp.

    python benchmarks/ingest.py [--slices 300] [--size 512]

Prints images/s for each and, last, one line:
``ingest node/orthanc=R1 ingest4 node/orthanc=R2 node/storescp=R3 export node/orthanc=R4``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from ai_core.phantom.series import make_ct_series  # noqa: E402
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
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctvlp-bench-"))
    src = make_ct_series(work / "src", n_slices=args.slices, rows=args.size, cols=args.size, seed=1)
    one = copies(src, work / "one", 3)  # one copy per target: every target receives new UIDs
    four = [copies(src, work / f"four{t}", 4) for t in range(3)]
    n = len(src)
    print(f"series: {n} slices {args.size}x{args.size}, {sum(f.stat().st_size for f in src) / 2**20:.0f} MB; "
          f"max PDU {MAX_PDU}")
    results: dict[str, float] = {}
    with StoreSCP(work / "scp", max_pdu=MAX_PDU) as scp, Orthanc(
            work / "orthanc", aet="ORTHANC", modalities={"SCP": (scp.aet, "127.0.0.1", scp.port)}) as orthanc, \
            NodeProcess(work / "node", stable_after=30, workers=0,
                        destinations={"scp": {"ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port}}) as node:
        for label, (port, aet) in {"node": (node.port, node.ae_title), "storescp": (scp.port, scp.aet),
                                   "orthanc": (orthanc.dicom_port, orthanc.aet)}.items():
            results[f"ingest1/{label}"] = send(port, aet, [one[["node", "storescp", "orthanc"].index(label)]])
        for label, (port, aet) in {"node": (node.port, node.ae_title), "storescp": (scp.port, scp.aet),
                                   "orthanc": (orthanc.dicom_port, orthanc.aet)}.items():
            results[f"ingest4/{label}"] = send(port, aet, four[["node", "storescp", "orthanc"].index(label)])
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
        t0 = time.perf_counter()
        out = send_files(cfg.destinations["scp"], items, calling_ae="CTVLP")
        results["export/node"] = len(items) / (time.perf_counter() - t0)
        assert all(o.ok for o in out.values())

        ds2 = dcmread(one[2][0], stop_before_pixels=True)
        oseries = orthanc.find_series(str(ds2.SeriesInstanceUID))
        req = urllib.request.Request(f"{orthanc.http_url}/modalities/SCP/store", method="POST",
                                     data=json.dumps({"Resources": [oseries["ID"]], "Synchronous": True}).encode())
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
        results["export/orthanc"] = n / (time.perf_counter() - t0)

    print(f"{'measure':24} images/s")
    for k, v in results.items():
        print(f"{k:24} {v:8.0f}")
    r1 = results["ingest1/node"] / results["ingest1/orthanc"]
    r2 = results["ingest4/node"] / results["ingest4/orthanc"]
    r3 = results["ingest1/node"] / results["ingest1/storescp"]
    r4 = results["export/node"] / results["export/orthanc"]
    print(f"ingest node/orthanc={r1:.2f} ingest4 node/orthanc={r2:.2f} node/storescp={r3:.2f} export node/orthanc={r4:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
