"""Encoding of an AnalysisResult as DICOM result objects: SEG (organ masks), SR (TID 1500), SC (summary).

    encode_results(result, kinds=("seg", "sr", "sc")) -> {"seg": Segmentation, "sr": ..., "sc": ...}
    write_results(objects, out_dir) -> {"seg": Path, ...}
    encode_to_files(result, out_dir, kinds=...) -> {"seg": Path, ...}   # fastest: writes as it goes
    encode_to_bytes(result, on_ready, kinds=...)   # each object's file bytes as soon as it is ready
    warm_up()                                      # once per process, before the first series

All three join the original study as new series (same Study Instance UID, new Series Instance
UIDs, same Frame of Reference for the SEG). The SR references the SEG's segments, so asking for
"sr" also builds (and returns) the SEG. Each call makes new instances: a re-analysis passes the
earlier SR as ``predecessor_sr`` and the new SR lists it in its Predecessor Documents Sequence.

Speed: highdicom is pure Python (one core each), so the SR and the SC are built in forked
children while this process builds and writes the SEG, the slowest object (see ``parallel.py``).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from ai_core.encode.common import Device, LabelIndex, check_sources, read_headers
from ai_core.encode.parallel import EncodedBytes, Forked
from ai_core.result import AnalysisResult

logger = logging.getLogger(__name__)

KINDS = ("seg", "sr", "sc")

# What a finished object is handed on as: a Dataset, or (SR from the child) its encoded bytes.
Emit = Callable[[str, Dataset | None, EncodedBytes | None], None]


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
    ``parallel``: build the SR and the SC in forked children while this process builds the SEG
    (they then come back as plain pydicom Datasets read from their encoded bytes).
    Stage times (seconds) are added to ``result.timings`` under ``encode*`` keys.
    """
    out: dict[str, Dataset] = {}

    def keep(kind: str, ds: Dataset | None, raw: EncodedBytes | None) -> None:
        out[kind] = ds if ds is not None else pydicom.dcmread(io.BytesIO(raw.data))

    _encode(result, kinds, device_name, predecessor_sr, sources, parallel, keep, seg_bytes=False)
    return out


def encode_to_bytes(
    result: AnalysisResult,
    on_ready: Callable[[str, EncodedBytes], None],
    *,
    kinds: Iterable[str] = KINDS,
    device_name: str = "ct-vlp-dicom-node",
    predecessor_sr: Dataset | None = None,
    sources: list[Dataset] | None = None,
    parallel: bool = True,
) -> None:
    """Build the requested objects and call ``on_ready(kind, encoded)`` with each one's file bytes.

    For a store that keeps DICOM files (the node): the SEG is handed on while the SR may still be
    being built in its child; the children's bytes arrive as they encoded them (never encoded twice).
    """

    def hand_on(kind: str, ds: Dataset | None, raw: EncodedBytes | None) -> None:
        on_ready(kind, raw if raw is not None else EncodedBytes.of(ds))

    _encode(result, kinds, device_name, predecessor_sr, sources, parallel, hand_on, seg_bytes=True)


def encode_to_files(
    result: AnalysisResult,
    out_dir: Path,
    *,
    kinds: Iterable[str] = KINDS,
    device_name: str = "ct-vlp-dicom-node",
    predecessor_sr: Dataset | None = None,
    sources: list[Dataset] | None = None,
    parallel: bool = True,
) -> dict[str, Path]:
    """Build the requested objects and write each as soon as it is ready (see ``write_results``).

    The SEG is written while the SR and SC are built in their children, whose bytes go to disk as
    the children encoded them: the quickest way from a result to files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def write(kind: str, ds: Dataset | None, raw: EncodedBytes | None) -> None:
        if ds is not None:
            paths[kind] = _write_dataset(kind, ds, out_dir)
            return
        paths[kind] = _write_atomic(out_dir / f"{kind}_{raw.sop_uid}.dcm", lambda tmp: tmp.write_bytes(raw.data))

    t0 = time.perf_counter()
    _encode(result, kinds, device_name, predecessor_sr, sources, parallel, write, seg_bytes=True)
    result.timings["encode_and_write"] = time.perf_counter() - t0
    return paths


def warm_up() -> float:
    """Encode a tiny made-up result once (seconds taken), so the first real series does not pay
    for highdicom's and pydicom's one-off loading of standard tables, fonts and codecs (~0.5 s).

    Inline, in this process: the encoders' forked children inherit what it loaded.
    """
    import tempfile

    import numpy as np

    from ai_core.phantom.series import make_ct_series
    from ai_core.result import FindingResult, ModelInfo, OrganResult
    from ai_core.volume import read_volume

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctvlp-encode-warm-up-") as tmp:
        volume = read_volume(make_ct_series(Path(tmp), n_slices=12, rows=32, cols=32, spacing=(8.0, 8.0, 8.0)))
        labels = np.zeros(volume.shape, np.uint8)
        labels[3:9, 8:20, 8:20] = 2  # not a segment number: the remapping path too
        model = ModelInfo("encoder warm-up", "0", demo=True)
        result = AnalysisResult(
            study_instance_uid=volume.study_uid, series_instance_uid=volume.series_uid, model=model,
            segmenter=model, organs=[OrganResult("liver", 2, "evaluated")],
            findings=[FindingResult("liver", "lesion", "absent", 0.1, 0.5)], source_files=list(volume.files),
            labels=labels, source_headers=volume.headers)
        encode_to_bytes(result, lambda kind, encoded: None, parallel=False)
    return time.perf_counter() - t0


def write_results(objects: dict[str, Dataset], out_dir: Path) -> dict[str, Path]:
    """Write each object as ``<kind>_<SOPInstanceUID>.dcm`` (DICOM file format) and return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {kind: _write_dataset(kind, ds, out_dir) for kind, ds in objects.items()}


