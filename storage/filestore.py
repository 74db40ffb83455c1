"""The file store: one file per SOP instance under ``<root>/<Study UID>/<Series UID>/<SOP UID>.dcm``.

Writes are atomic and durable with one fsync: the bytes go to a temporary file in the target
directory whose name carries the expected size, are fsynced, and the file is renamed into place.
After a crash, ``recover_temporaries`` promotes every temporary file that reached its full size
(its rename was lost, its data were fsynced before any Success was sent) and deletes the rest
(they were never acknowledged).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9.]{1,64}$")
_TMP_RE = re.compile(r"^\.(?P<name>[0-9.]+\.dcm)\.(?P<size>\d+)\.[0-9a-f]+\.tmp$")


class DiskFull(OSError):
    """The file system has less free space than the configured watermark."""


@dataclass(frozen=True)
class StoredFile:
    """Where an instance landed and whether it was new."""

    path: Path
    relpath: str
    size: int
    duplicate: bool  # identical bytes were already stored


def _check_uid(uid: str, what: str) -> str:
    uid = uid.strip().rstrip("\x00")
    if not _UID_RE.match(uid):
        raise ValueError(f"{what} {uid!r} is not a valid UID (digits and dots, at most 64 characters)")
    return uid


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Atomic, durable storage of encoded DICOM files."""

    def __init__(self, root: Path, *, min_free_mb: int = 0, fsync: bool = True):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.fsync = fsync
        self._free_checked = 0.0
        self._free_ok = True
        self._known_dirs: set[Path] = set()

    def relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Path of an instance relative to the root."""
        return "/".join((_check_uid(study_uid, "Study Instance UID"),
                         _check_uid(series_uid, "Series Instance UID"),
                         _check_uid(sop_uid, "SOP Instance UID") + ".dcm"))

    def path(self, relpath: str) -> Path:
        """Absolute path of a stored file."""
        return self.root / relpath

    def has_space(self) -> bool:
        """True while free space is above the watermark (checked at most every 0.5 s)."""
        now = time.monotonic()
        if now - self._free_checked > 0.5:
            self._free_ok = shutil.disk_usage(self.root).free >= self.min_free_bytes
            self._free_checked = now
        return self._free_ok

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            # new directory entries must survive a power cut too: fsync their parents once
            if self.fsync:
                _fsync_dir(directory.parent)
                _fsync_dir(directory.parent.parent)
        self._known_dirs.add(directory)

    def write(self, study_uid: str, series_uid: str, sop_uid: str, *parts: bytes | memoryview) -> StoredFile:
        """Store the concatenated parts atomically; identical bytes already stored are not rewritten."""
        if not self.has_space():
            raise DiskFull(errno.ENOSPC, f"free disk below {self.min_free_bytes // 2**20} MB in {self.root}")
        rel = self.relpath(study_uid, series_uid, sop_uid)
        final = self.root / rel
        size = sum(len(p) for p in parts)
        try:
            if final.stat().st_size == size and final.read_bytes() == b"".join(parts):
                return StoredFile(final, rel, size, duplicate=True)
        except FileNotFoundError:
            pass
        self._ensure_dir(final.parent)
        tmp = final.parent / f".{final.name}.{size}.{os.urandom(4).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            views = [memoryview(p) for p in parts]
            while views:  # one writev for header + dataset, looping only on short writes
                n = os.writev(fd, views)
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if views:
                    views[0] = views[0][n:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        return StoredFile(final, rel, size, duplicate=False)

    def delete(self, relpath: str) -> None:
        """Remove a stored file (and its series/study directories when empty)."""
        p = self.root / relpath
        p.unlink(missing_ok=True)
        for d in (p.parent, p.parent.parent):
            try:
                d.rmdir()
                self._known_dirs.discard(d)
            except OSError:
                break

    def recover_temporaries(self, directories: list[Path] | None = None) -> tuple[int, int]:
        """Promote complete temporary files and delete partial ones; returns (promoted, deleted)."""
        promoted = deleted = 0
        dirs = directories if directories is not None else [p for p in self.root.glob("*/*") if p.is_dir()]
        for d in dirs:
            for tmp in d.glob(".*.tmp"):
                m = _TMP_RE.match(tmp.name)
                final = d / m["name"] if m else None
                if m and tmp.stat().st_size == int(m["size"]):
                    os.replace(tmp, final)
                    promoted += 1
                else:
                    tmp.unlink(missing_ok=True)
                    deleted += 1
        if promoted or deleted:
            log.warning("file store recovery: %d complete temporary files promoted, %d partial ones removed",
                        promoted, deleted)
        return promoted, deleted

    def series_dirs(self, modified_since: float | None = None) -> list[Path]:
        """Series directories, optionally only those changed since a POSIX time."""
        out = []
        for study in self.root.iterdir():
            if not study.is_dir() or study.name.startswith("."):
                continue
            for series in study.iterdir():
                if series.is_dir() and (modified_since is None or series.stat().st_mtime >= modified_since):
                    out.append(series)
        return out
