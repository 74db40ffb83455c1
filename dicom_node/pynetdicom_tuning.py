"""Latency fixes for pynetdicom's network loops, written for pynetdicom 3.0.4 only.

pynetdicom polls: its association reactor sleeps 1 ms between looks at the DIMSE queue, its DUL
thread sleeps 1 ms between looks at the socket and at the outgoing queue, and it reads each PDU
from the socket 4 KiB at a time. On a serial C-STORE exchange (send, wait for the response, send
the next) these cost ~2 ms and a few hundred system calls per image, more than the work itself.

The overrides below keep pynetdicom's logic and only change how it waits and reads:

- the acceptor's association reactor sleep waits on its DIMSE message queue (woken when a
  message arrives);
- a requestor's association reactor sleep returns as soon as the user thread asks it to pause
  (every ``send_c_store`` does), and the user thread, instead of polling ``_is_paused`` with
  0.1 ms sleeps (0.3-0.5 ms per image on a busy machine), waits for the reactor to say it paused;
- the DUL thread's sleep waits in ``select`` on its socket and on a wake-up socket that
  ``send_pdu`` pokes, so it reacts at once to incoming data and to outgoing responses;
- ``AssociationSocket.recv`` reads a whole PDU with ``recv_into`` into one buffer;
- an acceptor serves a complete C-STORE request on the DUL thread that decoded it, instead of
  handing it to the association thread and back for the response: two thread wake-ups fewer per
  image, each of which costs scheduling latency on a busy machine. Anything unusual (another
  service, an unknown context, a release under way) still goes through the queue;
- a P-DATA-TF PDU is read into one buffer and its data values are views of it: pynetdicom
  otherwise copies each 128 KiB fragment five times (concatenation, ``bytes()``, field slice,
  item slice, control-byte slice) before the one copy into the message's data set;
- a requestor's user thread sends its P-DATA-TF PDUs itself, under a per-connection send lock
  that the DUL thread's sends take too, instead of queueing each 128 KiB fragment for the DUL
  thread and waking it (five wake-ups per image). Only in the established state (Sta6, whose
  P-DATA action sends and stays in Sta6), on plain TCP, from a thread other than the DUL's;
- a P-DATA-TF PDU goes out with one ``sendmsg`` of its headers and data values instead of being
  joined into new bytes twice (item, then PDU) before ``send``;
- pynetdicom's standard logging handlers, which format every PDU and DIMSE message for its INFO
  and DEBUG log, are not bound when that log is off (a supported setting, ``LOG_HANDLER_LEVEL``);
- DIMSE command sets (group 0000, always Implicit VR Little Endian, a handful of integers and
  strings) are encoded by a small direct encoder instead of ``pydicom.write_dataset``, which
  pynetdicom calls twice per message (once only to measure the group length); anything the
  direct encoder does not know falls back to pydicom; received command sets are decoded the same
  way (~0.15 ms per message through pydicom's reader and its value checks, a fifth of that here);
- each new association copies the server's ~150 supported presentation contexts with a flat
  copy instead of ``copy.deepcopy`` (~100 ms per association, all of it pydicom UID objects
  that are never mutated).

Two direct paths skip pynetdicom's message layer for the one message the node moves in bulk,
C-STORE, and fall back to it for anything unusual; each is tested to put the same bytes on the
wire as pynetdicom does:

- ``store_file`` (the node's SCU, ``send.py``) sends a stored Part 10 file: the command set
  encoded directly, the file read once, its P-DATA-TF PDUs sent with one ``sendmsg`` of views
  (pynetdicom builds a request primitive, a message with a pre-filled pydicom command dataset,
  and a copy of every 128 KiB fragment per image);
- an acceptor whose C-STORE handler offers ``store_raw`` (the node's ``StoreHandler``) takes each
  C-STORE request from its P-DATA-TF items on the DUL thread that read them, calls the handler
  and sends the response directly (pynetdicom runs its state machine and DIMSE decoder per PDU,
  then builds a request primitive, an event, a status dataset and a response message per image).

``apply()`` refuses to patch any other pynetdicom version (the node then runs unpatched, slower,
and says so); ``tests/test_pynetdicom_tuning.py`` covers the behaviour.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import copy
import functools
import time as _time
from io import BytesIO

import pynetdicom
from pynetdicom import _config
from pynetdicom import association as _association
from pynetdicom import dimse as _dimse
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dsutils as _dsutils
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_has_tag, dictionary_VM, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom import dul as _dul
from pynetdicom import transport as _transport
from pynetdicom.presentation import PresentationContext

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
        if delay != 0.001 or not isinstance(thread, _association.Association):
            _time.sleep(delay)
            return
        if not thread.is_acceptor:
            # a requestor's user thread blocks on the DIMSE queue for its responses and must stay the
            # one woken by them; the reactor only needs to notice a pause request quickly
            checkpoint = thread._reactor_checkpoint
            if isinstance(checkpoint, _Checkpoint):
                checkpoint.cleared.wait(delay)
                checkpoint.cleared.clear()
            else:
                _time.sleep(delay)
            return
        q = thread.dimse.msg_queue
        with q.not_empty:
            if not q._qsize():
                # a longer wait is fine: messages wake it at once; release/abort are seen within 5 ms
                q.not_empty.wait(0.005)
            if q._qsize():
                q.not_empty.notify()  # pass the wake-up on: another thread may be waiting to get()


class _Checkpoint(threading.Event):
    """The association's pause flag; ``clear()`` (a pause request) also wakes the reactor's sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.cleared = threading.Event()
        self.lock = threading.Lock()

    def clear(self) -> None:
        with self.lock:  # see _wrap_get_msg: no reactor poll of the DIMSE queue straddles a pause
            super().clear()
        self.cleared.set()


