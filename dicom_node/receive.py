"""The Storage SCP: C-ECHO and C-STORE handlers and the association allow-list.

The C-STORE handler is thin: it checks the few attributes the node needs, writes the encoded
bytes durably, queues an index record and answers. No decoding of pixel data, no routing and
no inference happen here.
"""

from __future__ import annotations

import errno
import fnmatch
import ipaddress
import logging
import socket
import struct
import threading
import zlib
from io import BytesIO
from collections.abc import Callable
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import pynetdicom_tuning
from dicom_node.config import Config, Listener
from storage.filestore import DiskFull, FileStore
from storage.index import InstanceRecord

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
PIXEL_DATA = 0x7FE00010
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# Our implementation's identity in the files we write: a UUID-derived UID (2.25 root, ISO/IEC 9834-8).
IMPLEMENTATION_CLASS_UID = "2.25.232370331599381958183012465658218429614"
IMPLEMENTATION_VERSION_NAME = "CTVLP_0_1"


def status(code: int, comment: str | None = None) -> Dataset:
    """A C-STORE status dataset, with an Error Comment for failures (at most 64 characters)."""
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def set_nodelay(event: evt.Event) -> None:
    """Turn Nagle off on a new connection: small DIMSE responses must not wait 40 ms."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


@dataclass
class PeerPolicy:
    """The calling-AE + address allow-list."""

    config: Config

    def allows(self, ae_title: str, address: str) -> bool:
        """True when some allowed_peers entry matches the calling AE title and address."""
        if not self.config.network.require_known_peers:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        for peer in self.config.network.allowed_peers:
            if fnmatch.fnmatchcase(ae_title.strip(), peer.ae_title) and any(
                    ip in ipaddress.ip_network(h, strict=False) for h in peer.hosts):
                return True
        return False


# Called with each newly stored instance's index record and its listener's stable_after, before
# the C-STORE is answered: the node indexes it and (re)starts the series' completion timer.
OnStored = Callable[[InstanceRecord, float], None]


class StoreHandler:
    """Handles C-STORE requests for one listener."""

    def __init__(self, listener: Listener, store: FileStore, on_stored: OnStored):
        self.listener = listener
        self.store = store
        self.on_stored = on_stored

    def __call__(self, event: evt.Event) -> Dataset:
        """pynetdicom's EVT_C_STORE handler."""
        code, comment = self.store_raw(event.assoc, event.context.abstract_syntax,
                                       str(event.context.transfer_syntax),
                                       str(event.request.AffectedSOPInstanceUID), event.request.DataSet)
        return status(code, comment)

    def store_raw(self, assoc, abstract_syntax: str, transfer_syntax: str, sop_instance: str,
                  stream: BytesIO) -> tuple[int, str | None]:
        """Store one received data set; returns the C-STORE status and its Error Comment.

        Called by ``__call__`` and directly by ``pynetdicom_tuning``'s C-STORE receive path.
        """
        try:
            return self._handle(assoc, abstract_syntax, UID(transfer_syntax), sop_instance.strip(), stream)
        except Exception as exc:  # never answer Success on an unexpected failure
            log.exception("C-STORE failed unexpectedly")
            return (OUT_OF_RESOURCES if isinstance(exc, OSError) else CANNOT_UNDERSTAND,
                    f"internal error: {type(exc).__name__}")

    def _handle(self, assoc, abstract_syntax: str, ts: UID, sop_instance: str,
                stream: BytesIO) -> tuple[int, str | None]:
        try:
            header, pixel_problem = read_header(stream, ts)
            values = {k: str(header.get(k) or "").strip() for k in REQUIRED_UIDS}
            modality = str(header.get("Modality") or "") or None
        except Exception as exc:
            log.warning("C-STORE: dataset cannot be decoded: %s", exc)
            return CANNOT_UNDERSTAND, f"cannot decode dataset: {type(exc).__name__}"
        missing = [k for k, v in values.items() if not v]
        if missing:
            log.warning("C-STORE: dataset lacks %s; refused", ", ".join(missing))
            return CANNOT_UNDERSTAND, f"missing {', '.join(missing)}"
        if values["SOPClassUID"] != abstract_syntax:
            log.warning("C-STORE: dataset SOP class %s differs from the presentation context's %s",
                        values["SOPClassUID"], abstract_syntax)
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the context"
        if values["SOPInstanceUID"] != sop_instance:
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID differs from the request"
        if pixel_problem:
            log.warning("C-STORE %s: %s", values["SOPInstanceUID"], pixel_problem)
            return CANNOT_UNDERSTAND, pixel_problem
        calling = assoc.requestor.ae_title.strip()
        header = part10_header(values["SOPClassUID"], values["SOPInstanceUID"], ts, calling)
        body = stream.getbuffer()
        try:
            stored = self.store.write(values["StudyInstanceUID"], values["SeriesInstanceUID"],
                                      values["SOPInstanceUID"], header, body)
        except ValueError as exc:  # a UID that cannot name a file
            return CANNOT_UNDERSTAND, str(exc)
        except DiskFull as exc:
            log.error("C-STORE refused: %s; free space or lower storage.min_free_mb", exc)
            return OUT_OF_RESOURCES, "disk space below the node's watermark"
        except OSError as exc:
            log.error("C-STORE could not be written: %s", exc)
            return OUT_OF_RESOURCES, "disk full" if exc.errno == errno.ENOSPC else "write failed"
        finally:
            body.release()
        if not stored.duplicate:
            self.on_stored(InstanceRecord(
                study_uid=values["StudyInstanceUID"], series_uid=values["SeriesInstanceUID"],
                sop_uid=values["SOPInstanceUID"], sop_class_uid=values["SOPClassUID"],
                transfer_syntax_uid=str(ts), relpath=stored.relpath, size=stored.size, modality=modality,
                calling_ae=calling, called_ae=self.listener.ae_title, peer_host=assoc.requestor.address),
                self.listener.stable_after)
        log.debug("stored %s (%d bytes%s)", values["SOPInstanceUID"], stored.size,
                  ", identical to the stored copy" if stored.duplicate else "")
        return SUCCESS, None


