"""The Storage SCU (dicom_node.send) against real peers: dcmtk storescp and a pynetdicom SCP."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from ai_core.phantom.series import make_ct_series
from dicom_node.config import Destination
from dicom_node.errors import DeliveryError
from dicom_node.send import MIN_PER_ASSOCIATION, Outgoing, send_files
from tests.peers import StoreSCP, free_port


def _items(tmp_path: Path, n: int) -> list[Outgoing]:
    files = make_ct_series(tmp_path / "ct", n_slices=n, rows=64, cols=64)
    return [Outgoing(d.SOPInstanceUID, d.SOPClassUID, d.file_meta.TransferSyntaxUID, f)
            for f in files for d in [dcmread(f, stop_before_pixels=True)]]


def test_a_series_is_shared_among_concurrent_associations_and_each_file_sent_once(tmp_path):
    items = _items(tmp_path, 3 * MIN_PER_ASSOCIATION)
    # --fork: a child per association, so the associations really run at once
    with StoreSCP(tmp_path / "scp", extra_args=["--fork", "-v"]) as scp:
        dest = Destination(ae_title=scp.aet, host="127.0.0.1", port=scp.port, associations=3)
        outcomes = send_files(dest, items, calling_ae="SCU")
        received = [dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in scp.files()]
    assert set(outcomes) == {it.sop_instance_uid for it in items}
    assert all(o.ok for o in outcomes.values())
    assert sorted(received) == sorted(it.sop_instance_uid for it in items)  # each exactly once
    log = (tmp_path / f"storescp-{scp.port}.log").read_text(errors="replace")
    assert len(re.findall(r"Association Acknowledged", log)) == 3


def test_a_short_batch_uses_one_association_whatever_is_allowed(tmp_path):
    items = _items(tmp_path, MIN_PER_ASSOCIATION + 3)
    with StoreSCP(tmp_path / "scp", extra_args=["--fork", "-v"]) as scp:
        dest = Destination(ae_title=scp.aet, host="127.0.0.1", port=scp.port, associations=4)
        outcomes = send_files(dest, items, calling_ae="SCU")
    assert all(o.ok for o in outcomes.values()) and len(outcomes) == len(items)
    log = (tmp_path / f"storescp-{scp.port}.log").read_text(errors="replace")
    assert len(re.findall(r"Association Acknowledged", log)) == 1


def test_a_peer_that_refuses_extra_associations_still_gets_every_file(tmp_path, caplog):
    items = _items(tmp_path, 3 * MIN_PER_ASSOCIATION)
    stored: list[str] = []
    lock = threading.Lock()

    def on_store(event):
        with lock:
            stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    scp = AE(ae_title="ONEONLY")
    scp.maximum_associations = 1  # a PACS limiting each calling AE: the others get A-ASSOCIATE-RJ
    scp.add_supported_context(CTImageStorage)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dest = Destination(ae_title="ONEONLY", host="127.0.0.1", port=port, associations=3)
        with caplog.at_level("WARNING", logger="dicom_node.send"):
            outcomes = send_files(dest, items, calling_ae="SCU")
    finally:
        server.shutdown()
    assert all(o.ok for o in outcomes.values()) and len(outcomes) == len(items)
    assert sorted(stored) == sorted(it.sop_instance_uid for it in items)
    refused = [r.getMessage() for r in caplog.records if "associations not established" in r.getMessage()]
    assert len(refused) == 1 and "2 of 3 associations" in refused[0] and "rejected the association" in refused[0]
    assert "lower the destination's `associations` to 1" in refused[0]  # what to do about it


def test_no_association_at_all_is_a_delivery_error_naming_the_peer(tmp_path):
    items = _items(tmp_path, 2 * MIN_PER_ASSOCIATION)
    port = free_port()  # nothing listens
    dest = Destination(ae_title="NOBODY", host="127.0.0.1", port=port, associations=2, timeout=3)
    with pytest.raises(DeliveryError, match=rf"NOBODY@127.0.0.1:{port} did not answer"):
        send_files(dest, items, calling_ae="SCU")