def _wrap_get_msg(original):
    def get_msg(self, block: bool = False):
        # pynetdicom's pause handshake is racy: a requestor's reactor can pass its checkpoint just
        # before the user thread pauses it, then take the user's C-STORE response off the queue; the
        # user waits for the DIMSE timeout and the association is aborted. The reactor's poll
        # therefore never takes a message while a pause is requested.
        assoc = self.assoc
        checkpoint = getattr(assoc, "_reactor_checkpoint", None)
        if block or not isinstance(checkpoint, _Checkpoint) or threading.current_thread() is not assoc:
            return original(self, block)
        with checkpoint.lock:
            if not checkpoint.is_set():
                return None, None
            return original(self, block)

    return get_msg


class _MessageQueue(queue.Queue):
    """An association's DIMSE message queue that serves C-STORE requests where they are decoded."""

    def __init__(self, assoc) -> None:
        super().__init__()
        self.assoc = assoc

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        assoc = self.assoc
        context_id, msg = item
        # is_established: the association thread sets it only after sending A-ASSOCIATE-AC and
        # running the EVT_ACCEPTED handlers, so a first request can arrive before it; served now,
        # pynetdicom's storage SCP would see "not established" and send no response at all. The
        # queue holds such a request until the association thread's reactor serves it.
        if (type(msg) is C_STORE and assoc.is_acceptor and threading.current_thread() is assoc.dul
                and assoc.is_established
                and msg.is_valid_request and not assoc._sent_release and not assoc._kill
                and context_id in assoc._accepted_cx
                and uid_to_service_class(assoc._accepted_cx[context_id].abstract_syntax) is StorageServiceClass):
            # the same call the association thread would make; it sends the response itself
            assoc._serve_request(msg, context_id)
            return
        super().put(item, block, timeout)


def _get_is_paused(self) -> bool:
    state = self.__dict__
    value = state.get("_ctvlp_is_paused", False)
    paused = state.get("_ctvlp_paused")
    checkpoint = state.get("_reactor_checkpoint")
    if (not value and paused is not None and isinstance(checkpoint, _Checkpoint) and not checkpoint.is_set()
            and threading.current_thread() is not self):
        # a user thread that asked the reactor to pause (send_c_*) and polls this flag: wait for
        # the reactor to set it (its poll loop re-reads the flag, so a timeout only costs a turn)
        paused.wait(0.005)
        value = state.get("_ctvlp_is_paused", False)
    return value


