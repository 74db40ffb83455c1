"""Encoding of an AnalysisResult as DICOM result objects: SEG (organ masks), SR (TID 1500), SC (summary).

    encode_results(result, kinds=("seg", "sr", "sc")) -> {"seg": Segmentation, "sr": ..., "sc": ...}
    write_results(objects, out_dir) -> {"seg": Path, ...}

All three join the original study as new series (same Study Instance UID, new Series Instance
UIDs, same Frame of Reference for the SEG). The SR references the SEG's segments, so asking for
"sr" also builds (and returns) the SEG. Each call makes new instances: a re-analysis passes the
earlier SR as ``predecessor_sr`` and the new SR lists it in its Predecessor Documents Sequence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from pydicom.dataset import Dataset

from ai_core.encode.common import Device, LabelIndex, check_sources, read_headers
from ai_core.encode.parallel import Forked
from ai_core.result import AnalysisResult

logger = logging.getLogger(__name__)

KINDS = ("seg", "sr", "sc")


def encode_results(
    result: AnalysisResult,
    *,
    kinds: Iterable[str] = KINDS,
    device_name: str = "ct-vlp-dicom-node",
    predecessor_sr: Dataset | None = None,
    sources: list[Dataset] | None = None,
    parallel: bool = True,
) -> dict[str, Dataset]:
    """Build the requested result objects; keys are the kinds built ("sr" brings "seg" along).

    ``sources``: headers of ``result.source_files`` if the caller has them (else they are read).
    ``parallel``: build the SR in a forked child while this process builds the SEG and SC (the
    SR then comes back as a plain pydicom Dataset read from its encoded bytes).
    Stage times (seconds) are added to ``result.timings`` under ``encode*`` keys.
    """
    import highdicom as hd

    from ai_core.encode.sc import build_sc
    from ai_core.encode.seg import build_seg, plan_segments, seg_reference
    from ai_core.encode.sr import build_sr

    wanted = set(kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"unknown result kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if "sr" in wanted:
        wanted.add("seg")
    t0 = time.perf_counter()
    sources = sources if sources is not None else read_headers(result.source_files)
    check_sources(result, sources)
    device = Device(name=device_name)
    index = LabelIndex(result.labels) if result.labels is not None else None
    segments = plan_segments(result, index) if "seg" in wanted else []
    seg_uids = (hd.UID(), hd.UID())  # known up front, so the SR can reference the SEG meanwhile
    seg_ref = seg_reference(result.study_instance_uid, *seg_uids) if segments else None
    t_prep = time.perf_counter()
    sr_job = None
    if "sr" in wanted:
        sr_kwargs = dict(result=result, sources=sources, seg=seg_ref, segments=segments, index=index,
                         device=device, predecessor=predecessor_sr)
        sr_job = Forked(build_sr, **sr_kwargs) if parallel else None
        sr_inline = None if parallel else build_sr(**sr_kwargs)
    out: dict[str, Dataset] = {}
    if segments:
        seg = build_seg(result, sources, index=index, segments=segments, device=device,
                        series_instance_uid=seg_uids[0], sop_instance_uid=seg_uids[1])
        assert seg is not None
        out["seg"] = seg
    t_seg = time.perf_counter()
    if "sc" in wanted:
        out["sc"] = build_sc(result, sources, index=index, device=device)
    t_sc = time.perf_counter()
    if "sr" in wanted:
        out["sr"] = sr_job.result() if sr_job is not None else sr_inline
    t_sr = time.perf_counter()
    # Stage times for the pipeline's table (benchmarks/analyze.py); the SR ran beside SEG and SC.
    result.timings.update({"encode_prepare": t_prep - t0, "encode_seg": t_seg - t_prep,
                           "encode_sc": t_sc - t_seg, "encode_sr_wait": t_sr - t_sc, "encode": t_sr - t0})
    logger.info("encoded %s for series %s in %.2f s (prepare %.2f, SEG %.2f, SC %.2f, SR wait %.2f)",
                "+".join(sorted(out)), result.series_instance_uid, t_sr - t0, t_prep - t0, t_seg - t_prep,
                t_sc - t_seg, t_sr - t_sc)
    return out


def write_results(objects: dict[str, Dataset], out_dir: Path) -> dict[str, Path]:
    """Write each object as ``<kind>_<SOPInstanceUID>.dcm`` (DICOM file format) and return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, ds in objects.items():
        path = out_dir / f"{kind}_{ds.SOPInstanceUID}.dcm"
        tmp = path.with_suffix(".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(path)  # never leave a half-written object under its final name
        paths[kind] = path
    return paths