def _stop_at_pixels(tag, vr, length) -> bool:
    return tag >= PIXEL_DATA


# The attributes the receive path reads: the UIDs it files and checks, and the pixel geometry.
HEADER_TAGS = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID", 0x00280002: "SamplesPerPixel",
    0x00280008: "NumberOfFrames", 0x00280010: "Rows", 0x00280011: "Columns", 0x00280100: "BitsAllocated",
}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class _Unusual(Exception):
    """The fast header scan met something it leaves to pydicom."""


def _skip_sequence(buf, pos: int, implicit: bool, depth: int) -> int:
    """Position after the Sequence Delimitation Item of an undefined-length sequence at ``pos``."""
    while True:
        if pos + 8 > len(buf):
            raise _Unusual
        group, elem, length = struct.unpack_from("<HHI", buf, pos)
        tag = group << 16 | elem
        if tag == _SEQUENCE_END:
            return pos + 8
        if tag != _ITEM:
            raise _Unusual
        pos = _scan(buf, pos + 8, implicit, depth + 1, None) if length == _UNDEFINED else pos + 8 + length


def _scan(buf, pos: int, implicit: bool, depth: int, found: dict | None) -> int:
    """Walk Little Endian elements from ``pos``: to Pixel Data at the top level (collecting
    HEADER_TAGS into ``found``), or past the Item Delimitation Item inside an item."""
    if depth > 16:
        raise _Unusual
    total = len(buf)
    while pos + 8 <= total:
        group, elem = struct.unpack_from("<HH", buf, pos)
        tag = group << 16 | elem
        if found is not None and tag >= PIXEL_DATA:
            return pos
        if group == 0xFFFE:  # only an Item Delimitation Item may stand among elements
            if tag == _ITEM_END and found is None:
                return pos + 8
            raise _Unusual
        if implicit:
            length, start, vr = struct.unpack_from("<I", buf, pos + 4)[0], pos + 8, None
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in pynetdicom_tuning.EXPLICIT_LONG_VRS:
                if pos + 12 > total:
                    raise _Unusual
                length, start = struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
            elif vr.isalpha() and vr.isupper():
                length, start = struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
            else:
                raise _Unusual
        if length == _UNDEFINED:  # a sequence (UN of undefined length holds implicit VR data)
            if vr not in (None, b"SQ", b"UN"):
                raise _Unusual
            pos = _skip_sequence(buf, start, implicit or vr == b"UN", depth)
            continue
        if start + length > total:
            raise _Unusual
        if found is not None and tag in HEADER_TAGS:
            found[HEADER_TAGS[tag]] = bytes(buf[start:start + length])
        pos = start + length
    if pos != total or found is None:
        raise _Unusual
    return pos