def _set_is_paused(self, value: bool) -> None:
    self.__dict__["_ctvlp_is_paused"] = value
    paused = self.__dict__.get("_ctvlp_paused")
    if paused is not None:
        if value:
            paused.set()
        else:
            paused.clear()


def _wrap_association_init(original):
    def __init__(self, *args, **kwargs) -> None:
        self.__dict__["_ctvlp_paused"] = threading.Event()
        original(self, *args, **kwargs)
        self.dimse.msg_queue = _MessageQueue(self)
        self.dul._ctvlp_send_lock = threading.Lock()
        checkpoint = _Checkpoint()
        if self._reactor_checkpoint.is_set():
            checkpoint.set()
        self._reactor_checkpoint = checkpoint

    return __init__


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


_STRING_PAD = {"UI": b"\0", "AE": b" ", "CS": b" ", "SH": b" ", "LO": b" ", "ST": b" ", "LT": b" "}


def _encode_command(ds) -> bytes | None:
    """Implicit VR Little Endian bytes of a command set, or None when it holds anything unusual."""
    out = []
    elements = ds._dict
    for tag in sorted(elements):
        elem = elements[tag]
        if type(elem) is not DataElement or tag >> 16 != 0:
            return None
        vr, value = elem.VR, elem.value
        if value is None or value == "":
            raw = b""
        elif vr in _STRING_PAD and isinstance(value, str):
            try:
                raw = value.encode("ascii")
            except UnicodeEncodeError:
                return None
            if len(raw) % 2:
                raw += _STRING_PAD[vr]
        elif vr == "US" and type(value) is int and 0 <= value < 1 << 16:
            raw = struct.pack("<H", value)
        elif vr == "UL" and type(value) is int and 0 <= value < 1 << 32:
            raw = struct.pack("<L", value)
        else:
            return None
        out.append(struct.pack("<HHL", 0, tag & 0xFFFF, len(raw)))
        out.append(raw)
    return b"".join(out)


