"""``dicom-node rules test FILE...``: which rule matches each file, and why the others do not."""

from __future__ import annotations

from dicom_node.commands._common import add_config_argument, config_from
from dicom_node.errors import UserError

NAME = "rules"
HELP = "test the routing rules against DICOM files"


def add_arguments(parser) -> None:
    add_config_argument(parser)
    parser.add_argument("verb", choices=["test"])
    parser.add_argument("files", nargs="+", help="DICOM files (one per series is enough)")
    parser.add_argument("--calling-ae", help="pretend the files came from this calling AE title")
    parser.add_argument("--called-ae", help="pretend they were sent to this AE title (default: first listener)")


def run(args) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from dicom_node.routing import Router, SeriesAttributes

    config = config_from(args)
    try:
        router = Router(config)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    called = args.called_ae or config.listeners[0].ae_title
    status = 0
    for path in args.files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            print(f"{path}: not a readable DICOM file ({exc})")
            status = 1
            continue
        d = router.decide(SeriesAttributes(ds, calling_ae=args.calling_ae, called_ae=called))
        print(f"{path}: series {ds.get('SeriesInstanceUID', '?')} ({ds.get('Modality', '?')})")
        for r in config.rules:
            if r.name in d.reasons:
                print(f"  rule {r.name!r}: no match: {d.reasons[r.name]}")
            else:
                print(f"  rule {r.name!r}: MATCH" + (" (stop)" if r.stop else ""))
                if r.stop:
                    break
        if d.default:
            print("  no rule matched: default action")
        acts = [f"forward to {', '.join(d.forward)}"] if d.forward else []
        acts += [f"analyze with {p} (results to {', '.join(dests) or 'nowhere'})" for p, dests in d.analyze]
        print("  => " + ("; ".join(acts) if acts else "discard"))
    return status
