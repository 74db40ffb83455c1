"""Leaner SR and SEG construction for highdicom 0.28.2 only: the same documents, sooner.

SEG, about 0.5 s sooner for 270 CT slices:

- ``is_attribute_in_iod`` walks the standard's module tables (~1 ms a call) and a SEG asks it
  once per source image (whether the image's IOD is multi-frame). The answer depends only on its
  arguments, so ``cache_iod_lookups()`` memoises it (the SR asks it too, once per referenced
  image, ~0.2 s).
- The source headers' positions, orientations and UIDs are converted from their raw bytes on
  first use, and pydicom checks each converted value against its VR (~40 us each, 3,400 values)
  only to warn. ``lean_seg_construction()`` skips those read-time checks while highdicom reads
  the headers; the values, and the SEG, are the same.
- At the end of its construction highdicom indexes the frames it has just made in an in-memory
  SQLite database, for querying them (~0.09 s of CPU for 948 frames). An encoder that writes the SEG
  never queries it, so ``segmentation_class()`` gives a ``Segmentation`` that builds that index
  on first use instead (``DeferredIndexSegmentation``).
- The same class makes each binary frame's mask and bits with fewer copies (~0.15 s of CPU for
  3,200 segment-plane pairs; see ``DeferredIndexSegmentation``).

SR, about 0.8 s sooner:

``highdicom.sr.sop._SR.__init__`` spends most of its time on two things an encoder does not need:

- it deep-copies the whole content tree and re-parses the copy into typed content items, to keep
  an independent typed view (``sr._content``) next to the dataset, which holds the original
  content anyway. For a TID 1500 report of ~65 findings that is ~15 000 data elements copied and
  re-typed (0.4-0.5 s). Here the tree is not copied, and a tree that highdicom's templates built
  (every node already a typed content item) is not re-typed either (0.2 s): the typed view is
  the tree itself, as highdicom's own ``copy=False`` path makes it. A tree with any plain data set
  in it is re-typed in place. The document's data set is the same, and the tree passed in is not
  used again by the caller.
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
import functools
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import highdicom
import numpy as np
import pydicom.config
from pydicom.dataset import Dataset

WRITTEN_FOR = "0.28.2"
_lock = threading.Lock()


def _content_not_copied(value, memo=None):
    """``deepcopy`` for ``highdicom.sr.sop``: the root content item is re-typed in place, not copied."""
    from highdicom.sr.value_types import ContainerContentItem

    if isinstance(value, ContainerContentItem):
        return value
    return copy.deepcopy(value, memo)


def _fully_typed(item) -> bool:
    """Whether every node of a content tree is already a highdicom content item in a ContentSequence."""
    from highdicom.sr.value_types import ContentItem, ContentSequence

    stack = [item]
    while stack:
        node = stack.pop()
        if not isinstance(node, ContentItem):
            return False
        children = node.get("ContentSequence")
        if children is not None:
            if not isinstance(children, ContentSequence):
                return False
            stack.extend(children)
    return True


class _TypedOrParsed:
    """``ContentItem`` as ``highdicom.sr.sop`` uses it: a tree the templates built is taken as it is."""

    @staticmethod
    def _from_dataset_derived(dataset: Dataset):
        from highdicom.sr.value_types import ContentItem

        return dataset if _fully_typed(dataset) else ContentItem._from_dataset_derived(dataset)


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
        saved = sop.deepcopy, sop.collect_evidence, sop.ContentItem
        sop.deepcopy, sop.collect_evidence, sop.ContentItem = _content_not_copied, _collect_evidence, _TypedOrParsed
        try:
            yield True
        finally:
            sop.deepcopy, sop.collect_evidence, sop.ContentItem = saved


def cache_iod_lookups() -> bool:
    """Memoise highdicom's ``is_attribute_in_iod`` wherever highdicom calls it; True once installed.

    Idempotent; does nothing with another highdicom version than WRITTEN_FOR.
    """
    if highdicom.__version__ != WRITTEN_FOR:
        return False
    from highdicom import _standard_utils, base
    from highdicom.sr import content

    with _lock:
        original = _standard_utils.is_attribute_in_iod
        if getattr(original, "cache_info", None) is None:
            cached = _memoised_in_iod(original)
            # every module that imported it by name, and the one whose functions look it up
            for module in (_standard_utils, base, content):
                module.is_attribute_in_iod = cached
    return True


def _memoised_in_iod(original):
    @functools.lru_cache(maxsize=4096)
    def lookup(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return original(attribute, sop_class_uid, None if exclude is None else list(exclude))

    @functools.wraps(original)
    def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                            exclude_path_elements: Sequence[str] | None = None) -> bool:
        exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
        return lookup(str(attribute), str(sop_class_uid), exclude)

    is_attribute_in_iod.cache_info = lookup.cache_info
    is_attribute_in_iod.uncached = original
    return is_attribute_in_iod


@contextmanager
def lean_seg_construction(enabled: bool = True) -> Iterator[bool]:
    """Within the block, raw header values are converted without pydicom's read-time VR checks."""
    if not enabled or highdicom.__version__ != WRITTEN_FOR:
        yield False
        return
    settings = pydicom.config.settings
    with _lock:  # a process-wide setting: one block at a time, and always restored
        saved = settings.reading_validation_mode
        settings.reading_validation_mode = pydicom.config.IGNORE
        try:
            yield True
        finally:
            settings.reading_validation_mode = saved


