"""Running one encoder in a forked child process, so that SEG and SR use both cores.

highdicom spends its time in pure-Python dataset handling (GIL-bound: threads do not help).
A forked child inherits the label map and headers without copying or pickling them and sends
back the finished object as DICOM bytes; the parent reads those lazily, and writing them out
again copies the raw bytes. Where fork is unavailable the work runs inline.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset

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
    def of(cls, ds: Dataset) -> EncodedBytes:
        """Encode ``ds`` in the DICOM file format."""
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return cls(buf.getvalue(), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                   str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), str(ds.get("Modality", "")) or None)


def _child(conn, fn: Callable[..., Dataset], kwargs: dict[str, Any]) -> None:
    try:
        conn.send(("ok", EncodedBytes.of(fn(**kwargs))))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        try:
            payload = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an unpicklable exception still reports its text
            payload = None
        conn.send(("error", (payload, traceback.format_exc())))
    finally:
        conn.close()


class Forked:
    """A call running in a forked child; ``outcome()`` returns its result (or raises its error)."""

    def __init__(self, fn: Callable[..., Dataset], *, inline: bool = False, **kwargs: Any):
        self._inline: Dataset | None = None
        self._error: BaseException | None = None
        self._proc = None
        ctx = None
        # A daemonic process (e.g. a multiprocessing pool worker) may not have children.
        if not inline and not multiprocessing.current_process().daemon:
            try:
                ctx = multiprocessing.get_context("fork")
            except ValueError:  # no fork on this platform
                ctx = None
        if ctx is not None:
            try:
                self._recv, send = ctx.Pipe(duplex=False)
                self._proc = ctx.Process(target=_child, args=(send, fn, kwargs), daemon=True)
                self._proc.start()
                send.close()
                return
            except OSError as exc:  # cannot fork (out of memory, process limit): run inline
                logger.warning("cannot fork an encoder process (%s); running it inline", exc)
                self._proc = None
        try:
            self._inline = fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by result()
            self._error = exc

    def outcome(self, timeout: float = 600.0) -> tuple[Dataset | None, EncodedBytes | None]:
        """(Dataset, None) when it ran inline, (None, its encoded bytes) from a child; or its error."""
        if self._proc is None:
            if self._error is not None:
                raise self._error
            assert self._inline is not None
            return self._inline, None
        try:
            if not self._recv.poll(timeout):
                raise EncoderFailed(f"encoder child gave no answer within {timeout:.0f} s")
            status, payload = self._recv.recv()
        except EOFError:
            raise EncoderFailed(f"encoder child died (exit code {self._proc.exitcode})") from None
        finally:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        if status == "ok":
            return None, payload
        pickled, text = payload
        if pickled is not None:
            exc = pickle.loads(pickled)
            raise exc from EncoderFailed(text)
        raise EncoderFailed(text)

    def result(self, timeout: float = 600.0) -> Dataset:
        """The Dataset (from a child: parsed lazily from its bytes), or the exception it raised."""
        ds, raw = self.outcome(timeout)
        return ds if ds is not None else pydicom.dcmread(io.BytesIO(raw.data))
