"""Seconds per stage and peak memory of the analysis pipeline on a 300-slice 512×512 CT series.

A phantom series (ai_core.phantom, 0.75 × 0.75 × 1.5 mm) is written once to a work folder (by a
child process, so its memory is not counted), then the demo pipeline analyses it as the node
does: read, resample, segment, organ stats, crop, encode (VLP network), score; then the result
encoders build SEG + SR + SC. The shipped demo models are used when installed, else randomly
initialised networks of the same architecture (said so in the output).

    python benchmarks/analyze.py [--slices 300] [--size 512] [--work DIR] [--threads 2] [--repeat 3]
                                 [--no-dicom] [--profile N]

Last line: ``non_model_s=X peak_rss_mb=Y``: the pipeline's wall time minus the time inside the two
networks (segmentation network; VLP image side), median over the runs, and the peak resident
memory of this process (the SR encoder's forked child is not counted).
Goal on 2 CPU cores: non_model_s <= 3 and peak_rss_mb <= 2048.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate(work: Path, slices: int, size: int) -> Path:
    """Write the phantom series into ``work/series`` (once; reused when complete)."""
    from ai_core.phantom.generator import generate_case, write_case

    spacing = (384.0 / size, 384.0 / size, 1.5)
    case = generate_case(7, spacing=spacing, size=(size, size, slices))
    write_case(case, work, slice_order="shuffled")
    (work / "complete").write_text(f"{slices} {size}\n")
    return work / "series"


def random_demo_like(threads: int):
    """Randomly initialised networks shaped as the demo models (when the shipped ones are missing)."""
    import torch

    from ai_core.segmentation import make_segmenter
    from ai_core.training.segmentation import SegTrainConfig, build_network, export_bundle
    from ai_core.training.vlp import phantom_demo_spec
    from ai_core.vlp.model import build_model

    torch.manual_seed(0)
    cfg = SegTrainConfig(work_dir=Path(tempfile.mkdtemp(prefix="bench-seg-")))
    bundle = export_bundle(cfg, build_network(cfg).eval(), cfg.work_dir / "bundle", version="random")
    segmenter = make_segmenter("monai_bundle", bundle_dir=bundle, device="cpu")
    model = build_model(phantom_demo_spec(name="random (demo-shaped) VLP")).eval()
    return segmenter, model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None, help="folder for the phantom series (kept; reused)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--repeat", type=int, default=3, help="analyses of the series; medians are printed (default 3)")
    ap.add_argument("--no-dicom", action="store_true", help="skip the SEG/SR/SC encoding")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile a second analysis and print its N most expensive functions")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work or Path(tempfile.gettempdir()) / f"ctvlp-bench-analyze-{args.slices}x{args.size}"
    if args.generate_only:
        generate(work, args.slices, args.size)
        return 0
    if not (work / "complete").is_file():
        print(f"writing a {args.slices}-slice {args.size}x{args.size} phantom series to {work} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate-only", "--work", str(work), "--slices",
                        str(args.slices), "--size", str(args.size)], check=True)
        print(f"  written in {time.perf_counter() - t0:.1f} s", flush=True)
    files = sorted((work / "series").iterdir())

    import numpy as np
    import torch

    from ai_core.pipeline import DEMO_SEG_DIR, DEMO_VLP_DIR, Pipeline, PipelineSettings

    torch.set_num_threads(args.threads)
    rss_before_models = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    have_seg = (DEMO_SEG_DIR / "configs" / "inference.json").is_file()
    have_vlp = any(DEMO_VLP_DIR.glob("*.pt"))
    segmenter = model = None
    if not (have_seg and have_vlp):
        random_seg, random_vlp = random_demo_like(args.threads)
        segmenter = None if have_seg else random_seg
        model = None if have_vlp else random_vlp
    if segmenter is None:  # as the pipeline builds it from the default settings
        from ai_core.pipeline import make_pipeline_segmenter

        segmenter = make_pipeline_segmenter(PipelineSettings(device="cpu"), "cpu")
    pipeline = Pipeline(PipelineSettings(device="cpu"), segmenter=segmenter, model=model)
    which = ", ".join([
        "shipped demo segmenter" if have_seg else "RANDOM demo-shaped segmenter (demo bundle not installed)",
        "shipped demo VLP model" if have_vlp else "RANDOM demo-shaped VLP model (demo checkpoint not installed)",
    ])
    load_s = time.perf_counter() - t0
    print(f"models: {which}; loaded in {load_s:.1f} s")
    print(f"  segmenter {pipeline.segmenter_info.label}; VLP {pipeline.model_info.label}")

    # The first series after loading pays first-call costs (the node pays them once per worker);
    # further runs show the steady state. Stage times are the median over --repeat runs, since a
    # shared 2-core machine makes single runs noisy; the first run is shown beside them.
    runs = []
    for _ in range(max(1, args.repeat)):
        result = pipeline.analyze(files)
        if result.refused:
            print(f"the series was refused: {result.refused}")
            return 1
        t = dict(result.timings)
        t["non_model"] = t["total"] - t["segment_network"] - t["encode_network"]
        runs.append(t)
    rss_analysis = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    non_model = median["non_model"]

    print(f"\n{len(files)} slices {args.size}x{args.size}, {torch.get_num_threads()} torch threads, "
          f"{len(runs)} run(s); load average {os.getloadavg()[0]:.1f}")
    print(f"{'stage':<24}{'median s':>9}{'first s':>9}")
    rows = [
        ("read", "read"),
        ("resample (seg input)", "resample"),
        ("segment", "segment"),
        ("  of which network", "segment_network"),
        ("organs (stats, labels)", "organs"),
        ("crop", "crop"),
        ("encode", "encode"),
        ("  of which network", "encode_network"),
        ("score", "score"),
        ("total", "total"),
        ("total minus networks", "non_model"),
    ]
    for name, key in rows:
        print(f"{name:<24}{median[key]:>9.2f}{runs[0][key]:>9.2f}")

    if not args.no_dicom:
        try:
            from ai_core.encode import encode_to_files
        except ImportError as exc:
            print(f"(result encoders not available: {exc})")
        else:
            from ai_core.encode import warm_up

            # As a node worker does at start: the first series then encodes as fast as the next ones.
            print(f"{'(encoder warm-up)':<24}{warm_up():>18.2f}")
            pipeline_encode = result.timings["encode"]
            keys = ("encode_prepare", "encode_seg", "encode_sc", "encode_sr_wait")
            encodes = []
            for _ in range(len(runs)):
                out = Path(tempfile.mkdtemp(prefix="bench-results-"))
                t1 = time.perf_counter()
                encode_to_files(result, out, kinds=("seg", "sr", "sc"))
                encodes.append({"total": time.perf_counter() - t1, **{k: result.timings[k] for k in keys}})
                shutil.rmtree(out, ignore_errors=True)
            result.timings["dicom_encode"] = result.timings.pop("encode")
            result.timings["encode"] = pipeline_encode
            for name, key in [("SEG+SR+SC encode+write", "total")] + [("  " + k, k) for k in keys]:
                print(f"{name:<24}{float(np.median([e[key] for e in encodes])):>9.2f}{encodes[0][key]:>9.2f}")

    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        pipeline.analyze(files)
        profiler.disable()
        print(f"\nprofile of a second analysis (top {args.profile} by own time):")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MB (after imports: {rss_before_models:.0f} MB; after the analysis, before "
          f"the DICOM encoding: {rss_analysis:.0f} MB)")
    print(f"non_model_s={non_model:.2f} peak_rss_mb={peak:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