# What highdicom's _Image._build_luts sets (0.28.2): touching any of them builds the index.
_INDEX_ATTRIBUTES = frozenset({
    "_coordinate_system", "_db_con", "_dim_ind_col_names", "_dim_ind_pointers", "_file_reader",
    "_is_tiled_full", "_missing_reference_instances",
})


class DeferredIndexSegmentation(highdicom.seg.Segmentation):
    """A highdicom ``Segmentation`` whose frame index is built when a query first needs it.

    The data set is the same; only ``_build_luts`` at the end of the construction is postponed
    until one of the attributes it sets is read (``__getattr__`` runs only for missing ones), or
    the object is pickled or deep-copied.

    Its binary frames are also made with fewer passes over each plane. highdicom visits every
    (segment, plane) pair, 3,200 for 12 organs on 267 slices, of which ~950 become frames:

    - a label-map plane's mask of one segment stays the boolean comparison, instead of being
      copied to uint8; ``np.any``, which decides whether the frame is empty, is ~5x faster on it;
    - a frame is bit-packed straight from its 0/1 pixels: pydicom's ``pack_bits`` first proves
      them binary with two more copies, where one maximum does.

    The frames, and the file, are the same bytes (tests/test_encode.py).
    """

    def _get_segment_pixel_array(self, pixel_array: np.ndarray, segment_number: int,  # type: ignore[override]
                                 described_segment_numbers: np.ndarray,
                                 segmentation_type: highdicom.seg.SegmentationTypeValues,
                                 max_fractional_value: int, dtype: type) -> np.ndarray:
        # highdicom calls it on the instance; its own is a static method with these arguments
        native = self.__dict__.get("_native_frames")
        if native is None:  # asked once: a data set attribute is slow to read 3,000 times
            native = self.__dict__["_native_frames"] = not self.file_meta.TransferSyntaxUID.is_encapsulated
        if (native and pixel_array.ndim == 2 and pixel_array.dtype.kind == "u"
                and segmentation_type == highdicom.seg.SegmentationTypeValues.BINARY):
            # highdicom's answer is (plane == number).astype(uint8): the same 0/1 values; frames
            # of a native transfer syntax are flattened into uint8 before packing.
            return pixel_array == segment_number
        return super()._get_segment_pixel_array(pixel_array, segment_number, described_segment_numbers,
                                                segmentation_type, max_fractional_value, dtype)

    def _encode_pixels_native(self, planes: np.ndarray) -> bytes:
        if self.BitsAllocated != 1 or planes.dtype.kind not in "bu" or planes.size == 0:
            return super()._encode_pixels_native(planes)
        if planes.max() > 1:  # the error pydicom's pack_bits gives
            raise ValueError("Only binary arrays (containing ones or zeroes) can be packed.")
        # pack_bits(planes, pad=False): flattened, little bit order, the last byte zero-filled
        return np.packbits(planes.ravel(), bitorder="little").tobytes()

    def _build_luts(self) -> None:
        self.__dict__["_index_deferred"] = True

    def _build_deferred_index(self) -> bool:
        if not self.__dict__.pop("_index_deferred", False):
            return False
        super()._build_luts()
        return True

    def __getattr__(self, name: str):
        if name in _INDEX_ATTRIBUTES and self._build_deferred_index():
            return getattr(self, name)
        return super().__getattr__(name)

    def __getstate__(self) -> dict:
        # pickling and deepcopy copy the attributes first, then serialise the index
        self._build_deferred_index()
        return super().__getstate__()


def segmentation_class() -> type[highdicom.seg.Segmentation]:
    """The class to construct a SEG with: the deferred-index one for the highdicom it was written for."""
    return DeferredIndexSegmentation if highdicom.__version__ == WRITTEN_FOR else highdicom.seg.Segmentation
