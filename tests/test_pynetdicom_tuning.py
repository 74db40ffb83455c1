"""The pynetdicom latency overrides: applied only to the pinned version, behaviour unchanged."""

from __future__ import annotations

import os
import threading
from io import BytesIO
import time

import pynetdicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import CTImageStorage, Verification

from ai_core.phantom.series import make_ct_series
from dicom_node import pynetdicom_tuning
from tests.peers import StoreSCP, free_port


def test_applies_to_the_pinned_version_only(monkeypatch):
    assert pynetdicom.__version__ == pynetdicom_tuning.WRITTEN_FOR, "pin pynetdicom in pyproject.toml"
    assert pynetdicom_tuning.apply() and pynetdicom_tuning.applied()
    monkeypatch.setattr(pynetdicom_tuning, "_applied", False)
    monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
    assert not pynetdicom_tuning.apply()


def test_store_and_echo_both_ways_without_stalls_or_fd_leaks(tmp_path):
    pynetdicom_tuning.apply()
    files = make_ct_series(tmp_path / "ct", n_slices=40, rows=256, cols=256)
    received = []

    pixels = {}

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        pixels[event.request.AffectedSOPInstanceUID] = event.dataset.PixelData  # sent and read through views
        return 0x0000

    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage)
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        fds_before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):  # several associations: wake sockets are closed each time
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CTImageStorage)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0
            t0 = time.perf_counter()
            for f in files:
                assert assoc.send_c_store(dcmread(f)).Status == 0
            elapsed = time.perf_counter() - t0
            assoc.release()
            # a lost wake-up shows as a 30 s DIMSE timeout; polling stalls as >1 s for 40 images
            assert elapsed < 20
        time.sleep(0.5)
        assert len(received) == 120
        for f in files:
            ds = dcmread(f)
            assert pixels[ds.SOPInstanceUID] == ds.PixelData
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    finally:
        server.shutdown()


def test_acceptor_context_copy_is_flat_but_independent():
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom import transport

    pynetdicom_tuning.apply()
    ae = AE()
    for cx in AllStoragePresentationContexts[:20]:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    original = ae.supported_contexts
    copied = transport.deepcopy(original)
    assert copied == original and all(a is not b for a, b in zip(copied, original))
    copied[0].transfer_syntax.append("1.2.3")
    copied[0].result = 0x00
    assert "1.2.3" not in original[0].transfer_syntax and original[0].result is None
    assert transport.deepcopy({"a": [1]}) == {"a": [1]}  # anything else: a real deepcopy


