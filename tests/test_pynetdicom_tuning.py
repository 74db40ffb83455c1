"""The pynetdicom latency overrides: applied only to the pinned version, behaviour unchanged."""

from __future__ import annotations

import os
import time

import pynetdicom
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from ai_core.phantom.series import make_ct_series
from dicom_node import pynetdicom_tuning
from tests.peers import free_port


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

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
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
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    finally:
        server.shutdown()
