"""Running encoders in forked child processes, so that SEG, SR and SC use both cores.

highdicom spends its time in pure-Python dataset handling (GIL-bound: threads do not help).
A forked child inherits the label map and headers without copying or pickling them and sends
back the finished object as DICOM bytes; the parent reads those lazily, and writing them out
again copies the raw bytes. Where fork is unavailable the work runs inline.

Forking a process that has threads (the worker's heartbeat, torch's pool) can leave the child
waiting forever on a lock another thread held at the fork. Two guards: the garbage collector
is frozen across the fork, so the child never finalises objects it inherited (a database
connection's finaliser takes such locks), and a child that uses no CPU for ``STALL_S``
seconds while nothing has come back is taken as stuck: it is killed and the work runs inline.

``encode_file(ds)`` writes one object; the items of its longest part, a SEG's Per-Frame
Functional Groups (one item of four nested sequences per frame, most of the writing time), are
encoded by ``_ItemEncoder`` (each shared sub-item once) and joined as one raw element. With
``split=True`` and a very long sequence, half of them are encoded in a forked child.
"""

from __future__ import annotations

import gc
import io
import logging
import multiprocessing
import os
import time
import pickle
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_sequence_item
from pydicom.tag import ItemDelimiterTag, ItemTag, SequenceDelimiterTag

logger = logging.getLogger(__name__)


class EncoderFailed(RuntimeError):
    """The encoder raised in the child process; the message carries its traceback."""


@dataclass(frozen=True)
class EncodedBytes:
    """A finished object as DICOM file bytes, with the identifiers a store files it under."""

    data: bytes
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None

    @classmethod
    def of(cls, ds: Dataset, split: bool = False) -> EncodedBytes:
        """Encode ``ds`` in the DICOM file format (``split``: with both cores, see ``encode_file``)."""
        return cls(encode_file(ds, split=split), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                   str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID),
                   str(ds.get("Modality", "")) or None)


# Below this many items a forked child costs more than it saves. With _ItemEncoder, 948 SEG frames
# take 0.14-0.22 s on one core, and a forked half competes with the SR's child for the other: unsplit,
# SEG + SR + SC took 1.33-1.98 s (median 1.66) against 1.28-2.11 s (1.78) split, ten warm runs
# each, interleaved (benchmarks/encode.py). Several thousand frames (a whole-body SEG) still gain.
SPLIT_MIN_ITEMS = 2000


def encode_file(ds: Dataset, *, split: bool = False, keyword: str = "PerFrameFunctionalGroupsSequence") -> bytes:
    """``ds`` in the DICOM file format: the bytes ``ds.save_as(..., enforce_file_format=True)`` writes.

    The items of the sequence ``keyword`` are encoded by ``_ItemEncoder`` (explicit VR little
    endian only, as highdicom writes; otherwise ``ds`` is written the usual way); ``split``: half
    of them in a forked child (for a long sequence). ``ds``'s values are not changed; its ambiguous
    VRs are resolved and its data sets marked as written (``mark_as_written``), as a write would.
    """
    tag = tag_for_keyword(keyword)
    mark_as_written(ds)
    if tag is None or tag not in ds or ds.file_meta.get("TransferSyntaxUID") != pydicom.uid.ExplicitVRLittleEndian:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    seq = ds[tag]
    items = list(seq.value)
    encodings = convert_encodings(ds.get("SpecificCharacterSet", default_encoding))
    if split and len(items) >= SPLIT_MIN_ITEMS:
        half = len(items) // 2
        head = Forked(_encode_items, plain=True, items=items[:half], encodings=encodings)
        tail = _encode_items(items[half:], encodings)
        value = head.result() + tail
    else:
        value = _encode_items(items, encodings)
    # A shallow copy with its own element dict: the same elements (ambiguous VRs resolved above),
    # the sequence replaced by its encoded value. Declaring the copy's encoding as the one written
    # makes pydicom write that raw value as it is (without it, pydicom would parse it back).
    top = Dataset({t: ds[t] for t in ds.keys() if t != tag})
    top[tag] = RawDataElement(tag, "SQ", 0xFFFFFFFF if seq.is_undefined_length else len(value), value, 0, False, True)
    top.set_original_encoding(False, True, top._character_set)
    top.file_meta = ds.file_meta
    top.preamble = getattr(ds, "preamble", None)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, top, enforce_file_format=True)
    return buf.getvalue()