def test_requestor_reactor_never_takes_a_message_while_paused(monkeypatch):
    pynetdicom_tuning.apply()
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    scp = AE(ae_title="SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.is_established
        assoc._reactor_checkpoint.clear()  # what every send_*() does before sending its request
        response = (1, "the user's response")
        assoc.dimse.msg_queue.put(response)
        # the race: the reactor passed its checkpoint just before the pause, then polls the queue
        monkeypatch.setattr(pynetdicom_tuning.threading, "current_thread", lambda: assoc)
        assert assoc.dimse.get_msg(block=False) == (None, None)
        monkeypatch.undo()
        assert assoc.dimse.get_msg(block=True) == response  # the user thread gets it
        assoc._reactor_checkpoint.set()
        assert assoc.send_c_echo().Status == 0  # the handshake still works end to end
        assoc.release()
    finally:
        server.shutdown()


def test_command_sets_encode_exactly_as_pydicom_does():
    from pynetdicom import dimse_messages, dsutils
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    pynetdicom_tuning.apply()
    assert dimse_messages.encode is pynetdicom_tuning._fast_encode
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = "1.2.3.4.5"  # odd length: padded with NUL
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = "MOVER"
    req.MoveOriginatorMessageID = 3
    req.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3.4.56"
    rsp.Status = 0xA700
    echo = C_ECHO()
    echo.MessageID = 65535
    echo.AffectedSOPClassUID = Verification
    messages = []
    for primitive, cls in ((req, dimse_messages.C_STORE_RQ), (rsp, dimse_messages.C_STORE_RSP),
                           (echo, dimse_messages.C_ECHO_RQ)):
        msg = cls()
        msg.primitive_to_message(primitive)
        messages.append(msg.command_set)
    messages[1].ErrorComment = "odd comment"  # padded with a space
    for ds in messages:
        fast = pynetdicom_tuning._encode_command(ds)
        assert fast is not None and fast == dsutils.encode(ds, True, True)
    unusual = Dataset()
    unusual.OffendingElement = [0x00100010]  # AT: left to pydicom
    assert pynetdicom_tuning._encode_command(unusual) is None
    assert pynetdicom_tuning._fast_encode(unusual, True, True) == dsutils.encode(unusual, True, True)


def test_command_sets_decode_exactly_as_pydicom_does():
    from pynetdicom import dimse_messages, dsutils
    from pynetdicom.dimse_primitives import C_FIND, C_MOVE, C_STORE

    pynetdicom_tuning.apply()
    assert dimse_messages.decode is pynetdicom_tuning._fast_decode

    def elements(ds):
        return [(e.tag, e.VR, e.VM, e.value, type(e.value)) for e in ds]

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3.4.5"  # odd length: NUL-padded
    rsp.Status = 0xA700
    req = C_STORE()
    req.MessageID = 65535
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = "1.2.3.4.56"
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = "MOVER"  # odd length: space-padded
    req.MoveOriginatorMessageID = 3
    req.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    move = C_MOVE()
    move.MessageIDBeingRespondedTo = 2
    move.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    move.Status = 0xFF00
    move.NumberOfRemainingSuboperations, move.NumberOfCompletedSuboperations = 10, 5
    move.NumberOfFailedSuboperations, move.NumberOfWarningSuboperations = 0, 1
    find = C_FIND()
    find.MessageID = 1
    find.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    find.Priority = 0
    find.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00STUDY ")
    sets = []
    for primitive, cls in ((rsp, dimse_messages.C_STORE_RSP), (req, dimse_messages.C_STORE_RQ),
                           (move, dimse_messages.C_MOVE_RSP), (find, dimse_messages.C_FIND_RQ)):
        msg = cls()
        msg.primitive_to_message(primitive)
        sets.append(msg.command_set)
    sets[0].ErrorComment = "  disk full "  # LO: leading spaces kept, trailing padding dropped
    empty = Dataset()
    empty.ErrorComment = ""
    empty.Status = 0
    sets.append(empty)
    for ds in sets:
        raw = dsutils.encode(ds, True, True)
        fast = pynetdicom_tuning._decode_command(raw)
        assert fast is not None, ds
        assert elements(fast) == elements(dsutils.decode(BytesIO(raw), True, True))
        assert elements(pynetdicom_tuning._fast_decode(BytesIO(raw), True, True)) == elements(fast)
    # what the direct decoder does not know goes to pydicom, from the start of the stream
    unusual = Dataset()
    unusual.Status = 0xA900
    unusual.OffendingElement = [0x00100010, 0x00100020]  # AT, two values
    raw = dsutils.encode(unusual, True, True)
    assert pynetdicom_tuning._decode_command(raw) is None
    stream = BytesIO(raw)
    stream.seek(len(raw))
    assert elements(pynetdicom_tuning._fast_decode(stream, True, True)) == elements(dsutils.decode(BytesIO(raw), True, True))
    for broken in (raw[:5], b"\x00\x00\x00\x09\x02\x00\x00\x00\x00", b"\x08\x00\x16\x00\x00\x00\x00\x00"):
        assert pynetdicom_tuning._decode_command(broken) is None  # truncated, wrong length, not group 0


def test_pdata_read_gives_views_of_one_buffer_and_rejects_bad_items():
    import socket as _socket

    from pynetdicom import dul as _dul
    from pynetdicom.pdu import P_DATA_TF

    pynetdicom_tuning.apply()

    class FakeDUL:
        def __init__(self, raw: bytes):
            import queue

            self.a, self.b = _socket.socketpair()
            self.b.sendall(raw)
            self.socket = type("S", (), {"socket": self.a, "recv": pynetdicom_tuning._recv})()
            self.socket.socket = self.a
            self.event_queue, self._recv_pdu = queue.Queue(), queue.Queue()
            self.assoc = type("A", (), {"get_handlers": lambda self, e: [], "is_acceptor": True})()

    def pdv(cid: int, data: bytes) -> bytes:
        return (len(data) + 1).to_bytes(4, "big") + bytes([cid]) + data

    items = pdv(1, b"\x00" + b"x" * 70000) + pdv(3, b"\x02" + b"y" * 11)
    good = FakeDUL(b"\x04\x00" + len(items).to_bytes(4, "big") + items)
    _dul.DULServiceProvider._read_pdu_data(good)
    assert good.event_queue.get_nowait() == "Evt10"
    pdu = good._recv_pdu.get_nowait()
    assert isinstance(pdu, P_DATA_TF)
    values = [(i.presentation_context_id, bytes(i.presentation_data_value)) for i in pdu.presentation_data_value_items]
    assert values == [(1, b"\x00" + b"x" * 70000), (3, b"\x02" + b"y" * 11)]
    assert [i.presentation_data_value for i in pdu.presentation_data_value_items][0].obj is \
        [i.presentation_data_value for i in pdu.presentation_data_value_items][1].obj  # one buffer
    bad_items2 = (50).to_bytes(4, "big") + b"\x01\x00abc"  # an item longer than the PDU holds
    bad2 = FakeDUL(b"\x04\x00" + len(bad_items2).to_bytes(4, "big") + bad_items2)
    _dul.DULServiceProvider._read_pdu_data(bad2)
    assert bad2.event_queue.get_nowait() == "Evt19" and bad2._recv_pdu.empty()
    short = FakeDUL(b"\x04\x00\x00\x00\x01\x00" + b"ab")  # peer closes mid-PDU
    short.b.close()
    _dul.DULServiceProvider._read_pdu_data(short)
    assert short.event_queue.get_nowait() == "Evt17"
    for d in (good, bad2, short):
        d.a.close()
        d.b.close()


def test_requestor_sends_pdata_itself_in_order_under_the_send_lock(tmp_path):
    """Many fragments per image from the user thread arrive whole and in order; others still queue."""
    from pynetdicom import dul as _dul

    pynetdicom_tuning.apply()
    files = make_ct_series(tmp_path / "ct", n_slices=6, rows=256, cols=256)
    got = {}

    def on_store(event):
        got[event.request.AffectedSOPInstanceUID] = event.dataset.PixelData
        return 0x0000

    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage)
    scp.maximum_pdu_size = 16384  # 128 KiB of pixels -> 8+ fragments per image
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    direct = []
    original = _dul.DULServiceProvider._send

    def spy(self, pdu):
        direct.append(pynetdicom_tuning.threading.current_thread() is not self)
        return original(self, pdu)

    try:
        _dul.DULServiceProvider._send = spy
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.is_established
        assert isinstance(assoc.dul._ctvlp_send_lock, type(pynetdicom_tuning.threading.Lock()))
        for f in files:
            assert assoc.send_c_store(dcmread(f)).Status == 0
        assoc.release()
    finally:
        _dul.DULServiceProvider._send = original
        server.shutdown()
    assert {dcmread(f).SOPInstanceUID: dcmread(f).PixelData for f in files} == got
    assert sum(direct) >= 6 * 8  # the P-DATA went out from the user thread
    assert not all(direct)  # association set-up and release still go through the DUL thread


