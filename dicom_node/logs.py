"""Log set-up shared by the node's processes: one format, and chatty libraries kept quiet."""

from __future__ import annotations

import logging

# Libraries that log routine steps at INFO: pynetdicom every DIMSE message, highdicom every
# module it copies into a result, alembic each plugin it loads, APScheduler every timer it runs.
CHATTY = ("pynetdicom", "highdicom", "alembic.runtime.plugins", "apscheduler")

PROCESS_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def quiet_libraries(level: int = logging.WARNING) -> None:
    """Log the chatty libraries at ``level`` (WARNING, or DEBUG when asked for everything)."""
    for name in CHATTY:
        logging.getLogger(name).setLevel(level)


def configure_child(log_level: int) -> None:
    """Logging of a worker or receiver process: the process name in each line, libraries quiet."""
    logging.basicConfig(level=log_level, format=PROCESS_FORMAT)
    quiet_libraries(max(log_level, logging.WARNING))
