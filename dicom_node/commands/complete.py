"""``dicom-node complete SERIES_UID``: treat a series as complete now and route it."""

from __future__ import annotations

from dicom_node.commands._common import add_config_argument, config_from, open_db
from dicom_node.errors import UserError

NAME = "complete"
HELP = "force a series to complete now (route it without waiting for stable_after)"


def add_arguments(parser) -> None:
    add_config_argument(parser)
    parser.add_argument("series_uid", help="Series Instance UID")


def run(args) -> int:
    from sqlalchemy import select

    from dicom_node.node import route_series
    from dicom_node.routing import Router
    from storage.filestore import FileStore
    from storage.models import Series

    config = config_from(args)
    factory = open_db(config)
    with factory.begin() as s:
        series = s.scalar(select(Series).where(Series.series_instance_uid == args.series_uid))
        if series is None:
            raise UserError(f"no series {args.series_uid} is stored; `dicom-node status` lists them")
        if series.state != "receiving":
            print(f"series {args.series_uid} is already {series.state}")
            return 0
        route_series(s, series, FileStore(config.data_dir / "files"), Router(config), config)
        print(f"series {args.series_uid} completed and routed: {series.routed_rule or 'no rule'}")
    return 0