def test_user_thread_waits_for_the_reactor_pause_instead_of_polling(tmp_path, monkeypatch):
    from dicom_node.send import Outgoing, send_files
    from dicom_node.config import Destination

    pynetdicom_tuning.apply()
    files = make_ct_series(tmp_path / "ct", n_slices=60, rows=256, cols=256)
    items = [Outgoing(d.SOPInstanceUID, d.SOPClassUID, d.file_meta.TransferSyntaxUID, f)
             for f in files for d in [dcmread(f, stop_before_pixels=True)]]
    polls = []
    original = pynetdicom_tuning._AssociationTime.sleep

    def counting_sleep(delay: float) -> None:
        if delay == 0.0001:  # send_c_*(): `while not self._is_paused: time.sleep(0.0001)`
            polls.append(threading.current_thread().name)
        original(delay)

    monkeypatch.setattr(pynetdicom_tuning._AssociationTime, "sleep", staticmethod(counting_sleep))
    with StoreSCP(tmp_path / "scp", extra_args=["--ignore"]) as scp:
        dest = Destination(ae_title=scp.aet, host="127.0.0.1", port=scp.port)
        outcomes = send_files(dest, items, calling_ae="SCU")
    assert all(o.ok for o in outcomes.values())
    # every C-STORE pauses the reactor; the sender waits for it instead of polling (unpatched:
    # about one 0.1 ms poll per image; a slow reactor may still cost a rare poll after 5 ms)
    assert len(polls) < 5, f"{len(polls)} polls for {len(items)} images"