def _fast_encode(ds, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    """``dsutils.encode`` for ``dimse_messages``: command sets directly, anything else through pydicom."""
    if is_implicit_vr and is_little_endian and not deflated:
        raw = _encode_command(ds)
        if raw is not None:
            return raw
    return _dsutils.encode(ds, is_implicit_vr, is_little_endian, deflated)


_DECODED_VRS = ("US", "UL", "UI", "AE", "LO")  # what the direct decoder converts; others go to pydicom


@functools.lru_cache(maxsize=None)
def _command_vr(element: int) -> str | None:
    """The VR of command element (0000,element) from pydicom's dictionary, if single-valued and decoded here."""
    if not dictionary_has_tag(element) or dictionary_VM(element) != "1":  # group 0000: the tag is the element
        return None
    vr = dictionary_VR(element)
    return vr if vr in _DECODED_VRS else None


class _Unusual(Exception):
    """A command set the direct decoders leave to pydicom."""


def _command_elements(raw):
    """(element, value) of each element of an Implicit VR Little Endian command set (group 0000)."""
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 8:
            raise _Unusual
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise _Unusual
        yield element, raw[pos:pos + length]
        pos += length


def _command_value(vr: str, value) -> int | str:
    """A single value of VR US, UL, UI, AE or LO, converted as pydicom does."""
    if vr == "US" or vr == "UL":
        if len(value) != (2 if vr == "US" else 4):
            raise _Unusual
        return int.from_bytes(value, "little")
    try:
        text = bytes(value).decode("ascii")
    except UnicodeDecodeError:
        raise _Unusual from None
    if "\\" in text:
        raise _Unusual  # several values
    # as pydicom converts them: AE stripped on both sides, UI and LO of trailing padding
    return text.strip() if vr == "AE" else text.rstrip("\0 ")


def _decode_command(raw: bytes) -> Dataset | None:
    """A command set's Dataset from its Implicit VR Little Endian bytes, or None if unusual."""
    ds = Dataset()
    try:
        for element, value in _command_elements(raw):
            vr = _command_vr(element)
            if vr is None:
                return None
            parsed = _command_value(vr, value)
            ds.add(DataElement(element, vr, UID(parsed) if vr == "UI" else parsed,
                               validation_mode=pydicom_config.IGNORE))
    except _Unusual:
        return None
    ds.set_original_encoding(True, True, "iso8859")
    return ds


def _fast_decode(bytestream, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> Dataset:
    """``dsutils.decode`` for ``dimse_messages``: command sets directly, anything else through pydicom."""
    if is_implicit_vr and is_little_endian and not deflated:
        ds = _decode_command(bytestream.getvalue())
        if ds is not None:
            return ds
        bytestream.seek(0)
    return _dsutils.decode(bytestream, is_implicit_vr, is_little_endian, deflated)


def _copy_contexts(value, memo=None):
    """``deepcopy`` for ``transport``: a flat copy of a list of presentation contexts.

    A context holds ints, bools and UIDs (immutable ``str``) plus one list of transfer syntaxes,
    which negotiation may replace but must not share: that list is copied, nothing else needs to be.
    """
    if isinstance(value, list) and all(type(cx) is PresentationContext for cx in value):
        out = []
        for cx in value:
            new = PresentationContext.__new__(PresentationContext)
            new.__dict__.update(cx.__dict__)
            new._transfer_syntax = list(cx._transfer_syntax)
            out.append(new)
        return out
    return copy.deepcopy(value, memo)


def _wrap_read_pdu_data(original):
    def _read_pdu_data(self) -> None:
        sock = self.socket
        raw = getattr(sock, "socket", None)
        if raw is None or isinstance(raw, ssl.SSLSocket) or self.assoc.get_handlers(evt.EVT_DATA_RECV):
            return original(self)  # TLS, or someone wants the raw bytes: pynetdicom's own path
        try:
            if raw.recv(1, socket.MSG_PEEK) != b"\x04":
                return original(self)  # not P-DATA (or closed): pynetdicom reads and decodes it
            header = sock.recv(6)
        except (OSError, TimeoutError):
            _dul.LOGGER.error("Connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return None
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return None
        length = struct.unpack(">L", header[2:])[0]
        try:
            body = sock.recv(length)
        except (OSError, TimeoutError):
            _dul.LOGGER.error("Connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return None
        if len(body) != length:
            _dul.LOGGER.error(f"The received PDU is shorter than expected ({len(body) + 6} of "
                              f"{length + 6} bytes received)")
            self.event_queue.put("Evt17")
            return None
        view = memoryview(body)
        items = []
        offset = 0
        while offset < length:
            if offset + 5 > length:
                break
            item_length = int.from_bytes(body[offset:offset + 4], "big")
            end = offset + 4 + item_length
            if item_length < 1 or end > length:
                break
            items.append((body[offset + 4], view[offset + 5:end]))
            offset = end
        if offset != length:
            _dul.LOGGER.error("Unable to decode the received PDU data")
            self.event_queue.put("Evt19")
            return None
        if _take_pdata(self, items):
            return None
        pdu = P_DATA_TF()
        for context_id, value in items:
            item = PresentationDataValueItem()
            item.presentation_context_id = context_id
            item.presentation_data_value = value
            pdu.presentation_data_value_items.append(item)
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        self.event_queue.put("Evt10")
        self._recv_pdu.put(pdu)
        return None

    return _read_pdu_data


def _wrap_send(original):
    def _send(self, pdu) -> None:
        lock = getattr(self, "_ctvlp_send_lock", None)
        if lock is None:
            return _send_unlocked(self, pdu)
        with lock:
            return _send_unlocked(self, pdu)

    def _send_unlocked(self, pdu) -> None:
        sock = self.socket
        raw = getattr(sock, "socket", None)
        if (type(pdu) is not P_DATA_TF or raw is None or isinstance(raw, ssl.SSLSocket)
                or self.assoc.get_handlers(evt.EVT_DATA_SENT)):
            return original(self, pdu)
        parts = []
        length = 0
        for item in pdu.presentation_data_value_items:
            value = item.presentation_data_value
            parts.append(struct.pack(">LB", len(value) + 1, item.presentation_context_id))
            parts.append(value)
            length += 5 + len(value)
        parts.insert(0, struct.pack(">BBL", 0x04, 0x00, length))
        try:
            _send_all(raw, parts)
        except Exception:  # as AssociationSocket.send: the connection is gone
            sock.event_queue.put("Evt17")
            return None
        evt.trigger(self.assoc, evt.EVT_PDU_SENT, {"pdu": pdu})
        return None

    return _send


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
        if (type(primitive) is P_DATA and not self.assoc.is_acceptor and threading.current_thread() is not self
                and getattr(self, "_ctvlp_send_lock", None) is not None
                and self.state_machine.current_state == "Sta6"
                and not isinstance(getattr(self.socket, "socket", None), ssl.SSLSocket)):
            self._send(P_DATA_TF(primitive))  # what DT_1 does on the DUL thread, under the send lock
            return
        original(self, primitive)
        wake = getattr(self, "_ctvlp_wake_w", None)
        # the DUL thread itself (a C-STORE response) looks at its queue before it sleeps again
        if wake is not None and threading.current_thread() is not self:
            try:
                wake.send(b"\0")
            except OSError:  # buffer full (already poked) or closed: nothing to do
                pass

    return send_pdu


# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call
_IOV_CHUNK = 512
# the VRs whose Explicit VR Little Endian elements carry a 4-byte length after 2 reserved bytes
EXPLICIT_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                               b"UT", b"UV"})


def _send_all(sock: socket.socket, parts: list) -> None:
    """Send the concatenation of ``parts`` (bytes or views) with as few ``sendmsg`` calls as it takes."""
    for start in range(0, len(parts), _IOV_CHUNK):
        views = parts[start:start + _IOV_CHUNK]
        while views:
            n = sock.sendmsg(views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views:
                views[0] = memoryview(views[0])[n:]


def _file_meta(data) -> tuple[dict[int, str], int] | None:
    """The UI values of a Part 10 file's meta group (by element) and the data set's offset, or None."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return None
    group_length = struct.unpack_from("<HL", data, 138)
    if group_length[0] != 4:
        return None
    end = 144 + group_length[1]
    if end > len(data):
        return None
    values: dict[int, str] = {}
    pos = 144
    while pos < end:
        if pos + 8 > end:
            return None
        group, element = struct.unpack_from("<HH", data, pos)
        vr = bytes(data[pos + 4:pos + 6])
        if group != 2:
            return None
        if vr in EXPLICIT_LONG_VRS:
            if pos + 12 > end:
                return None
            length, start = struct.unpack_from("<L", data, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        if start + length > end:
            return None
        if vr == b"UI":
            try:
                values[element] = bytes(data[start:start + length]).decode("ascii").rstrip("\0 ")
            except UnicodeDecodeError:
                return None
        pos = start + length
    return values, end


def _ui(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\0"
    return struct.pack("<HHL", 0, element, len(raw)) + raw


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHLH", 0, element, 2, value)


def c_store_rq_command(sop_class: str, sop_instance: str, msg_id: int, priority: int = 2) -> bytes:
    """The Implicit VR Little Endian command set of a C-STORE-RQ with a data set, as pynetdicom encodes it."""
    body = b"".join((_ui(0x0002, sop_class), _us(0x0100, 0x0001), _us(0x0110, msg_id), _us(0x0700, priority),
                     _us(0x0800, 0x0001), _ui(0x1000, sop_instance)))
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _pdata_pdus(context_id: int, control: int, last: int, data: memoryview, fragment: int) -> list:
    """One P-DATA-TF PDU (header, then a view of the value) per fragment of ``data``."""
    parts = []
    n = len(data)
    step = fragment if fragment > 0 else max(n, 1)
    for offset in range(0, max(n, 1), step):
        chunk = data[offset:offset + step]
        flag = last if offset + step >= n else control
        parts.append(struct.pack(">BBLLBB", 0x04, 0x00, 6 + len(chunk), 2 + len(chunk), context_id, flag))
        parts.append(chunk)
    return parts


_SENT_EVENTS = (evt.EVT_PDU_SENT, evt.EVT_DATA_SENT, evt.EVT_DIMSE_SENT)


def store_file(assoc, context_id: int, path, transfer_syntax: str, msg_id: int = 1) -> Dataset | None:
    """C-STORE a Part 10 file's data set as stored, encoding the message directly; None to use pynetdicom.

    The same bytes pynetdicom sends for ``send_c_store(path)`` (command set, one PDV per
    P-DATA-TF PDU, fragments of the peer's maximum length), without its per-message pydicom
    datasets, primitives and copies of each fragment: the file is read once and its PDUs go out in
    one ``sendmsg`` of views of it. Returns the response status like ``send_c_store``, or None
    (nothing sent) when anything is unusual: another pynetdicom version, TLS, event handlers that
    want the sent PDUs or messages, a file meta group it does not read, or a file whose transfer
    syntax is not ``transfer_syntax`` (the presentation context's).
    """
    dul = assoc.dul
    lock = getattr(dul, "_ctvlp_send_lock", None)
    raw = getattr(dul.socket, "socket", None) if dul.socket is not None else None
    if (not _applied or lock is None or not assoc.is_requestor or not assoc.is_established or raw is None
            or isinstance(raw, ssl.SSLSocket) or any(assoc.get_handlers(e) for e in _SENT_EVENTS)):
        return None
    with open(path, "rb") as f:
        data = f.read()
    meta = _file_meta(data)
    if meta is None:
        return None
    values, offset = meta
    sop_class, sop_instance = values.get(0x0002), values.get(0x0003)
    if not sop_class or not sop_instance or values.get(0x0010) != str(transfer_syntax):
        return None
    peer_max = assoc.dimse.maximum_pdu_size
    fragment = peer_max - 6 if peer_max else 0
    view = memoryview(data)
    parts = _pdata_pdus(context_id, 0x01, 0x03, memoryview(c_store_rq_command(sop_class, sop_instance, msg_id)),
                        fragment)
    parts += _pdata_pdus(context_id, 0x00, 0x02, view[offset:], fragment)
    # as send_c_store: pause the reactor first, so that it cannot take the response off the queue
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    while not assoc._is_paused:
        _time.sleep(0.0001)
    sent = False
    dul._ctvlp_awaiting = (context_id, msg_id)  # its response may be read directly (_take_pdata)
    with lock:
        if dul.state_machine.current_state == "Sta6":  # established: DT-1 sends and stays in Sta6
            sent = True
            try:
                _send_all(raw, parts)
            except Exception:  # as AssociationSocket.send: the connection is gone
                dul.socket.event_queue.put("Evt17")
    if not sent:
        dul._ctvlp_awaiting = None
        checkpoint.set()
        return None
    _cx, rsp = assoc.dimse.get_msg(block=True)
    dul._ctvlp_awaiting = None
    checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    if isinstance(rsp, Dataset):  # read directly: already the status
        return rsp
    return assoc._check_received_status(rsp)


def c_store_rsp_command(sop_class: str, sop_instance: str, msg_id: int, status: int,
                        comment: str | None = None) -> bytes:
    """The Implicit VR Little Endian command set of a C-STORE-RSP, as pynetdicom encodes it."""
    elements = [_ui(0x0002, sop_class), _us(0x0100, 0x8001), _us(0x0120, msg_id), _us(0x0800, 0x0101),
                _us(0x0900, status)]
    if comment:
        raw = comment[:64].encode("ascii", "replace")
        if len(raw) % 2:
            raw += b" "
        elements.append(struct.pack("<HHL", 0, 0x0902, len(raw)) + raw)
    elements.append(_ui(0x1000, sop_instance))
    body = b"".join(elements)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


# what a C-STORE-RQ command set may hold for the receive path below: anything else goes to pynetdicom
_STORE_RQ_ELEMENTS = {0x0000: "UL", 0x0002: "UI", 0x0100: "US", 0x0110: "US", 0x0700: "US", 0x0800: "US",
                      0x1000: "UI", 0x1030: "AE", 0x1031: "US"}
_RECEIVE_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_DATA_RECV, evt.EVT_DIMSE_RECV, evt.EVT_PDU_SENT,
                   evt.EVT_DATA_SENT, evt.EVT_DIMSE_SENT)


def _command_values(raw, allowed: dict[int, str]) -> dict[int, object] | None:
    """The values of a command set's elements, by element number, when all are in ``allowed``
    (element -> VR) and single-valued; None otherwise."""
    values: dict[int, object] = {}
    try:
        for element, value in _command_elements(raw):
            vr = allowed.get(element)
            if vr is None or element in values:
                return None
            values[element] = _command_value(vr, value)
    except _Unusual:
        return None
    return values


def _store_request(raw) -> tuple[str, str, int] | None:
    """(SOP class, SOP instance, message ID) of a C-STORE-RQ command set with a data set, or None."""
    values = _command_values(raw, _STORE_RQ_ELEMENTS)
    if values is None:
        return None
    sop_class, sop_instance, msg_id = values.get(0x0002), values.get(0x1000), values.get(0x0110)
    if (values.get(0x0100) != 0x0001 or values.get(0x0800, 0x0101) == 0x0101 or not sop_class
            or not sop_instance or msg_id is None):
        return None
    return sop_class, sop_instance, msg_id


_STORE_RSP_ELEMENTS = {0x0000: "UL", 0x0002: "UI", 0x0100: "US", 0x0120: "US", 0x0800: "US", 0x0900: "US",
                       0x0902: "LO", 0x1000: "UI"}


def _store_response(raw, msg_id: int) -> Dataset | None:
    """The status of a C-STORE-RSP command set answering ``msg_id``, as ``send_c_store`` returns it; None
    when it is anything else (pynetdicom then decodes it)."""
    values = _command_values(raw, _STORE_RSP_ELEMENTS)
    if values is None:
        return None
    if (values.get(0x0100) != 0x8001 or values.get(0x0120) != msg_id or values.get(0x0800) != 0x0101
            or 0x0900 not in values):
        return None
    status = Dataset()
    status.Status = values[0x0900]
    if values.get(0x0902):
        status.ErrorComment = values[0x0902]
    return status


def _take_pdata(dul, items: list) -> bool:
    """Serve the C-STORE traffic of received P-DATA-TF items directly; False leaves them to pynetdicom."""
    if dul.assoc.is_acceptor:
        return _take_store(dul, items)
    awaiting = dul.__dict__.get("_ctvlp_awaiting")
    if awaiting is None or len(items) != 1:
        return False
    context_id, value = items[0]
    # a response in one PDV of its own, to the request store_file is waiting for
    if context_id != awaiting[0] or len(value) < 2 or value[0] != 0x03 or dul.assoc.dimse.message is not None:
        return False
    status = _store_response(value[1:], awaiting[1])
    if status is None:
        return False
    dul._ctvlp_awaiting = None
    dul.assoc.dimse.msg_queue.put((context_id, status))
    return True


class _Incoming:
    """A C-STORE request that the receive path below is taking in: its command and data fragments."""

    __slots__ = ("context", "sop_class", "sop_instance", "msg_id", "handler", "fragments")

    def __init__(self, context, sop_class: str, sop_instance: str, msg_id: int, handler) -> None:
        self.context = context
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.msg_id = msg_id
        self.handler = handler
        self.fragments: list = []


def _take_store(dul, items: list) -> bool:
    """Serve C-STORE requests straight from their P-DATA-TF items; False leaves the PDU to pynetdicom.

    An acceptor whose EVT_C_STORE handler has a ``store_raw`` method (the node's) gets each
    C-STORE request here, on the DUL thread that read it: the command set decoded directly, the
    data fragments joined once, the handler called, and the response encoded and sent directly.
    pynetdicom would run its state machine and DIMSE decoder for every PDU and build a request
    primitive, an event and a response message, with pydicom datasets, per image. A request is
    only taken when it starts in a PDU of its own with the whole command set, on an established
    association, on an accepted context of a storage SOP class, with no other message being
    decoded by pynetdicom and nobody listening to the raw PDUs or messages; anything else goes to
    pynetdicom as before. A request that is taken is finished here: a data fragment of another
    context, or a command in the middle of its data, aborts the association (pynetdicom would
    answer neither).
    """
    assoc = dul.assoc
    incoming = dul.__dict__.get("_ctvlp_incoming")
    if incoming is None:
        if len(items) != 1:
            return False
        context_id, value = items[0]
        if len(value) < 2 or value[0] != 0x03:
            return False
        handler, args = assoc.get_handlers(evt.EVT_C_STORE)
        store_raw = getattr(handler, "store_raw", None)
        if (store_raw is None or args or not assoc.is_established or assoc._sent_release or assoc._kill
                or assoc.dimse.message is not None or any(assoc.get_handlers(e) for e in _RECEIVE_EVENTS)):
            return False
        request = _store_request(value[1:])
        context = assoc._accepted_cx.get(context_id)
        if request is None or context is None or _config.UNRESTRICTED_STORAGE_SERVICE:
            return False
        sop_class, sop_instance, msg_id = request
        if (sop_class in assoc.acceptor.accepted_common_extended
                or uid_to_service_class(sop_class) is not StorageServiceClass):
            return False
        dul._ctvlp_incoming = _Incoming(context, sop_class, sop_instance, msg_id, store_raw)
        return True
    for i, (context_id, value) in enumerate(items):
        if context_id != incoming.context.context_id:
            problem = f"a fragment on context {context_id} inside a C-STORE on context {incoming.context.context_id}"
        elif len(value) < 1 or value[0] & 0x01:
            problem = "a command fragment where the C-STORE's data should go on"
        elif value[0] & 0x02 and i != len(items) - 1:
            problem = "more data after the C-STORE's last fragment in the same PDU"
        else:
            problem = None
        if problem:
            dul._ctvlp_incoming = None
            log.error("C-STORE from AE %r at %s: %s; the association is aborted. The sending system breaks the "
                      "DICOM message format (PS3.8 Annex E); its vendor should see this",
                      assoc.requestor.ae_title.strip(), assoc.requestor.address, problem)
            assoc.abort(block=False)  # on the DUL thread: a blocking abort would wait for this thread
            return True
        incoming.fragments.append(value[1:])
        if value[0] & 0x02:
            dul._ctvlp_incoming = None
            _answer_store(dul, incoming)
    return True


def _answer_store(dul, incoming: _Incoming) -> None:
    assoc = dul.assoc
    data = BytesIO(b"".join(incoming.fragments))
    incoming.fragments.clear()  # the PDU buffers can go now
    cx = incoming.context
    try:
        code, comment = incoming.handler(assoc, cx.abstract_syntax, cx.transfer_syntax[0], incoming.sop_instance,
                                         data)
    except Exception:  # as pynetdicom answers a handler's exception
        log.exception("exception in the C-STORE handler")
        code, comment = 0xC211, None
    if not assoc.is_established:
        return
    command = c_store_rsp_command(incoming.sop_class, incoming.sop_instance, incoming.msg_id, code, comment)
    peer_max = assoc.dimse.maximum_pdu_size
    parts = _pdata_pdus(cx.context_id, 0x01, 0x03, memoryview(command), peer_max - 6 if peer_max else 0)
    raw = dul.socket.socket
    with dul._ctvlp_send_lock:
        if dul.state_machine.current_state != "Sta6":
            return
        try:
            _send_all(raw, parts)
        except Exception:  # as AssociationSocket.send: the connection is gone
            dul.socket.event_queue.put("Evt17")


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
    _association.Association.__init__ = _wrap_association_init(_association.Association.__init__)
    _association.Association._is_paused = property(_get_is_paused, _set_is_paused)
    _dimse.DIMSEServiceProvider.get_msg = _wrap_get_msg(_dimse.DIMSEServiceProvider.get_msg)
    _transport.AssociationSocket.recv = _recv
    _dul.DULServiceProvider._send = _wrap_send(_dul.DULServiceProvider._send)
    _dul.DULServiceProvider._read_pdu_data = _wrap_read_pdu_data(_dul.DULServiceProvider._read_pdu_data)
    _dimse_messages.encode = _fast_encode
    _dimse_messages.decode = _fast_decode
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        _config.LOG_HANDLER_LEVEL = "none"
    _transport.deepcopy = _copy_contexts
    _dul.DULServiceProvider.run_reactor = _wrap_run_reactor(_dul.DULServiceProvider.run_reactor)
    _dul.DULServiceProvider.send_pdu = _wrap_send_pdu(_dul.DULServiceProvider.send_pdu)
    _applied = True
    return True


def applied() -> bool:
    """Whether the overrides are installed in this process."""
    return _applied
