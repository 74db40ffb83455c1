"""Helpers shared by subcommands: the --config option and opening the database."""

from __future__ import annotations

import argparse
import os

from dicom_node.config import Config, load_config


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` (default: $CTVLP_CONFIG, else the embedded default)."""
    parser.add_argument("--config", "-c", default=os.environ.get("CTVLP_CONFIG"),
                        help="configuration file (default: $CTVLP_CONFIG, else the embedded config.yaml)")


def config_from(args: argparse.Namespace) -> Config:
    """Load the configuration named by the arguments."""
    return load_config(args.config)


def open_db(config: Config):
    """Session factory of the node's database (migrated to the newest schema)."""
    from storage.db import open_database

    return open_database(config.database_url)[1]