def test_store_arriving_before_the_acceptor_is_established_still_gets_its_response(tmp_path):
    # CI saw it: the acceptor sends A-ASSOCIATE-AC, and before its association thread has set
    # is_established (here: an EVT_ACCEPTED handler slowed down, as a busy CPU does) the first C-STORE
    # arrives. Served at once on the DUL thread, pynetdicom's storage SCP saw "not established" and
    # sent no response; the SCU waited until the network timeout aborted the association.
    pynetdicom_tuning.apply()
    files = make_ct_series(tmp_path / "ct", n_slices=2, rows=32, cols=32)
    stored = []

    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage)
    port = free_port()
    handlers = [(evt.EVT_ACCEPTED, lambda event: time.sleep(0.5)),
                (evt.EVT_C_STORE, lambda event: stored.append(event.request.AffectedSOPInstanceUID) or 0x0000)]
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage)
        ae.dimse_timeout = 5
        assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
        assert assoc.is_established
        statuses = [assoc.send_c_store(dcmread(f)) for f in files]
        assert [getattr(s, "Status", None) for s in statuses] == [0, 0], "a C-STORE got no response"
        assoc.release()
        assert len(stored) == 2
    finally:
        server.shutdown()


def test_c_store_request_command_is_the_one_pynetdicom_encodes():
    from pynetdicom import dimse_messages, dsutils
    from pynetdicom.dimse_primitives import C_STORE

    for sop_instance, msg_id in (("1.2.3.4.5", 1), ("1.2.3.4.56", 65535), ("2.25." + "9" * 39, 300)):
        req = C_STORE()
        req.MessageID = msg_id
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = sop_instance
        req.Priority = 2
        req._dataset_path = ("unused", 0)  # a data set follows, as in send_c_store(path)
        msg = dimse_messages.C_STORE_RQ()
        msg.primitive_to_message(req)
        assert pynetdicom_tuning.c_store_rq_command(CTImageStorage, sop_instance, msg_id) == \
            dsutils.encode(msg.command_set, True, True)


def _recording_scp(max_pdu: int):
    """A pynetdicom SCP that records each association's raw P-DATA PDUs and stores datasets."""
    received: list[list[bytes]] = []
    stored = {}

    def on_open(event):
        received.append([])

    def on_data(event):
        if event.data[:1] == b"\x04":
            received[-1].append(bytes(event.data))

    def on_store(event):
        stored[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage)
    scp.maximum_pdu_size = max_pdu
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_CONN_OPEN, on_open), (evt.EVT_DATA_RECV, on_data), (evt.EVT_C_STORE, on_store)])
    return server, port, received, stored


def test_store_file_sends_exactly_what_pynetdicom_sends_for_the_file(tmp_path):
    """Same P-DATA PDUs byte for byte (command, fragments, control bytes), also past 512 buffers per image."""
    from pydicom.uid import ExplicitVRLittleEndian

    pynetdicom_tuning.apply()
    # 768 x 768 x 2 bytes in 4 KiB PDUs: ~290 PDUs, more than one sendmsg's worth of buffers
    files = make_ct_series(tmp_path / "ct", n_slices=2, rows=768, cols=768)
    server, port, received, stored = _recording_scp(4096)
    try:
        for direct in (True, False):
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
            assert assoc.is_established
            cx = assoc.accepted_contexts[0].context_id
            for i, f in enumerate(files, start=7):
                if direct:
                    status = pynetdicom_tuning.store_file(assoc, cx, f, ExplicitVRLittleEndian, msg_id=i)
                else:
                    status = assoc.send_c_store(f, msg_id=i)
                assert status is not None and status.Status == 0
            assoc.release()
    finally:
        server.shutdown()
    direct_pdus, pynetdicom_pdus = received
    assert len(direct_pdus) > 2 * 256 and direct_pdus == pynetdicom_pdus
    for f in files:
        raw = f.read_bytes()
        ds = dcmread(f)
        assert raw.endswith(stored[ds.SOPInstanceUID])  # the data set as stored, after the file meta
        assert len(stored[ds.SOPInstanceUID]) > 768 * 768 * 2


def test_store_file_declines_what_it_does_not_read_and_sends_nothing(tmp_path):
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    pynetdicom_tuning.apply()
    f = make_ct_series(tmp_path / "ct", n_slices=1, rows=64, cols=64)[0]
    no_meta = tmp_path / "no_meta.dcm"  # a bare data set: no preamble, no file meta group
    no_meta.write_bytes(f.read_bytes()[split_dataset(f)[1]:])
    server, port, received, stored = _recording_scp(16384)
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
        cx = assoc.accepted_contexts[0].context_id
        assert pynetdicom_tuning.store_file(assoc, cx, no_meta, ExplicitVRLittleEndian) is None
        # the file is Explicit VR; a context for another transfer syntax must not carry it
        assert pynetdicom_tuning.store_file(assoc, cx, f, ImplicitVRLittleEndian) is None
        seen = []
        assoc.bind(evt.EVT_PDU_SENT, lambda event: seen.append(event))  # someone wants the PDUs
        assert pynetdicom_tuning.store_file(assoc, cx, f, ExplicitVRLittleEndian) is None
        assert received[-1] == [] and not stored  # nothing went out
        assert assoc.send_c_store(f).Status == 0  # and the association still works
        assoc.release()
    finally:
        server.shutdown()
    assert seen and len(stored) == 1


