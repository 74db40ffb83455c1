"""``dicom-node echo DEST``: C-ECHO a configured destination."""

from __future__ import annotations

from dicom_node.commands._common import add_config_argument, config_from
from dicom_node.errors import UserError

NAME = "echo"
HELP = "check a destination with C-ECHO"


def add_arguments(parser) -> None:
    add_config_argument(parser)
    parser.add_argument("destination", help="a name from the destinations section")


def run(args) -> int:
    from dicom_node.errors import DeliveryError
    from dicom_node.send import echo

    config = config_from(args)
    dest = config.destinations.get(args.destination)
    if dest is None:
        raise UserError(f"unknown destination {args.destination!r}; configured: {sorted(config.destinations)}")
    try:
        code = echo(dest, calling_ae=config.listeners[0].ae_title)
    except DeliveryError as exc:
        raise UserError(f"{exc}. Check host, port and AE title in destinations.{args.destination}, and that "
                        f"the peer knows AE {config.listeners[0].ae_title!r}") from None
    print(f"{args.destination}: C-ECHO status 0x{code:04X} ({'Success' if code == 0 else 'failure'})")
    return 0 if code == 0 else 1
