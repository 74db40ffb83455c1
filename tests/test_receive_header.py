"""The receive path's direct header scan agrees with pydicom, and hands pydicom what it does not know."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID

from ai_core.phantom.series import make_ct_series
from dicom_node import receive
from dicom_node.receive import HEADER_TAGS, read_header


def _encode(ds: Dataset, ts: str) -> BytesIO:
    fp = BytesIO()
    from pydicom.filebase import DicomFileLike

    f = DicomFileLike(fp)
    f.is_little_endian = ts != ExplicitVRBigEndian
    f.is_implicit_VR = ts == ImplicitVRLittleEndian
    write_dataset(f, ds)
    return BytesIO(fp.getvalue())


def _pydicom_values(stream: BytesIO, ts: str) -> dict:
    stream.seek(0)
    t = UID(ts)
    from pydicom.filereader import read_dataset

    ds = read_dataset(stream, t.is_implicit_VR, t.is_little_endian, stop_when=receive._stop_at_pixels)
    return {k: ds.get(k) for k in HEADER_TAGS.values()}


def _normalised(values: dict) -> dict:
    return {k: (None if v in (None, "") else (int(v) if k in ("Rows", "Columns", "SamplesPerPixel",
                                                             "BitsAllocated", "NumberOfFrames") else str(v)))
            for k, v in values.items() if v not in (None, "")}


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Dataset:
    path = make_ct_series(tmp_path_factory.mktemp("ct"), n_slices=1, rows=32, cols=32)[0]
    ds = dcmread(path)
    del ds.file_meta
    # nested sequences: defined and undefined lengths, an item holding a sequence
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D0050", "SRT", "Tissue"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.3"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.ReferencedImageSequence.is_undefined_length = True
    ds.ReferencedImageSequence[0].is_undefined_length_sequence_item = True
    ds.NumberOfFrames = "1 "
    return ds


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_fast_scan_reads_what_pydicom_reads(ct, ts, monkeypatch):
    stream = _encode(ct, ts)
    fast = receive._fast_header(stream.getbuffer(), UID(ts).is_implicit_VR)
    assert fast is not None, "the scan gave up on an ordinary CT header"
    assert _normalised(fast[0]) == _normalised(_pydicom_values(stream, ts))
    assert fast[0]["SOPInstanceUID"] == ct.SOPInstanceUID and fast[0]["Rows"] == 32
    values, problem = read_header(stream, UID(ts))
    assert problem is None
    # the whole read_header answer is the same when pydicom reads the header
    monkeypatch.setattr(receive, "_fast_header", lambda buf, implicit: None)
    slow, slow_problem = read_header(_encode(ct, ts), UID(ts))
    assert _normalised(slow) == _normalised(values) and slow_problem is None


def test_truncations_and_odd_input_agree_with_pydicom(ct, monkeypatch):
    whole = _encode(ct, ExplicitVRLittleEndian).getvalue()
    pixel_at = whole.index(b"\xe0\x7f\x10\x00")
    cuts = [len(whole) - 10, pixel_at + 20, pixel_at + 5, pixel_at - 7, 200, 33]
    for cut in cuts:
        def answer():
            try:
                v, p = read_header(BytesIO(whole[:cut]), UID(ExplicitVRLittleEndian))
                return "ok", _normalised(v), p
            except Exception as exc:
                return "error", type(exc).__name__
        fast = answer()
        with monkeypatch.context() as m:
            m.setattr(receive, "_fast_header", lambda buf, implicit: None)
            slow = answer()
        if fast[0] == "ok" and slow[0] == "ok":
            assert fast[2] == slow[2], f"cut at {cut}"
        else:
            assert fast[0] == slow[0] == "error", f"cut at {cut}: {fast} vs {slow}"
    # a multi-valued UID and big endian go to pydicom
    odd = ct.copy()
    odd.SOPInstanceUID = "1.2.3\\4.5.6"
    assert receive._fast_header(_encode(odd, ExplicitVRLittleEndian).getbuffer(), False) is None
    assert read_header(_encode(ct, ExplicitVRBigEndian), UID(ExplicitVRBigEndian))[0]["Rows"] == 32