def test_c_store_response_command_is_the_one_pynetdicom_encodes():
    from pynetdicom import dimse_messages, dsutils
    from pynetdicom.dimse_primitives import C_STORE

    for status, comment in ((0x0000, None), (0xA700, "disk full"), (0xC000, "missing SOPInstanceUID"),
                            (0xA900, "x" * 80)):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 12
        rsp.AffectedSOPClassUID = CTImageStorage
        rsp.AffectedSOPInstanceUID = "1.2.3.4.5"
        rsp.Status = status
        if comment:
            rsp.ErrorComment = comment[:64]  # LO: pynetdicom refuses more; ours cuts it there too
        msg = dimse_messages.C_STORE_RSP()
        msg.primitive_to_message(rsp)
        assert pynetdicom_tuning.c_store_rsp_command(CTImageStorage, "1.2.3.4.5", 12, status, comment) == \
            dsutils.encode(msg.command_set, True, True)


def test_store_request_command_parsing_takes_only_plain_c_store_requests():
    from pynetdicom import dimse_messages, dsutils
    from pynetdicom.dimse_primitives import C_ECHO

    command = pynetdicom_tuning.c_store_rq_command(CTImageStorage, "1.2.3.4.5", 9)
    assert pynetdicom_tuning._store_request(command) == (CTImageStorage, "1.2.3.4.5", 9)
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = Verification
    msg = dimse_messages.C_ECHO_RQ()
    msg.primitive_to_message(echo)
    assert pynetdicom_tuning._store_request(dsutils.encode(msg.command_set, True, True)) is None
    no_data = command.replace(b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x00", b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01")
    assert no_data != command and pynetdicom_tuning._store_request(no_data) is None  # no data set: pynetdicom's
    assert pynetdicom_tuning._store_request(command[:-3]) is None  # truncated
    assert pynetdicom_tuning._store_request(command + b"\x00\x00\x02\x09\x02\x00\x00\x00\x00\x00") is None


class _RawStore:
    """An EVT_C_STORE handler with the node's direct entry point (``store_raw``), recording its calls."""

    def __init__(self, answer=(0x0000, None)):
        self.answer = answer
        self.raw_calls = []
        self.event_calls = []

    def __call__(self, event):
        self.event_calls.append(event.request.DataSet.getvalue())
        code, comment = self.answer
        ds = Dataset()
        ds.Status = code
        if comment:
            ds.ErrorComment = comment
        return ds

    def store_raw(self, assoc, abstract_syntax, transfer_syntax, sop_instance, stream):
        self.raw_calls.append((abstract_syntax, str(transfer_syntax), sop_instance, stream.getvalue()))
        return self.answer


def test_acceptor_serves_c_store_directly_with_the_responses_pynetdicom_sends(tmp_path):
    """The direct receive path hands the handler the data set as sent and answers byte for byte as
    pynetdicom does (success and a failure with a comment); with someone listening to the messages
    it steps aside and pynetdicom serves the same requests."""
    from pydicom.uid import ExplicitVRLittleEndian

    pynetdicom_tuning.apply()
    files = make_ct_series(tmp_path / "ct", n_slices=3, rows=256, cols=256)
    expected = {dcmread(f).SOPInstanceUID: f.read_bytes()[split_dataset(f)[1]:] for f in files}
    responses = {}
    for answer in ((0x0000, None), (0xA700, "disk space below the watermark")):
        for direct in (True, False):
            handler = _RawStore(answer)
            scp = AE(ae_title="SCP")
            scp.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
            scp.maximum_pdu_size = 16384
            port = free_port()
            handlers = [(evt.EVT_C_STORE, handler)]
            if not direct:
                handlers.append((evt.EVT_DIMSE_RECV, lambda event: None))
            server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
            got = []
            try:
                ae = AE(ae_title="SCU")
                ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
                assoc = ae.associate("127.0.0.1", port, ae_title="SCP",
                                     evt_handlers=[(evt.EVT_DATA_RECV, lambda event: got.append(bytes(event.data)))])
                assert assoc.is_established
                for i, f in enumerate(files, start=1):
                    rsp = assoc.send_c_store(f, msg_id=i)
                    assert rsp.Status == answer[0] and rsp.get("ErrorComment") == answer[1]
                assoc.release()
            finally:
                server.shutdown()
            if direct:
                assert not handler.event_calls
                assert [c[3] for c in handler.raw_calls] == list(expected.values())
                assert {c[0] for c in handler.raw_calls} == {CTImageStorage}
                assert {c[1] for c in handler.raw_calls} == {ExplicitVRLittleEndian}
                assert [c[2] for c in handler.raw_calls] == list(expected)
            else:
                assert not handler.raw_calls and handler.event_calls == list(expected.values())
            responses[direct] = [pdu for pdu in got if pdu[:1] == b"\x04"]  # the P-DATA: C-STORE responses
        assert len(responses[True]) == 3 and responses[True] == responses[False]


