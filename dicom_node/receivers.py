"""Receiving in several processes: the node accepts each connection and hands it to a receiver.

pynetdicom decodes PDUs and DIMSE messages in Python, so one process receives on one core at a
time (the GIL), however many associations are open. With ``network.receive_processes: N``
(N >= 1) the listening sockets stay in the node process, which accepts each connection and
passes the connected socket (SCM_RIGHTS over a Unix socket pair) to one of N spawned receiver
processes, round robin. A receiver runs the node's own association handlers (peer allow-list,
C-ECHO, C-STORE into the file store) and sends each stored instance's index record and
completion touch to the node *before* it answers Success, so the node indexes and times
completion as when it receives itself: an acknowledged instance is in the node's pipe even if
the receiver dies the next moment (and on disk, which the start-up re-index reads, if the node
dies too).

Not SO_REUSEPORT: the kernel would spread connections by a hash of their addresses (four
associations can all land on one process), and a second node started on the same port by
mistake would silently share it instead of failing.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Callable

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import logs
from dicom_node.config import Config
from storage.index import InstanceRecord

log = logging.getLogger(__name__)

# How long a stopping receiver lets its open associations finish.
DRAIN_SECONDS = 30.0
READY = "ready"  # a receiver's first message: it takes connections from now on


class _Stop(Exception):
    """SIGTERM in a receiver process."""


class _Receiver:
    """One receiver process and the node's two pipe ends to it."""

    def __init__(self, config: Config, index: int, count: int, log_level: int):
        ctx = multiprocessing.get_context("spawn")
        self.index = index
        # sockets go one way, records the other: each pipe end has one reader and one writer side
        self.sockets, child_sockets = ctx.Pipe(duplex=True)  # duplex: a Unix socket pair (fd passing)
        child_records, self.records = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=receiver_main, name=f"receiver-{index + 1}", daemon=True,
                                   args=(config, count, child_sockets, child_records, log_level))
        self.process.start()
        child_sockets.close()
        child_records.close()
        self.lock = threading.Lock()  # one hand-off (address, then socket) at a time
        self.ready = threading.Event()

    def hand_off(self, listener: int, sock: socket.socket, address) -> None:
        """Pass a connected socket to this receiver (raises OSError when it is gone)."""
        with self.lock:
            self.sockets.send((listener, tuple(address)))
            send_handle(self.sockets, sock.fileno(), self.process.pid)

    def close(self) -> None:
        """Tell the receiver to take no more connections (it finishes the open ones)."""
        self.sockets.close()


