"""``dicom-node serve``: run the node until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading

from dicom_node.commands._common import add_config_argument, config_from

NAME = "serve"
HELP = "run the node: listen for DICOM, complete and route series, run jobs"


def add_arguments(parser) -> None:
    add_config_argument(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes to start (default: workers.count from the config)")


def run(args) -> int:
    from dicom_node.node import Node

    config = config_from(args)
    logging.getLogger().setLevel(config.log_level if not args.verbose else logging.DEBUG)
    # Handlers first: a stop requested while the node starts (systemd's, during a slow start-up)
    # is then carried out once it has started, instead of killing it half-started.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    node = Node(config, workers=args.workers).start()
    print(f"dicom-node: listening on {', '.join(f'{l.ae_title}@{l.host}:{l.port}' for l in config.listeners)}; "
          f"data in {config.data_dir}; Ctrl-C to stop", flush=True)
    # A signal sent to the process may be delivered to any of its threads (the heartbeat, the
    # scheduler, an association's); Python runs the handler in the main thread only once that
    # thread wakes, and an untimed wait is not woken by a signal another thread took. So wake
    # twice a second: a SIGTERM from systemd stops the node whichever thread receives it.
    while not stop.wait(0.5):
        pass
    logging.getLogger(__name__).info("stopping")
    node.stop()
    return 0
