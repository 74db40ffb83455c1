"""The Storage SCU: send stored files to a destination over one or more concurrent associations.

Files go out as stored (raw bytes, no decoding) when the peer accepts their transfer syntax;
otherwise they are decompressed and sent as Explicit VR Little Endian.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.sop_class import Verification

from dicom_node import pynetdicom_tuning
from dicom_node.config import Destination
from dicom_node.errors import DeliveryError
from dicom_node.receive import set_nodelay

log = logging.getLogger(__name__)

# Send files as their encoded bytes without decoding them (a supported pynetdicom setting).
_config.STORE_SEND_CHUNKED_DATASET = True
MAX_CONTEXTS = 128
# Fewer files than this per association and opening another costs more than it saves.
MIN_PER_ASSOCIATION = 16
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass(frozen=True)
class Outgoing:
    """One file to send."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


@dataclass(frozen=True)
class SendOutcome:
    """The peer's answer for one instance: status, or an error when there was no answer."""

    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Success or warning statuses (0x0000, 0x0001, 0xBxxx) count as stored."""
        return self.status is not None and (self.status in (0x0000, 0x0001) or self.status >> 12 == 0xB)


def _contexts(items: list[Outgoing]) -> list:
    """One presentation context per (SOP class, stored TS) plus an uncompressed fallback per class."""
    wanted: dict[str, list[str]] = {}
    for it in items:
        ts = wanted.setdefault(it.sop_class_uid, [])
        if it.transfer_syntax_uid not in ts:
            ts.append(it.transfer_syntax_uid)
    contexts = []
    for sop_class, syntaxes in wanted.items():
        # one transfer syntax per context, so the peer's answer says exactly which it takes: the
        # stored ones first, then the uncompressed fallbacks (an SCP choosing Implicit VR for a mixed
        # context would otherwise force re-encoding of Explicit VR files)
        for s in [*syntaxes, *[u for u in UNCOMPRESSED if u not in syntaxes]]:
            contexts.append(build_context(sop_class, [s]))
    if len(contexts) > MAX_CONTEXTS:
        raise DeliveryError(f"{len(contexts)} presentation contexts needed; DICOM allows {MAX_CONTEXTS} "
                            "per association")
    return contexts


def _accepted(assoc) -> dict[tuple[str, str], int]:
    """The accepted presentation contexts' IDs by (SOP class, transfer syntax)."""
    return {(cx.abstract_syntax, cx.transfer_syntax[0]): cx.context_id for cx in assoc.accepted_contexts}