def _write_dataset(kind: str, ds: Dataset, out_dir: Path) -> Path:
    return _write_atomic(out_dir / f"{kind}_{ds.SOPInstanceUID}.dcm",
                         lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def _write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Write through a temporary file and rename: never a half-written object under its final name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _encode(result: AnalysisResult, kinds: Iterable[str], device_name: str, predecessor_sr: Dataset | None,
            sources: list[Dataset] | None, parallel: bool, emit: Emit, seg_bytes: bool) -> None:
    """Build the objects and hand each to ``emit`` as soon as it is ready (SEG, SC, then SR).

    ``seg_bytes``: hand on the SEG encoded (with both cores when ``parallel``), not as a Dataset.
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
    if sources is None:
        sources = result.source_headers if result.source_headers is not None else read_headers(result.source_files)
    check_sources(result, sources)
    device = Device(name=device_name)
    index = LabelIndex(result.labels) if result.labels is not None else None
    segments = plan_segments(result, index) if "seg" in wanted else []
    seg_uids = (hd.UID(), hd.UID())  # known up front, so the SR can reference the SEG meanwhile
    seg_ref = seg_reference(result.study_instance_uid, *seg_uids) if segments else None
    t_prep = time.perf_counter()
    sr_job = None
    if "sr" in wanted:
        sr_job = Forked(build_sr, inline=not parallel, result=result, sources=sources, seg=seg_ref,
                        segments=segments, index=index, device=device, predecessor=predecessor_sr)
    # The SC (matplotlib drawing, ~0.1 s) is also built beside the SEG, which is the critical path.
    sc_job = None
    if "sc" in wanted:
        sc_job = Forked(build_sc, inline=not parallel, result=result, sources=sources, index=index, device=device)
    built = []
    if segments:
        seg = build_seg(result, sources, index=index, segments=segments, device=device,
                        series_instance_uid=seg_uids[0], sop_instance_uid=seg_uids[1])
        emit("seg", *((None, EncodedBytes.of(seg, split=parallel)) if seg_bytes else (seg, None)))
        built.append("seg")
    t_seg = time.perf_counter()
    if sc_job is not None:
        ds, raw = sc_job.outcome()
        emit("sc", ds, raw)
        built.append("sc")
    t_sc = time.perf_counter()
    if sr_job is not None:
        ds, raw = sr_job.outcome()
        emit("sr", ds, raw)
        built.append("sr")
    t_sr = time.perf_counter()
    # Stage times for the pipeline's table (benchmarks/analyze.py); the SR ran beside SEG and SC.
    result.timings.update({"encode_prepare": t_prep - t0, "encode_seg": t_seg - t_prep,
                           "encode_sc": t_sc - t_seg, "encode_sr_wait": t_sr - t_sc, "encode": t_sr - t0})
    logger.info("encoded %s for series %s in %.2f s (prepare %.2f, SEG %.2f, SC %.2f, SR wait %.2f)",
                "+".join(built), result.series_instance_uid, t_sr - t0, t_prep - t0, t_seg - t_prep,
                t_sc - t_seg, t_sr - t_sc)