def _fast_header(buf, implicit: bool) -> tuple[dict, int] | None:
    """HEADER_TAGS values and the offset of Pixel Data, by a direct scan; None to ask pydicom."""
    raw: dict[str, bytes] = {}
    try:
        pos = _scan(buf, 0, implicit, 0, raw)
        values: dict = {}
        for key, value in raw.items():
            if key in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated"):
                if len(value) != 2:
                    raise _Unusual
                values[key] = struct.unpack("<H", value)[0]
            else:
                text = value.decode("ascii").strip(" \0")
                if "\\" in text:
                    raise _Unusual  # several values: pydicom decides what they mean
                values[key] = int(text) if key == "NumberOfFrames" and text else text or None
    except (_Unusual, UnicodeDecodeError, ValueError, struct.error):
        return None
    return values, pos


def read_header(stream: BytesIO, ts: UID) -> tuple[dict, str | None]:
    """Read the attributes in HEADER_TAGS (by keyword) and check that Pixel Data is complete.

    Returns the values found and a problem description (None when the data are whole). A direct
    scan of the elements before Pixel Data reads them; pydicom does when the scan meets anything
    unusual (big endian, odd VRs or lengths, several values), so both agree on what is accepted.
    """
    if ts == DeflatedExplicitVRLittleEndian:  # rare: inflate, then read as explicit little endian
        stream.seek(0)
        raw = zlib.decompress(stream.read(), -zlib.MAX_WBITS)
        return read_header(BytesIO(raw), UID(ExplicitVRLittleEndian))
    buf = stream.getbuffer()
    try:
        scanned = _fast_header(buf, ts.is_implicit_VR) if ts.is_little_endian else None
        if scanned is None:
            stream.seek(0)
            ds = read_dataset(stream, ts.is_implicit_VR, ts.is_little_endian, stop_when=_stop_at_pixels)
            values, pos = {k: ds.get(k) for k in HEADER_TAGS.values()}, stream.tell()
        else:
            values, pos = scanned
        total = len(buf)
        if pos + 8 > total:
            return values, None
        group, elem = struct.unpack_from("<HH", buf, pos)
        if (group, elem) != (0x7FE0, 0x0010):
            return values, None  # Float/Double Float Pixel Data or trailing elements: not checked
        if ts.is_implicit_VR:
            length, start = struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
        else:
            length, start = struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
        if length == 0xFFFFFFFF:  # encapsulated: must end with a Sequence Delimitation Item
            if bytes(buf[-8:]) != SEQUENCE_DELIMITER and bytes(buf[start:]).rfind(SEQUENCE_DELIMITER) < 0:
                return values, "encapsulated Pixel Data has no end (truncated)"
            return values, None
        if start + length > total:
            return values, f"Pixel Data truncated: {total - start} of {length} bytes"
    finally:
        buf.release()
    try:
        frames = int(values.get("NumberOfFrames") or 1)
        expected = (int(values["Rows"]) * int(values["Columns"]) * int(values.get("SamplesPerPixel") or 1)
                    * frames * int(values["BitsAllocated"]))
    except (KeyError, TypeError, ValueError):
        return values, "Pixel Data without valid Rows/Columns/Bits Allocated"
    if length * 8 < expected:
        return values, f"Pixel Data holds {length} bytes; Rows x Columns x frames needs {(expected + 7) // 8}"
    return values, None


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in pynetdicom_tuning.EXPLICIT_LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10_header(sop_class: str, sop_instance: str, ts: str, source_ae: str | None) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group for a received dataset."""
    body = b"".join([
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _text(sop_class, b"\x00")),
        _element(0x0002, 0x0003, b"UI", _text(sop_instance, b"\x00")),
        _element(0x0002, 0x0010, b"UI", _text(ts, b"\x00")),
        _element(0x0002, 0x0012, b"UI", _text(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x0002, 0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME, b" ")),
        *([_element(0x0002, 0x0016, b"AE", _text(source_ae, b" "))] if source_ae else []),
    ])
    return b"\x00" * 128 + b"DICM" + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always Success."""
    return SUCCESS