def mark_as_written(ds: Dataset) -> int:
    """Resolve ``ds``'s ambiguous VRs once and mark its data sets as already in the encoding written
    (explicit VR little endian); returns how many were marked.

    pydicom resolves ambiguous VRs (US or SS, OB or OW) again in every nested data set whose
    original encoding is not the one written, walking its whole subtree each time: for an SR's
    content tree or a SEG's per-frame items most of that is repeated work (~0.05 s each). Data sets
    built in memory have no original encoding; after one walk from the top they can be written as
    they are. A data set holding a raw (unparsed) element keeps its original encoding, so that
    element is still converted as pydicom would convert it. The bytes written are the same.
    """
    if ds.file_meta.get("TransferSyntaxUID") != pydicom.uid.ExplicitVRLittleEndian:
        return 0
    correct_ambiguous_vr(ds, True)
    marked = 0
    stack = [ds]
    while stack:
        node = stack.pop()
        raw = False
        for elem in node.elements():  # as stored: raw elements are not parsed here
            if isinstance(elem, RawDataElement):
                raw = True
            elif elem.VR == "SQ":
                stack.extend(elem.value)
        if not raw and node.original_encoding == (None, None):
            node.set_original_encoding(False, True, node._character_set)
            marked += 1
    return marked


def _explicit_le_buffer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _encode_items(items: list[Dataset], encodings: list[str]) -> bytes:
    """Sequence items as pydicom writes them inside a sequence (explicit VR little endian)."""
    encoder = _ItemEncoder()
    return b"".join(encoder.item(item, encodings) for item in items)


_TAG = struct.Struct("<HH")
_UL = struct.Struct("<L")


def _tag_bytes(tag: int) -> bytes:
    return _TAG.pack(tag >> 16, tag & 0xFFFF)


_ITEM = _tag_bytes(ItemTag)
_ITEM_END = _tag_bytes(ItemDelimiterTag) + b"\0\0\0\0"
_SEQUENCE_END = _tag_bytes(SequenceDelimiterTag) + b"\0\0\0\0"
_UNDEFINED = b"\xff\xff\xff\xff"
_WRITTEN = (False, True)  # (implicit VR, little endian) of explicit VR little endian


class _ItemEncoder:
    """pydicom's encoding of sequence items, with each shared nested sequence encoded once.

    A SEG's per-frame items share sub-items: the Source Image and Plane Position items of a CT
    slice serve every segment on it, one Derivation Code item serves all (948 frames: 267, 267
    and 1 distinct). pydicom encodes each again wherever it occurs; here a sequence whose items
    are the very same objects (and encoding) reuses its bytes. The element and item framing is
    pydicom's (explicit VR little endian: sequences and items of defined length unless marked
    undefined); other elements, and whole items pydicom would first convert (not in the encoding
    written: ``mark_as_written``), are pydicom's own writes. Same bytes, 4-5x sooner.
    """

    def __init__(self) -> None:
        self._sequences: dict[tuple, tuple[bytes, object]] = {}

    def item(self, ds: Dataset, encodings: list[str]) -> bytes:
        """One sequence item, tag and length included."""
        fp = _explicit_le_buffer()
        if ds.original_encoding != _WRITTEN or ds.original_character_set != ds._character_set:
            write_sequence_item(fp, ds, encodings)  # pydicom converts what needs converting
            return fp.getvalue()
        self._dataset(fp, ds, encodings)
        body = fp.getvalue()
        if getattr(ds, "is_undefined_length_sequence_item", False):
            return _ITEM + _UNDEFINED + body + _ITEM_END
        return _ITEM + _UL.pack(len(body)) + body

    def _dataset(self, fp: DicomBytesIO, ds: Dataset, parent: list[str]) -> None:
        encodings = convert_encodings(ds.get("SpecificCharacterSet", parent))
        for tag in sorted(ds.keys()):
            if tag.element == 0 and tag.group > 6:  # retired group lengths are not written
                continue
            elem = ds.get_item(tag)
            if not isinstance(elem, RawDataElement) and elem.VR == "SQ":
                fp.write(self._sequence(elem, encodings))
            else:
                write_data_element(fp, elem, encodings)

    def _sequence(self, elem: DataElement, encodings: list[str]) -> bytes:
        key = (elem.tag, elem.is_undefined_length, tuple(map(id, elem.value)), tuple(encodings))
        cached = self._sequences.get(key)
        if cached is not None:
            return cached[0]
        body = b"".join(self.item(ds, encodings) for ds in elem.value)
        head = _tag_bytes(elem.tag) + b"SQ\0\0"
        data = (head + _UNDEFINED + body + _SEQUENCE_END if elem.is_undefined_length
                else head + _UL.pack(len(body)) + body)
        self._sequences[key] = (data, elem.value)  # holding the items keeps their ids theirs
        return data


