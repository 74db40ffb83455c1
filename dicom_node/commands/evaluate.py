"""``dicom-node evaluate --phantoms N --seed S``: Dice per organ and AUC, sensitivity, specificity per finding.

The configured pipeline (segmenter and VLP model) runs on N fresh balanced phantom cases of set S,
generated in memory at the model's working spacing; the segmenter sees the phantom image, never
its labels. Writes ``evaluation.json`` (the tables, and under ``per_case`` each case's Dice and,
per finding, the truth and the probability) and ``roc_curves.png`` to ``--out``; the last line
printed is ``dice_min=X macro_auc=Y min_auc=Z``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dicom_node.commands._common import add_config_argument
from dicom_node.errors import UserError

NAME = "evaluate"
HELP = "evaluate the configured models on fresh synthetic phantoms: Dice per organ, AUC per finding, ROC plot"


def add_arguments(parser) -> None:
    parser.add_argument("--phantoms", type=int, required=True, metavar="N",
                        help="number of phantom cases (balanced: from about 20 on, every finding is present in "
                        "some and absent in others)")
    parser.add_argument("--seed", type=int, required=True, metavar="S",
                        help="phantom set; use seeds never used in training for a held-out evaluation")
    add_config_argument(parser)
    parser.add_argument("--pipeline", "-p", default="default", help="pipeline name in the configuration (default: default)")
    parser.add_argument("--out", "-o", default="evaluation", help="folder for evaluation.json and roc_curves.png "
                        "(default: ./evaluation)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="phantom voxel spacing in mm (default: the VLP model's working spacing)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_report(report) -> str:
    """The per-organ Dice table and the per-finding table as text."""
    lines = [f"{report.cases} phantoms; segmenter {report.segmenter}; model {report.model}", "",
             f"{'organ':<18}{'Dice mean':>10}{'min':>8}{'cases':>7}"]
    for organ, values in sorted(report.dice.items()):
        if values:
            lines.append(f"{organ:<18}{_fmt(sum(values) / len(values)):>10}{_fmt(min(values)):>8}{len(values):>7}")
    lines += ["", f"{'finding':<34}{'AUC':>7}{'sens':>7}{'spec':>7}{'thresh':>8}{'eval':>6}{'pos':>5}{'n/e':>5}"]
    for key, f in sorted(report.findings.items()):
        sens, spec = f.sensitivity_specificity()
        lines.append(f"{key:<34}{_fmt(f.auc):>7}{_fmt(sens):>7}{_fmt(spec):>7}{_fmt(f.threshold):>8}"
                     f"{len(f.labels):>6}{sum(f.labels):>5}{f.not_evaluated:>5}")
    never = [(k, f) for k, f in sorted(report.findings.items()) if f.not_evaluated and not f.labels]
    if never:
        lines += ["", "never evaluated (n/e = cases not evaluated):"]
        for key, f in never:
            reason = max(f.reasons, key=f.reasons.get) if f.reasons else "not evaluated"
            lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


def run(args) -> int:
    from ai_core.evaluation import evaluate_phantoms, plot_roc
    from ai_core.pipeline import Pipeline, PipelineError, PipelineSettings, StageError
    from dicom_node.config import load_config

    if args.phantoms < 1:
        raise UserError("--phantoms must be at least 1")
    config = load_config(args.config)
    if args.pipeline not in config.pipelines:
        raise UserError(f"pipeline {args.pipeline!r} is not in the configuration's pipelines "
                        f"(known: {', '.join(sorted(config.pipelines))}); pass --pipeline with one of them")
    try:
        pipeline = Pipeline(PipelineSettings.from_mapping(config.pipelines[args.pipeline].model_dump()))
    except PipelineError as exc:
        raise UserError(f"pipeline {args.pipeline!r}: {exc}") from exc
    try:
        report = evaluate_phantoms(pipeline, args.phantoms, args.seed, spacing=args.spacing,
                                   progress=not args.no_progress)
    except StageError as exc:
        raise UserError(f"evaluation stopped: {exc}") from exc

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    data.update({"seed": args.seed, "phantoms": args.phantoms, "pipeline": args.pipeline})
    (out / "evaluation.json").write_text(json.dumps(data, indent=2))
    png = plot_roc(report, out / "roc_curves.png")
    print(format_report(report))
    print(f"\nwrote {out / 'evaluation.json'} and {png}")
    s = report.summary()
    # Plain floats ("nan" when undefined), for scripts that parse the last line.
    print(f"dice_min={s['dice_min']:.3f} macro_auc={s['macro_auc']:.3f} min_auc={s['min_auc']:.3f}")
    return 0
