"""``dicom-node train TARGET``: train the node's models on phantoms (segmentation, vlp)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys

from dicom_node.errors import UserError

NAME = "train"
HELP = "train a model on synthetic phantoms: 'segmentation' (the demo segmenter) or 'vlp'"


def add_arguments(parser) -> None:
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)

    seg = targets.add_parser("segmentation", help="train the demo organ segmentation network (MONAI bundle)",
                             description="Train a small 3D UNet on synthetic phantoms and export it as a MONAI "
                             "bundle. Resumes from WORK/checkpoint.pt when it exists.")
    seg.add_argument("--work-dir", required=True, help="checkpoints and logs (created; resumed from)")
    seg.add_argument("--out", default=None,
                     help="bundle directory to export to (default: the package's ai_core/models/demo_seg)")
    seg.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    seg.add_argument("--train-cases", type=int, default=40, help="training phantoms (default 40)")
    seg.add_argument("--val-cases", type=int, default=6, help="held-out phantoms (default 6)")
    seg.add_argument("--batch-size", type=int, default=2, help="patches per step (default 2)")
    seg.add_argument("--patch", type=int, nargs=3, default=(64, 64, 64), metavar=("X", "Y", "Z"),
                     help="training patch in network voxels (default 64 64 64)")
    seg.add_argument("--spacing", type=float, nargs=3, default=(3.0, 3.0, 4.0), metavar=("X", "Y", "Z"),
                     help="network grid spacing in mm (default 3 3 4)")
    seg.add_argument("--channels", type=int, nargs="+", default=(8, 16, 32, 64),
                     help="UNet channels per level (default 8 16 32 64)")
    seg.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when torch sees a GPU; default cpu)")
    seg.add_argument("--res-units", type=int, default=1,
                     help="residual units per UNet level (default 1); more widen each level's receptive field")
    seg.add_argument("--phantom-spacing", type=float, nargs=3, action="append", default=None,
                     metavar=("X", "Y", "Z"), help="generate training phantoms at this spacing in mm "
                     "(repeatable; default: a mix from 1.5 x 1.5 x 3 to 3 x 3 x 4.5)")
    seg.add_argument("--lr", type=float, default=5e-3, help="peak learning rate, cosine decay (default 5e-3)")
    seg.add_argument("--seed", type=int, default=0, help="seed of phantoms, patches and weights (default 0)")
    seg.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    seg.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    seg.add_argument("--no-resume", action="store_true", help="start afresh even if a checkpoint exists")
    seg.add_argument("--init", default=None, metavar="BUNDLE",
                     help="fine-tune: start from these weights (bundle directory, its models/model.pt or a "
                          "checkpoint.pt) instead of random ones")
    seg.add_argument("--balanced-findings", action="store_true",
                     help="draw phantoms from balanced finding sets (every finding in about a third of them) "
                          "instead of at random")
    seg.add_argument("--focal-fraction", type=float, default=0.0, metavar="P",
                     help="share of patches centred on a placed cyst or lesion, so that the organ masks "
                          "learn to keep them (default 0)")
    seg.add_argument("--model-version", default="1.0.0",
                     help="version written into the bundle's metadata (default 1.0.0)")
    seg.add_argument("--no-export", action="store_true", help="train only; do not write the bundle")
    seg.add_argument("--export-only", action="store_true",
                     help="do not train: export the checkpoint in --work-dir as it is")
    seg.add_argument("--eval-cases", type=int, default=4,
                     help="held-out phantoms segmented end to end after export (default 4)")
    seg.add_argument("--eval-spacing", type=float, nargs=3, default=(1.5, 1.5, 3.0), metavar=("X", "Y", "Z"),
                     help="spacing of those phantoms in mm (default 1.5 1.5 3)")
    seg.set_defaults(_train=_run_segmentation)

    vlp = targets.add_parser("vlp", help="train the demo VLP model (organ-level contrastive)")
    _vlp_hook("add_arguments", vlp)
    vlp.set_defaults(_train=_run_vlp)


# -- vlp: filled by ai_core/training/vlp.py -----------------------------------------------------
# The VLP target delegates to two functions of ai_core.training.vlp, if it defines them:
#   add_cli_arguments(parser: argparse.ArgumentParser) -> None   (keep its imports light)
#   run_cli(args: argparse.Namespace) -> int
_VLP_MODULE = "ai_core.training.vlp"


def _vlp_hook(kind: str, arg):
    if kind == "add_arguments":
        module = importlib.util.find_spec(_VLP_MODULE) and importlib.import_module(_VLP_MODULE)
        if module is not None and hasattr(module, "add_cli_arguments"):
            module.add_cli_arguments(arg)
        else:
            arg.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return None
    module = importlib.import_module(_VLP_MODULE)
    if not hasattr(module, "run_cli"):
        raise UserError("VLP training is not available in this version (ai_core.training.vlp has no run_cli)")
    return int(module.run_cli(arg) or 0)


def _run_vlp(args) -> int:
    try:
        return _vlp_hook("run", args)
    except ValueError as exc:  # bad options, an --init that does not fit (CheckpointError): no traceback
        raise UserError(str(exc)) from exc


# -- segmentation --------------------------------------------------------------------------------


def _run_segmentation(args) -> int:
    import logging
    import time
    from pathlib import Path

    from ai_core.segmentation import DEMO_BUNDLE
    from ai_core.training.segmentation import SegTrainConfig, export_bundle, train_segmentation

    if args.steps < 1 or args.train_cases < 1 or args.val_cases < 1:
        raise UserError("--steps, --train-cases and --val-cases must be at least 1")
    if not 0.0 <= args.focal_fraction <= 1.0:
        raise UserError(f"--focal-fraction must be between 0 and 1, not {args.focal_fraction}")
    config = SegTrainConfig(
        work_dir=Path(args.work_dir), seed=args.seed, train_cases=args.train_cases, val_cases=args.val_cases,
        steps=args.steps, batch_size=args.batch_size, patch=tuple(args.patch), lr=args.lr,
        spacing=tuple(args.spacing), channels=tuple(args.channels), num_res_units=args.res_units,
        checkpoint_every=args.checkpoint_every,
        threads=args.threads, device=args.device, balanced_findings=args.balanced_findings,
        focal_fraction=args.focal_fraction,
        init_from=str(Path(args.init).resolve()) if args.init else None,
        **({"phantom_spacings": tuple(tuple(s) for s in args.phantom_spacing)} if args.phantom_spacing else {}),
    )
    logging.getLogger("ai_core").setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        if args.export_only:
            from ai_core.training.segmentation import load_checkpoint

            config, network, dice, step = load_checkpoint(Path(args.work_dir))
            print(f"checkpoint of step {step}")
        else:
            network, dice = train_segmentation(config, resume=not args.no_resume, progress=True)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    seconds = None if args.export_only else time.perf_counter() - t0
    print("validation Dice per organ (network grid):")
    for organ, d in dice.items():
        print(f"  {organ:16s} {d:.3f}")
    if not args.no_export:
        out = Path(args.out) if args.out else DEMO_BUNDLE
        command = " ".join(shlex.quote(a) for a in ["dicom-node", *sys.argv[1:]])
        export_bundle(config, network, out, dice=dice, command=command, seconds=seconds, version=args.model_version)
        print(f"bundle written to {out}")
        if args.eval_cases > 0:
            from ai_core.training.segmentation import evaluate_end_to_end, held_out_seeds, record_evaluation

            spacing = tuple(args.eval_spacing)
            e2e = evaluate_end_to_end(out, held_out_seeds(config, args.eval_cases), spacing=spacing)
            record_evaluation(out, "end_to_end_dice", {"cases": args.eval_cases, "spacing_mm": list(spacing),
                                                       "dice": e2e})
            print(f"end-to-end Dice on {args.eval_cases} held-out phantoms (their own grid, "
                  f"{' x '.join(f'{v:g}' for v in spacing)} mm):")
            for organ, d in e2e.items():
                print(f"  {organ:16s} {d:.3f}")
    if seconds is not None:
        print(f"time {seconds:.0f} s")
    return 0


def run(args) -> int:
    return args._train(args)
