"""Benchmark: build and write SEG + SR + SC for a 300-slice 512x512 CT series with 12 organs.

    python benchmarks/encode.py [--slices 300] [--organs 12] [--repeat 3] [--workdir DIR]

Prints wall-clock times of encoding (prepare, SEG; SR and SC in forked children) and writing, for a
cold first run (the process pays highdicom's one-off loading of the DICOM standard tables) and
warm runs (a long-lived worker), with the SR built in parallel and serially. Target (issue 5):
<= 2 s on 2 cores. Other load on the machine shows in the printed load average.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ai_core.catalogue import FINDINGS, ORGANS  # noqa: E402
from ai_core.encode import encode_to_files  # noqa: E402
from ai_core.phantom.series import make_ct_series  # noqa: E402
from ai_core.result import AnalysisResult, FindingResult, ModelInfo, OrganResult  # noqa: E402
from ai_core.volume import read_volume  # noqa: E402


def synthetic_labels(shape: tuple[int, int, int], n_organs: int, seed: int = 0) -> np.ndarray:
    """Ellipsoid organs of realistic extent (40-120 slices, 30-120 px radius) in a uint8 label map."""
    rng = np.random.default_rng(seed)
    n, rows, cols = shape
    lab = np.zeros(shape, np.uint8)
    for value in range(1, n_organs + 1):
        rz, ry, rx = rng.integers(20, 60), rng.integers(15, 60), rng.integers(15, 60)
        cz = rng.integers(rz, n - rz)
        cy, cx = rng.integers(ry + 10, rows - ry - 10), rng.integers(rx + 10, cols - rx - 10)
        z0, z1, y0, y1, x0, x1 = cz - rz, cz + rz + 1, cy - ry, cy + ry + 1, cx - rx, cx + rx + 1
        zz, yy, xx = np.ogrid[z0:z1, y0:y1, x0:x1]
        m = ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        lab[z0:z1, y0:y1, x0:x1][m] = value
    return lab


def make_result(workdir: Path, n_slices: int, n_organs: int) -> AnalysisResult:
    """A phantom series on disk and a hand-made result with every finding of n_organs organs."""
    ct = workdir / "ct"
    if not ct.exists() or len(list(ct.glob("*.dcm"))) != n_slices:
        make_ct_series(ct, n_slices=n_slices, rows=512, cols=512, seed=1)
    volume = read_volume(ct)
    labels = synthetic_labels(volume.shape, n_organs)
    keys = list(ORGANS)[:n_organs]
    rng = np.random.default_rng(1)
    findings = []
    for k in keys:
        for fk, f in FINDINGS.items():
            if f.organs is None or k in f.organs:
                p = float(rng.uniform())
                findings.append(FindingResult(k, fk, "present" if p > 0.7 else "absent", p, 0.7))
    return AnalysisResult(
        study_instance_uid=volume.study_uid, series_instance_uid=volume.series_uid,
        model=ModelInfo("demo-vlp", "0.1", "abc", demo=True), segmenter=ModelInfo("demo-seg", "0.1", demo=True),
        organs=[OrganResult(k, i + 1, "evaluated") for i, k in enumerate(keys)],
        findings=findings, source_files=list(volume.files), labels=labels, source_headers=volume.headers,
    )


def run_once(result: AnalysisResult, out: Path, parallel: bool) -> dict[str, float]:
    """One encode + write, timed: wall clock and this process's CPU time."""
    shutil.rmtree(out, ignore_errors=True)  # each run writes new instances: keep only the last
    w0, c0 = time.perf_counter(), time.process_time()
    k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    paths = encode_to_files(result, out, parallel=parallel)
    w2, c2 = time.perf_counter(), time.process_time()
    k2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (k2.ru_utime + k2.ru_stime) - (k0.ru_utime + k0.ru_stime)
    t = result.timings
    return {"prepare": t["encode_prepare"], "seg": t["encode_seg"], "sc": t["encode_sc"],
            "sr_wait": t["encode_sr_wait"], "total": w2 - w0, "cpu_parent": c2 - c0, "cpu_child": child,
            "mb": sum(p.stat().st_size for p in paths.values()) / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--organs", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ctvlp-encode-bench")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = make_result(args.workdir, args.slices, args.organs)
    print(f"{args.slices} slices x 512^2, {args.organs} organs, {len(result.findings)} findings")
    logging.getLogger("ai_core.encode").setLevel(logging.INFO)
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print("wall-clock seconds per stage (SEG includes writing; the SR and SC are built beside it, "
          "'sc' and 'sr wait' are the waits for them after it)")
    print(f"{'run':>14} {'prepare':>7} {'seg':>6} {'sc':>6} {'sr wait':>7} {'total':>6} "
          f"{'cpu:parent':>10} {'child':>6}  MB")
    for parallel in (True, False):
        for i in range(args.repeat):
            s = run_once(result, args.workdir / "out", parallel)
            label = ("parallel " if parallel else "serial ") + ("cold" if i == 0 else f"warm{i}")
            print(f"{label:>14} {s['prepare']:7.2f} {s['seg']:6.2f} {s['sc']:6.2f} {s['sr_wait']:7.2f} "
                  f"{s['total']:6.2f} {s['cpu_parent']:10.2f} {s['cpu_child']:6.2f}  {s['mb']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