def _child(conn, fn: Callable[..., Any], kwargs: dict[str, Any], plain: bool) -> None:
    try:
        value = fn(**kwargs)
        conn.send(("ok", value if plain else EncodedBytes.of(value)))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        try:
            payload = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an unpicklable exception still reports its text
            payload = None
        conn.send(("error", (payload, traceback.format_exc())))
    finally:
        conn.close()


# A healthy encoder child computes all the time; this long without CPU time it is stuck.
STALL_S = 30.0


def _cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of a process in clock ticks (None where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    except (OSError, IndexError, ValueError):
        return None


class Forked:
    """A call running in a forked child; ``outcome()`` returns its result (or raises its error).

    ``fn`` returns a Dataset, which the child sends back encoded; with ``plain`` it returns any
    picklable value, sent back as it is.
    """

    def __init__(self, fn: Callable[..., Any], *, inline: bool = False, plain: bool = False, **kwargs: Any):
        self._plain = plain
        self._inline: Any = None
        self._error: BaseException | None = None
        self._proc = None
        ctx = None
        # A daemonic process (e.g. a multiprocessing pool worker) may not have children.
        if not inline and not multiprocessing.current_process().daemon:
            try:
                ctx = multiprocessing.get_context("fork")
            except ValueError:  # no fork on this platform
                ctx = None
        self._fn, self._kwargs = fn, kwargs  # kept to run inline if the child gets stuck
        if ctx is not None:
            try:
                self._recv, send = ctx.Pipe(duplex=False)
                self._proc = ctx.Process(target=_child, args=(send, fn, kwargs, plain), daemon=True)
                gc.freeze()  # the child inherits every object as "permanent": it never finalises them
                try:
                    self._proc.start()
                finally:
                    gc.unfreeze()
                send.close()
                return
            except OSError as exc:  # cannot fork (out of memory, process limit): run inline
                logger.warning("cannot fork an encoder process (%s); running it inline", exc)
                self._proc = None
        self._run_inline()

    def _run_inline(self) -> None:
        try:
            self._inline = self._fn(**self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by outcome()
            self._error = exc

    def _wait(self, timeout: float, stall: float) -> bool:
        """Wait for the child's answer: True when it is there, False when the child is stuck."""
        deadline = time.monotonic() + timeout
        ticks, since = _cpu_ticks(self._proc.pid), time.monotonic()
        while not self._recv.poll(max(0.0, min(1.0, deadline - time.monotonic()))):
            now = time.monotonic()
            if now >= deadline:
                raise EncoderFailed(f"encoder child gave no answer within {timeout:.0f} s")
            current = _cpu_ticks(self._proc.pid)
            if current is None or current != ticks:
                ticks, since = current, now
            elif now - since >= stall:
                return False
        return True

    def _reap(self) -> None:
        """Wait briefly for the child to exit; kill it if it does not."""
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def outcome(self, timeout: float = 600.0, stall: float | None = None) -> tuple[Dataset | None, EncodedBytes | None]:
        """(Dataset, None) when it ran inline, (None, its encoded bytes) from a child; or its error.

        With ``plain``: (the value, None) either way. A child that used no CPU for ``stall``
        seconds (default ``STALL_S``) while nothing came back is killed and the call runs inline.
        """
        stall = STALL_S if stall is None else stall
        if self._proc is not None:
            try:
                answered = self._wait(timeout, stall)
            except EncoderFailed:
                self._reap()
                raise
            if not answered:
                logger.warning("encoder child %d (%s) used no CPU for %.0f s without answering: stuck, most "
                               "likely on a lock held at the fork; killed, running it in this process",
                               self._proc.pid, getattr(self._fn, "__name__", "?"), stall)
                self._proc.kill()
                self._reap()
                self._proc = None
                self._run_inline()
        if self._proc is None:
            if self._error is not None:
                raise self._error
            return self._inline, None
        try:
            status, payload = self._recv.recv()
        except EOFError:
            raise EncoderFailed(f"encoder child died (exit code {self._proc.exitcode})") from None
        finally:
            self._reap()
        if status == "ok":
            return (payload, None) if self._plain else (None, payload)
        pickled, text = payload
        if pickled is not None:
            exc = pickle.loads(pickled)
            raise exc from EncoderFailed(text)
        raise EncoderFailed(text)

    def result(self, timeout: float = 600.0, stall: float | None = None) -> Any:
        """The Dataset (from a child: parsed lazily from its bytes) or plain value, or the exception it raised."""
        ds, raw = self.outcome(timeout, stall)
        return ds if ds is not None else pydicom.dcmread(io.BytesIO(raw.data))
