"""``dicom-node analyze PATH... --out DIR``: run a pipeline on one CT series, write analysis.json and SEG/SR/SC.

Exit status: 0 analysed; 3 the series was refused (analysis.json says why); 1 a stage or the
encoding failed; 2 a usage or configuration error.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from dicom_node.commands._common import add_config_argument
from dicom_node.errors import UserError

NAME = "analyze"
HELP = "analyse one CT series (a folder or files): write analysis.json and the SEG, SR and SC result objects"

log = logging.getLogger(__name__)
REFUSED_EXIT = 3


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a folder (searched recursively) or files of one series")
    parser.add_argument("--out", "-o", required=True, help="output folder (created): analysis.json and the DICOM results")
    add_config_argument(parser)
    parser.add_argument("--pipeline", "-p", default="default",
                        help="pipeline name in the configuration's pipelines section (default: default)")
    parser.add_argument("--no-encode", action="store_true", help="write analysis.json only, no SEG/SR/SC")
    parser.add_argument("--kinds", default="seg,sr,sc",
                        help="result objects to write, comma-separated from seg, sr, sc (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _settings(args):
    from ai_core.pipeline import PipelineSettings
    from dicom_node.config import load_config

    config = load_config(args.config)
    if args.pipeline not in config.pipelines:
        raise UserError(f"pipeline {args.pipeline!r} is not in the configuration's pipelines "
                        f"(known: {', '.join(sorted(config.pipelines))}); pass --pipeline with one of them")
    return PipelineSettings.from_mapping(config.pipelines[args.pipeline].model_dump())


def findings_table(result) -> str:
    """The findings of a result as a plain-text table (one row per organ and finding)."""
    rows = [("organ", "finding", "decision", "probability", "threshold", "note")]
    for f in result.findings:
        rows.append((
            f.organ, f.finding, f.decision,
            "" if f.probability is None else f"{f.probability:.3f}",
            "" if f.threshold is None else f"{f.threshold:.3f}",
            f.reason or "",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else "") for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _keep_pipeline_encode(timings: dict[str, float], pipeline_encode: float | None) -> None:
    """The encoders record their total under "encode", the pipeline's VLP stage name: keep both."""
    if pipeline_encode is not None and timings.get("encode") != pipeline_encode:
        timings["dicom_encode"] = timings.pop("encode")
        timings["encode"] = pipeline_encode


def run(args) -> int:
    from ai_core.pipeline import Pipeline, PipelineError, StageError

    paths = [Path(p) for p in args.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"no such file or folder: {', '.join(missing)}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = sorted(set(kinds) - {"seg", "sr", "sc"})
    if bad:
        raise UserError(f"--kinds {','.join(bad)} is not allowed; choose from seg, sr, sc")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    settings = _settings(args)
    t0 = time.perf_counter()
    try:
        pipeline = Pipeline(settings)
    except PipelineError as exc:
        raise UserError(f"pipeline {args.pipeline!r}: {exc}") from exc
    load_s = time.perf_counter() - t0
    try:
        result = pipeline.analyze(paths, progress=progress)
    except StageError as exc:
        log.debug("stage %s failed", exc.stage, exc_info=True)
        print(f"dicom-node analyze: {exc}", file=sys.stderr)
        return 1
    result.timings["load_models"] = load_s
    json_path = out / "analysis.json"
    result.write_json(json_path)

    status = 0
    written: dict[str, Path] = {}
    if result.refused:
        print(f"series refused: {result.refused}", file=sys.stderr)
        status = REFUSED_EXIT
    elif not args.no_encode and kinds:
        try:
            from ai_core.encode import encode_to_files
        except ImportError as exc:
            print(f"dicom-node analyze: result encoders not available ({exc}); wrote analysis.json only",
                  file=sys.stderr)
        else:
            from tqdm import tqdm

            with tqdm(total=1, desc="encode  " + "+".join(k.upper() for k in kinds), unit="step",
                      disable=not progress) as bar:
                pipeline_encode = result.timings.get("encode")
                try:
                    written = encode_to_files(result, out, kinds=kinds)
                except Exception as exc:  # the analysis stands; say why the objects are missing
                    log.debug("encoding failed", exc_info=True)
                    print(f"dicom-node analyze: encoding {'+'.join(kinds)} failed: {exc}", file=sys.stderr)
                    status = 1
                bar.update(1)
            _keep_pipeline_encode(result.timings, pipeline_encode)
            result.write_json(json_path)  # again, with the encoding times

    print(findings_table(result))
    if result.model.demo or result.segmenter.demo:
        print("\nDEMO MODELS (trained on synthetic phantoms): NOT FOR CLINICAL USE")
    print(f"\nmodel: {result.model.label}; segmenter: {result.segmenter.label}")
    timing = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
    print(f"seconds: {timing}")
    print(f"wrote {json_path}")
    for kind, path in written.items():
        print(f"wrote {path} ({kind.upper()})")
    return status