def test_a_fragment_out_of_order_in_a_direct_c_store_aborts_only_that_association(tmp_path):
    import struct

    from pydicom.uid import ExplicitVRLittleEndian

    pynetdicom_tuning.apply()
    handler = _RawStore()
    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handler)])
    try:
        for bad in (b"\x00data of another context", b"\x03a command where the data should go on"):
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
            cx = assoc.accepted_contexts[0].context_id
            command = b"\x03" + pynetdicom_tuning.c_store_rq_command(CTImageStorage, "1.2.3", 1)
            other = cx + 2 if bad[0] == 0 else cx
            pdus = b"".join(struct.pack(">BBLLB", 4, 0, 5 + len(v), 1 + len(v), c) + v
                            for c, v in ((cx, command), (cx, b"\x00first data fragment"), (other, bad)))
            # the direct path takes requests once the acceptor counts the association as established
            # (pynetdicom's own path, which serves requests that come earlier, waits on a bad fragment)
            deadline = time.monotonic() + 10
            while not all(a.is_established for a in server.active_associations) and time.monotonic() < deadline:
                time.sleep(0.01)
            assoc.dul.socket.socket.sendall(pdus)
            deadline = time.monotonic() + 10
            while not assoc.is_aborted and time.monotonic() < deadline:
                time.sleep(0.05)
            assert assoc.is_aborted
        ae = AE(ae_title="SCU")  # the SCP serves the next association as before
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # the file's, sent as stored
        assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
        f = make_ct_series(tmp_path / "ct", n_slices=1, rows=32, cols=32)[0]
        assert assoc.send_c_store(f).Status == 0
        assoc.release()
    finally:
        server.shutdown()
    assert len(handler.raw_calls) == 1


def test_store_file_reads_its_response_directly_and_returns_what_send_c_store_returns(tmp_path, monkeypatch):
    from pydicom.uid import ExplicitVRLittleEndian

    pynetdicom_tuning.apply()
    f = make_ct_series(tmp_path / "ct", n_slices=1, rows=64, cols=64)[0]
    direct = []
    parse = pynetdicom_tuning._store_response
    monkeypatch.setattr(pynetdicom_tuning, "_store_response",
                        lambda raw, msg_id: direct.append(parse(raw, msg_id)) or direct[-1])
    for answer in ((0x0000, None), (0xA700, "disk space below the watermark"), (0xB000, "coerced")):
        scp = AE(ae_title="SCP")
        scp.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        port = free_port()
        server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, _RawStore(answer))])
        try:
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
            cx = assoc.accepted_contexts[0].context_id
            ours = pynetdicom_tuning.store_file(assoc, cx, f, ExplicitVRLittleEndian, msg_id=5)
            theirs = assoc.send_c_store(f, msg_id=6)
            assoc.release()
        finally:
            server.shutdown()
        assert ours == theirs and ours.Status == answer[0] and ours.get("ErrorComment") == answer[1]
    assert len(direct) == 3 and all(isinstance(d, Dataset) for d in direct)
    # anything but the awaited message's plain response is left to pynetdicom
    rsp = pynetdicom_tuning.c_store_rsp_command(CTImageStorage, "1.2.3", 5, 0)
    assert parse(rsp, 5) is not None and parse(rsp, 6) is None
    assert parse(pynetdicom_tuning.c_store_rq_command(CTImageStorage, "1.2.3", 5), 5) is None