def make_requested_handler(policy: PeerPolicy) -> Callable[[evt.Event], None]:
    """EVT_REQUESTED handler that rejects peers outside the allow-list before negotiation."""

    def handle_requested(event: evt.Event) -> None:
        requestor = event.assoc.requestor
        # the A-ASSOCIATE-RQ is not negotiated yet: read the calling AE title from the request
        ae_title, address = str(requestor.primitive.calling_ae_title).strip(), requestor.address
        if not policy.allows(ae_title, address):
            log.warning("rejected association from AE %r at %s: not in network.allowed_peers "
                        "(add it to config.yaml to accept it)", ae_title, address)
            # permanent, service user, calling AE title not recognised
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            # as pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ is on the wire
            event.assoc.kill()

    return handle_requested


def log_association(event: evt.Event) -> None:
    """Log accepted associations (AE titles and addresses only): at INFO, or DEBUG for echo-only ones.

    Monitoring (``dicom-node status``, a PACS's periodic C-ECHO) opens a Verification-only association
    every few seconds; at INFO those would bury the associations that carry data.
    """
    requestor = event.assoc.requestor
    echo_only = all(cx.abstract_syntax == Verification for cx in event.assoc.accepted_contexts)
    log.log(logging.DEBUG if echo_only else logging.INFO, "association %s: AE %r at %s",
            event.event.name.lower().replace("evt_", ""), requestor.ae_title.strip(), requestor.address)


def build_ae(config: Config) -> AE:
    """An AE configured with the storage SOP classes and transfer syntaxes the node accepts."""
    pynetdicom_tuning.apply()
    ae = AE()
    net = config.network
    ae.maximum_pdu_size = net.max_pdu
    ae.maximum_associations = net.max_associations
    ae.acse_timeout = net.acse_timeout
    ae.dimse_timeout = net.dimse_timeout
    ae.network_timeout = net.network_timeout
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    if net.storage_sop_classes == "all":
        classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts]
    else:
        classes = list(net.storage_sop_classes)
    for uid in classes:
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def listener_handlers(listener: Listener, policy: PeerPolicy, store: FileStore, on_stored: OnStored) -> list:
    """The association event handlers of one listener."""
    return [
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_REQUESTED, make_requested_handler(policy)),
        (evt.EVT_ACCEPTED, log_association),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, StoreHandler(listener, store, on_stored)),
    ]


def start_listener(ae: AE, listener: Listener, policy: PeerPolicy, store: FileStore, on_stored: OnStored,
                   server_class: type[ThreadedAssociationServer] = ThreadedAssociationServer):
    """Start one non-blocking association server for a listener; returns the server.

    ``server_class``: e.g. one that hands the connections to receiver processes (``receivers.py``).
    """
    server = ae.make_server((listener.host, listener.port), ae_title=listener.ae_title,
                            evt_handlers=listener_handlers(listener, policy, store, on_stored),
                            server_class=server_class)
    # as AE.start_server(block=False) does (server.shutdown() removes it from the AE's list again)
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{listener.port}", daemon=True).start()
    log.info("listening as %s on %s:%d", listener.ae_title, listener.host, listener.port)
    return server
