"""Leaner SR construction for highdicom 0.28.2 only: the same document, about 0.6 s sooner.

``highdicom.sr.sop._SR.__init__`` spends most of its time on two things an encoder does not need:

- it deep-copies the whole content tree and re-parses the copy into typed content items, to keep
  an independent typed view (``sr._content``) next to the dataset, which holds the original
  content anyway. For a TID 1500 report of ~65 findings that is ~15 000 data elements copied and
  re-typed (0.4-0.5 s). Here the content tree is re-typed in place instead (highdicom's own
  ``copy=False`` path): the document's data set is the same, and the tree passed in is not used
  again by the caller.
- ``collect_evidence`` checks that every SOP instance referenced in the content is among the
  evidence by building a highdicom ``ContentItem`` for every node of the tree, twice (0.35 s).
  Here the same check walks the tree's plain data sets once, and the evidence sequences are
  grouped exactly as highdicom groups them.

Used as a context manager around the ``Comprehensive3DSR`` call; with any other highdicom version
it does nothing (the SR is built the normal, slower way). ``tests/test_encode.py`` checks that the
tuned and untuned documents encode to the same bytes.
"""

from __future__ import annotations

import copy
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import highdicom
from pydicom.dataset import Dataset

WRITTEN_FOR = "0.28.2"
_lock = threading.Lock()


def _content_not_copied(value, memo=None):
    """``deepcopy`` for ``highdicom.sr.sop``: the root content item is re-typed in place, not copied."""
    from highdicom.sr.value_types import ContainerContentItem

    if isinstance(value, ContainerContentItem):
        return value
    return copy.deepcopy(value, memo)


def referenced_instance_uids(content: Dataset) -> set[str]:
    """SOP Instance UIDs referenced by IMAGE and COMPOSITE items anywhere in an SR content tree."""
    out: set[str] = set()
    stack = [content]
    while stack:
        node = stack.pop()
        for item in node.get("ContentSequence", ()):
            if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
                out.add(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if "ContentSequence" in item:
                stack.append(item)
    return out


def _collect_evidence(evidence: Sequence[Dataset], content: Dataset,
                      study_instance_uid: str | None = None) -> tuple[list[Dataset], list[Dataset]]:
    """``highdicom.sr.utils.collect_evidence`` with a single plain walk of the content tree."""
    from highdicom.sr.utils import _create_references

    if study_instance_uid is None and len(evidence) > 1:
        study_instance_uid = evidence[0].StudyInstanceUID
    ref_uids = referenced_instance_uids(content)
    evd_uids: set[str] = set()
    same_study: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
    other_study: dict[tuple[str, str], list[Dataset]] = defaultdict(list)
    for evd in evidence:
        if evd.SOPInstanceUID in evd_uids:
            continue
        item = Dataset()
        item.ReferencedSOPClassUID = evd.SOPClassUID
        item.ReferencedSOPInstanceUID = evd.SOPInstanceUID
        key = (evd.StudyInstanceUID, evd.SeriesInstanceUID)
        (same_study if evd.StudyInstanceUID == study_instance_uid else other_study)[key].append(item)
        evd_uids.add(evd.SOPInstanceUID)
    missing = ref_uids - evd_uids
    if missing:
        raise ValueError('No evidence was provided for the following SOP instances, which are referenced '
                         'in the document content: "{}"'.format('", "'.join(missing)))
    return _create_references(same_study), _create_references(other_study)


@contextmanager
def lean_sr_construction(enabled: bool = True) -> Iterator[bool]:
    """Within the block, highdicom SR constructors take the lean path (yields whether they do)."""
    if not enabled or highdicom.__version__ != WRITTEN_FOR:
        yield False
        return
    from highdicom.sr import sop

    with _lock:  # module globals: one block at a time, and always restored
        saved = sop.deepcopy, sop.collect_evidence
        sop.deepcopy, sop.collect_evidence = _content_not_copied, _collect_evidence
        try:
            yield True
        finally:
            sop.deepcopy, sop.collect_evidence = saved