class ReceiverPool:
    """The node side: receiver processes, the hand-off of connections, and their records."""

    def __init__(self, config: Config, count: int, on_stored: Callable[[InstanceRecord, float], None],
                 log_level: int = logging.INFO):
        self.config = config
        self.count = count
        self.on_stored = on_stored
        self.log_level = log_level
        self.receivers: list[_Receiver] = []
        self._next = 0
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._stopping = False

    def start(self, timeout: float = 60.0) -> ReceiverPool:
        """Spawn the receivers and wait until each is ready to take connections."""
        for i in range(self.count):
            self.receivers.append(self._spawn(i))
        deadline = time.monotonic() + timeout
        for r in self.receivers:
            if not r.ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop()
                raise RuntimeError(f"receiver process {r.index + 1} did not start within {timeout:.0f} s "
                                   f"(exit code {r.process.exitcode}); see the log above")
        return self

    def _spawn(self, index: int) -> _Receiver:
        r = _Receiver(self.config, index, self.count, self.log_level)
        reader = threading.Thread(target=self._read, args=(r,), name=f"records-{index + 1}", daemon=True)
        reader.start()
        self._readers.append(reader)
        return r

    def _read(self, r: _Receiver) -> None:
        """Index what a receiver stored, in the order it stored it, until its pipe closes."""
        while True:
            try:
                message = r.records.recv()
            except (EOFError, OSError):
                r.records.close()  # the receiver is gone and everything it sent is indexed
                return
            if message == READY:
                r.ready.set()
                continue
            record, stable_after = message
            self.on_stored(record, stable_after)

    def hand_off(self, listener: int, sock: socket.socket, address) -> bool:
        """Give a connection to the next live receiver; False when none took it."""
        with self._lock:
            order = [(self._next + k) % len(self.receivers) for k in range(len(self.receivers))]
            self._next = (self._next + 1) % max(len(self.receivers), 1)
            candidates = [self.receivers[i] for i in order]
        for r in candidates:
            if not r.process.is_alive():
                continue
            try:
                r.hand_off(listener, sock, address)
                return True
            except OSError as exc:
                log.warning("receiver %d did not take a connection (%s); trying another", r.index + 1, exc)
        return False

    def check(self) -> None:
        """Restart receivers that died (their stored instances' records were read before)."""
        if self._stopping:
            return
        self._readers = [t for t in self._readers if t.is_alive()]
        for i, r in enumerate(self.receivers):
            if not r.process.is_alive():
                log.error("receiver %d exited with %s; restarting it", i + 1, r.process.exitcode)
                r.close()
                self.receivers[i] = self._spawn(i)

    def stop(self) -> None:
        """No more hand-offs; wait for open associations to finish, then stop the receivers."""
        self._stopping = True
        for r in self.receivers:
            r.close()
        deadline = time.monotonic() + DRAIN_SECONDS + 5
        for r in self.receivers:
            r.process.join(max(0.0, deadline - time.monotonic()))
            if r.process.is_alive():
                r.process.terminate()
                r.process.join(5)
        for reader in self._readers:
            reader.join(5)  # the records still in the pipes are indexed before the node stops
        self.receivers = []

    def server_class(self, listener: int) -> type[ThreadedAssociationServer]:
        """The node's association server class for a listener: it hands connections to receivers."""
        pool = self

        class HandOffServer(ThreadedAssociationServer):
            def process_request(self, request, client_address) -> None:
                if pool.hand_off(listener, request, client_address):
                    # close our copy only: shutdown() would end the connection the receiver now serves
                    self.close_request(request)
                else:  # no receiver alive (e.g. restarting): receive here rather than refuse
                    log.warning("no receiver process took the connection from %s; receiving it in the node",
                                client_address[0])
                    super().process_request(request, client_address)

        return HandOffServer


def receiver_main(config: Config, count: int, sockets: Connection, records: Connection,
                  log_level: int = logging.INFO) -> None:
    """Entry point of a receiver process: serve the connections the node hands over."""
    from dicom_node.receive import PeerPolicy, build_ae, listener_handlers
    from storage.filestore import FileStore

    logs.configure_child(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops us (Ctrl-C reaches the whole group)

    def stop(*_) -> None:
        raise _Stop

    # SIGTERM (systemd stops the whole group): take no new connections, let the open ones finish.
    signal.signal(signal.SIGTERM, stop)
    store = FileStore(config.data_dir / "files", min_free_mb=config.storage.min_free_mb,
                      fsync=config.storage.fsync)
    lock = threading.Lock()

    def on_stored(record: InstanceRecord, stable_after: float) -> None:
        # sent before the handler answers Success; a full pipe holds the answer back (backpressure)
        with lock:
            records.send((record, stable_after))

    ae = build_ae(config)
    # the node's limit on open associations, shared among the receivers
    ae.maximum_associations = max(1, math.ceil(config.network.max_associations / count))
    policy = PeerPolicy(config)
    servers = []
    for listener in config.listeners:
        handlers = listener_handlers(listener, policy, store, on_stored)
        server = ae.make_server(("127.0.0.1", 0), ae_title=listener.ae_title, evt_handlers=handlers,
                                server_class=ThreadedAssociationServer)
        server.server_close()  # never listens: its connections come from the node
        servers.append(server)
    log.info("%s started as pid %d", multiprocessing.current_process().name, os.getpid())
    records.send(READY)
    try:
        while True:
            try:
                listener, address = sockets.recv()
                fd = recv_handle(sockets)
            except (EOFError, OSError):
                break
            servers[listener].process_request(socket.socket(fileno=fd), address)
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
    # The node closed our pipe: no new connections; let the open associations finish.
    deadline = time.monotonic() + DRAIN_SECONDS
    while any(s.active_associations for s in servers) and time.monotonic() < deadline:
        time.sleep(0.1)
    records.close()
    log.info("receiver stopped")