def send_files(dest: Destination, items: Iterable[Outgoing], *, calling_ae: str) -> dict[str, SendOutcome]:
    """C-STORE each file to ``dest``; returns an outcome per SOP Instance UID.

    Up to ``dest.associations`` associations run at once, taking files from one queue, so one the
    peer refuses or drops leaves its share to the others. Raises ``DeliveryError`` when the first
    association cannot be established.
    """
    pynetdicom_tuning.apply()
    items = list(items)
    outcomes: dict[str, SendOutcome] = {}
    if not items:
        return outcomes
    contexts = _contexts(items)
    # The first association alone, then the others: a peer that limits associations per calling
    # AE accepts the first, instead of refusing all of them when they arrive together.
    first = _associate(dest, contexts, calling_ae)
    queue: deque[Outgoing] = deque(items)
    refusals: list[str] = []
    n = max(1, min(dest.associations, len(items) // MIN_PER_ASSOCIATION))
    threads = [threading.Thread(target=_open_and_drain, args=(dest, contexts, queue, outcomes, refusals, calling_ae),
                                name=f"send-{dest.ae_title}-{i}") for i in range(1, n)]
    for t in threads:
        t.start()
    _drain(first, queue, outcomes)
    for t in threads:
        t.join()
    if refusals:
        log.warning("%s: %d of %d associations not established (%s); sent over the others. If this peer "
                    "limits associations per calling AE, lower the destination's `associations` to %d",
                    dest.ae_title, len(refusals), n, refusals[0], n - len(refusals))
    for it in items:  # left in the queue when every association was lost
        outcomes.setdefault(it.sop_instance_uid, SendOutcome(None, "association lost"))
    return outcomes


def _associate(dest: Destination, contexts: list, calling_ae: str):
    """An established association to ``dest``, or ``DeliveryError`` saying why there is none."""
    ae = AE(ae_title=calling_ae)
    ae.maximum_pdu_size = dest.max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout
    ae.requested_contexts = contexts
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "did not answer (connection refused or timed out)"
        raise DeliveryError(f"{dest.ae_title}@{dest.host}:{dest.port} {why}")
    return assoc


def _drain(assoc, queue: deque[Outgoing], outcomes: dict[str, SendOutcome]) -> None:
    """Send files from ``queue`` over ``assoc`` until the queue is empty or the association lost; release it."""
    try:
        accepted = _accepted(assoc)
        msg_ids = itertools.count()
        while assoc.is_established:
            try:
                it = queue.popleft()  # atomic: two associations never send the same file
            except IndexError:
                break
            try:
                outcomes[it.sop_instance_uid] = _send_one(assoc, accepted, it, next(msg_ids) % 0xFFFF + 1)
            except Exception as exc:  # in a sending thread it would vanish with the thread: say so
                log.exception("sending %s to %s failed", it.path.name, assoc.acceptor.ae_title)
                outcomes[it.sop_instance_uid] = SendOutcome(None, f"{type(exc).__name__}: {exc}")
    finally:
        if assoc.is_established:
            assoc.release()


def _open_and_drain(dest: Destination, contexts: list, queue: deque[Outgoing], outcomes: dict[str, SendOutcome],
                    refusals: list[str], calling_ae: str) -> None:
    try:
        assoc = _associate(dest, contexts, calling_ae)
    except (DeliveryError, OSError, RuntimeError, ValueError) as exc:
        refusals.append(str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}")
        return
    _drain(assoc, queue, outcomes)


def _send_one(assoc, accepted: dict, it: Outgoing, msg_id: int) -> SendOutcome:
    try:
        context_id = accepted.get((it.sop_class_uid, it.transfer_syntax_uid))
        if context_id is not None:
            # the file as stored; pynetdicom's own path when the direct encoder declines it
            rsp = pynetdicom_tuning.store_file(assoc, context_id, it.path, it.transfer_syntax_uid, msg_id)
            if rsp is None:
                rsp = assoc.send_c_store(it.path, msg_id=msg_id)
        else:
            fallback = next((ts for ts in UNCOMPRESSED if (it.sop_class_uid, ts) in accepted), None)
            if fallback is None:
                return SendOutcome(None, f"peer accepts no transfer syntax for SOP class {it.sop_class_uid}")
            ds = dcmread(it.path)
            if UID(it.transfer_syntax_uid).is_compressed:
                ds.decompress()  # peer refused the stored syntax: decode once, send uncompressed
            if fallback != ds.file_meta.TransferSyntaxUID:
                ds.file_meta.TransferSyntaxUID = fallback
            ds.is_implicit_VR = fallback == ImplicitVRLittleEndian
            ds.is_little_endian = True
            rsp = assoc.send_c_store(ds, msg_id=msg_id)
    except (OSError, ValueError, AttributeError, RuntimeError) as exc:
        return SendOutcome(None, f"{type(exc).__name__}: {exc}")
    if "Status" not in rsp:
        return SendOutcome(None, "no response from the peer (timeout or abort)")
    code = int(rsp.Status)
    comment = str(rsp.get("ErrorComment", "") or "")
    return SendOutcome(code, None if code == 0 else f"status 0x{code:04X} {comment}".strip())


def echo(dest: Destination, *, calling_ae: str) -> int:
    """C-ECHO a destination; returns the status, raises DeliveryError if it cannot be reached."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "did not answer"
        raise DeliveryError(f"{dest.ae_title}@{dest.host}:{dest.port} {why}")
    try:
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            raise DeliveryError(f"{dest.ae_title} sent no C-ECHO response")
        return int(rsp.Status)
    finally:
        if assoc.is_established:
            assoc.release()
