"""``dicom-node phantom --seed N --out DIR``: write one synthetic CT phantom case."""

from __future__ import annotations

from dicom_node.errors import UserError

NAME = "phantom"
HELP = "write a synthetic CT phantom case (DICOM series, label map, truth.json with findings and report)"

_ORIENTATIONS = ("HFS", "FFS", "HFP", "FFP", "sagittal", "coronal", "oblique")


def add_arguments(parser) -> None:
    parser.add_argument("--seed", type=int, default=None, help="case seed (same seed, same case); required")
    parser.add_argument("--out", default=None, help="output directory (created); required")
    parser.add_argument("--orientation", choices=_ORIENTATIONS, default="HFS",
                        help="patient position of an axial series, or a sagittal/coronal/oblique stack (default HFS)")
    parser.add_argument("--slice-order", choices=("ascending", "descending", "shuffled"), default="ascending",
                        help="instance numbering and file names (never the geometry) (default ascending)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="voxel spacing in mm along the image rows, columns and slices (default 1.5 1.5 3)")
    parser.add_argument("--size", type=int, nargs=3, metavar=("NX", "NY", "NZ"), default=None,
                        help="voxels per axis (default: cover a 384 x 384 x 420 mm chest-abdomen field of view)")
    parser.add_argument("--slice-thickness", type=float, default=None,
                        help="Slice Thickness to record (default: the slice spacing)")
    parser.add_argument("--finding", "--findings", action="extend", nargs="+", default=None, metavar="ORGAN:FINDING",
                        help="place these findings (repeatable, or several after one flag); without it findings are "
                        "drawn from the seed; '--finding none' places none")
    parser.add_argument("--balanced-index", type=int, default=None,
                        help="write case I of the balanced evaluation set SEED instead")
    parser.add_argument("--transfer-syntax", default="explicit",
                        help="explicit, implicit, rle, jpegls, jpeg2000, jpeg-lossless or a UID (default explicit)")
    parser.add_argument("--list-findings", action="store_true", help="print the supported organ:finding pairs and exit")


def _parse_findings(values: list[str] | None) -> list[tuple[str, str]] | None:
    if values is None:
        return None
    pairs: list[tuple[str, str]] = []
    for v in values:
        for item in v.split(","):
            item = item.strip()
            if not item or item.lower() == "none":
                continue
            if ":" not in item:
                raise UserError(f"--finding {item!r}: write ORGAN:FINDING, e.g. liver:cyst (see --list-findings)")
            organ, finding = item.split(":", 1)
            pairs.append((organ.strip(), finding.strip()))
    return pairs


def run(args) -> int:
    from pathlib import Path

    from ai_core.phantom.findings import FINDINGS, check_pairs
    from ai_core.phantom.generator import DEFAULT_SPACING, generate_case, write_case
    from ai_core.phantom.series import resolve_transfer_syntax

    if args.list_findings:
        for organ, findings in FINDINGS.items():
            print(f"{organ}: {', '.join(findings) if findings else '(none)'}")
        return 0
    if args.seed is None or args.out is None:
        raise UserError("--seed N and --out DIR are required (e.g. dicom-node phantom --seed 1 --out case1)")
    pairs = _parse_findings(args.finding)
    try:
        if pairs is not None:
            pairs = check_pairs(pairs)
        ts = resolve_transfer_syntax(args.transfer_syntax)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    spacing = tuple(args.spacing) if args.spacing else DEFAULT_SPACING
    if min(spacing) <= 0:
        raise UserError(f"--spacing {spacing}: spacings must be positive (mm)")
    if args.size is not None and min(args.size) < 1:
        raise UserError(f"--size {args.size}: sizes must be at least 1 voxel")
    case = generate_case(args.seed, spacing=spacing, size=tuple(args.size) if args.size else None,
                         orientation=args.orientation, findings=pairs, balanced_index=args.balanced_index)
    truth = write_case(case, Path(args.out), slice_order=args.slice_order, transfer_syntax=ts,
                       slice_thickness=args.slice_thickness)
    present = ", ".join(f"{f.organ}:{f.finding}" for f in case.findings) or "none"
    print(f"wrote {case.image.GetSize()[2]} slices to {truth.parent / 'series'}; findings: {present}")
    print(f"truth: {truth}")
    return 0
