"""``dicom-node worker``: run job workers in the foreground (for a separate worker service/host)."""

from __future__ import annotations

import logging

from dicom_node.commands._common import add_config_argument, config_from

NAME = "worker"
HELP = "run a job worker (for hosts or services that run workers apart from `serve`)"


def add_arguments(parser) -> None:
    add_config_argument(parser)


def run(args) -> int:
    from dicom_node.worker import worker_main

    config = config_from(args)
    worker_main(config, logging.DEBUG if args.verbose else logging.getLevelName(config.log_level))
    return 0
