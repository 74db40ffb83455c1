"""Latency fixes for pynetdicom's network loops, written for pynetdicom 3.0.4 only.

pynetdicom polls: its association reactor sleeps 1 ms between looks at the DIMSE queue, its DUL
thread sleeps 1 ms between looks at the socket and at the outgoing queue, and it reads each PDU
from the socket 4 KiB at a time. On a serial C-STORE exchange (send, wait for the response, send
the next) these cost ~2 ms and a few hundred system calls per image, more than the work itself.

The overrides below keep pynetdicom's logic and only change how it waits and reads:

- the association reactor's sleep waits on its DIMSE message queue (woken when a message arrives);
- the DUL thread's sleep waits in ``select`` on its socket and on a wake-up socket that
  ``send_pdu`` pokes, so it reacts at once to incoming data and to outgoing responses;
- ``AssociationSocket.recv`` reads a whole PDU with ``recv_into`` into one buffer.

``apply()`` refuses to patch any other pynetdicom version (the node then runs unpatched, slower,
and says so); ``tests/test_pynetdicom_tuning.py`` covers the behaviour.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time as _time

import pynetdicom
from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom import transport as _transport

log = logging.getLogger(__name__)
WRITTEN_FOR = "3.0.4"
_applied = False


class _DulTime:
    """Stand-in for the ``time`` module inside ``pynetdicom.dul``: ``sleep`` waits for events."""

    def __getattr__(self, name):
        return getattr(_time, name)

    @staticmethod
    def sleep(delay: float) -> None:
        thread = threading.current_thread()
        wake = getattr(thread, "_ctvlp_wake_r", None)
        sock = getattr(getattr(thread, "socket", None), "socket", None)
        if wake is None or sock is None:
            _time.sleep(delay)
            return
        try:
            ready, _, _ = select.select([sock, wake], [], [], delay)
        except (OSError, ValueError):  # socket closed under us: let the DUL notice
            _time.sleep(delay)
            return
        if wake in ready:
            try:
                wake.recv(4096)
            except OSError:
                pass


class _AssociationTime:
    """Stand-in for ``time`` inside ``pynetdicom.association``: the reactor waits on its queue."""

    def __getattr__(self, name):
        return getattr(_time, name)

    @staticmethod
    def sleep(delay: float) -> None:
        thread = threading.current_thread()
        # only the acceptor reactor's 1 ms poll is replaced; a requestor's user thread blocks on the
        # same queue for its responses and must keep being the one that is woken
        if delay != 0.001 or not isinstance(thread, _association.Association) or not thread.is_acceptor:
            _time.sleep(delay)
            return
        q = thread.dimse.msg_queue
        with q.not_empty:
            if not q._qsize():
                # a longer wait is fine: messages wake it at once; release/abort are seen within 5 ms
                q.not_empty.wait(0.005)
            if q._qsize():
                q.not_empty.notify()  # pass the wake-up on: another thread may be waiting to get()


def _recv(self, nr_bytes: int) -> bytearray:
    """Read ``nr_bytes`` (or until the peer closes) into one buffer."""
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    while got < nr_bytes:
        n = self.socket.recv_into(view[got:], nr_bytes - got)
        if not n:
            break
        got += n
    view.release()
    if got < nr_bytes:
        del buf[got:]
    return buf


def _wrap_run_reactor(original):
    def run_reactor(self) -> None:
        self._ctvlp_wake_r, self._ctvlp_wake_w = socket.socketpair()
        self._ctvlp_wake_r.setblocking(False)
        self._ctvlp_wake_w.setblocking(False)
        try:
            original(self)
        finally:
            for s in (self._ctvlp_wake_r, self._ctvlp_wake_w):
                s.close()
            self._ctvlp_wake_w = None

    return run_reactor


def _wrap_send_pdu(original):
    def send_pdu(self, primitive) -> None:
        original(self, primitive)
        wake = getattr(self, "_ctvlp_wake_w", None)
        if wake is not None:
            try:
                wake.send(b"\0")
            except OSError:  # buffer full (already poked) or closed: nothing to do
                pass

    return send_pdu


def apply() -> bool:
    """Install the overrides once; False (and a warning) when pynetdicom is not the pinned version."""
    global _applied
    if _applied:
        return True
    if pynetdicom.__version__ != WRITTEN_FOR:
        log.warning("pynetdicom %s is installed; the latency fixes are written for %s and are not applied "
                    "(the node works, receives more slowly). Install pynetdicom==%s.",
                    pynetdicom.__version__, WRITTEN_FOR, WRITTEN_FOR)
        return False
    _dul.time = _DulTime()
    _association.time = _AssociationTime()
    _transport.AssociationSocket.recv = _recv
    _dul.DULServiceProvider.run_reactor = _wrap_run_reactor(_dul.DULServiceProvider.run_reactor)
    _dul.DULServiceProvider.send_pdu = _wrap_send_pdu(_dul.DULServiceProvider.send_pdu)
    _applied = True
    return True


def applied() -> bool:
    """Whether the overrides are installed in this process."""
    return _applied
