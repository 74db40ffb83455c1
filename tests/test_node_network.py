"""The node against real peers: dcmtk storescu as the modality, Orthanc and storescp as PACS."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from ai_core.phantom.series import make_ct_series
from tests.nodeproc import NodeProcess, dataset_bytes_after_meta
from tests.peers import PEER_ENV, Orthanc, StoreSCP, require_tool, storescu


def _series(tmp_path: Path, name: str, n: int = 20, size: int = 128, seed: int = 0) -> list[Path]:
    return make_ct_series(tmp_path / name, n_slices=n, rows=size, cols=size, seed=seed)


def test_storescu_100_slices_stored_as_sent_and_forwarded_to_orthanc(tmp_path):
    files = _series(tmp_path, "ct", n=100, size=256)
    with Orthanc(tmp_path / "orthanc", aet="ORTHANC") as orthanc, NodeProcess(
            tmp_path / "node", stable_after=1.0,
            destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
            rules=[{"name": "ct", "match": {"Modality": "CT"}, "forward": ["pacs"]}]) as node:
        storescu(node.port, files, calling="MODALITY")
        stored = node.files()
        assert len(stored) == 100
        by_uid = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in stored}
        for f in files:
            sent = dcmread(f, stop_before_pixels=True)
            # stored exactly as sent: the encoded dataset after the file meta group is byte-identical
            assert dataset_bytes_after_meta(by_uid[sent.SOPInstanceUID]) == dataset_bytes_after_meta(f)
        st = node.wait_for(lambda: (s := node.status())["series"].get("complete") == 1 and s["jobs"].get(
            "forward/done") == 1 and s, timeout=60, what="series complete and forwarded")
        assert st["deliveries"] == {"done": 100}
        out = node.cli("status").stdout  # what an administrator reads
        assert f"listener CTVLP@127.0.0.1:{node.port}: listening" in out
        assert "forward/done 1" in out and "deliveries: done 100" in out
        series_uid = dcmread(files[0]).SeriesInstanceUID
        found = orthanc.find_series(series_uid)
        assert found is not None and len(found["Instances"]) == 100
        # pixel data equal, instance by instance
        for oid in found["Instances"]:
            got = dcmread(__import__("io").BytesIO(orthanc.get_bytes(f"/instances/{oid}/file")))
            src = dcmread(by_uid[got.SOPInstanceUID])
            assert got.PixelData == src.PixelData


def test_unknown_calling_ae_is_rejected_and_nothing_stored(tmp_path):
    files = _series(tmp_path, "ct", n=3)
    with NodeProcess(tmp_path / "node", extra={"network": {"allowed_peers": [
            {"ae_title": "CT_SCANNER*", "hosts": ["127.0.0.1"]}]}}) as node:
        r = storescu(node.port, files, calling="INTRUDER", check=False)
        assert r.returncode != 0
        assert "Rejected" in r.stdout + r.stderr or "rejected" in (r.stdout + r.stderr).lower()
        # an allowed calling AE (glob) gets in
        storescu(node.port, files, calling="CT_SCANNER_1")
        assert len(node.files()) == 3
        assert "INTRUDER" in node.log() and "not in network.allowed_peers" in node.log()


def test_unknown_host_is_rejected_and_nothing_stored(tmp_path):
    files = _series(tmp_path, "ct", n=3)
    with NodeProcess(tmp_path / "node", extra={"network": {"allowed_peers": [
            {"ae_title": "*", "hosts": ["10.99.0.0/16"]}]}}) as node:
        r = storescu(node.port, files, calling="MODALITY", check=False)
        assert r.returncode != 0
        assert node.files() == [] and node.temporaries() == []


def _send_status(node: NodeProcess, ds, context_class=None) -> int:
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(context_class or ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status)
    finally:
        assoc.release()


def _echo_ok(node: NodeProcess) -> bool:
    r = subprocess.run([require_tool("echoscu"), "-aet", "TESTSCU", "-aec", node.ae_title, "127.0.0.1",
                        str(node.port)], env=PEER_ENV, capture_output=True)
    return r.returncode == 0


def test_malformed_input_gets_failure_status_and_leaves_nothing(tmp_path):
    good = _series(tmp_path, "ct", n=2)
    with NodeProcess(tmp_path / "node") as node:
        # truncated pixel data
        ds = dcmread(good[0])
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        assert _send_status(node, ds) == 0xC000
        # missing Series Instance UID
        ds = dcmread(good[0])
        del ds.SeriesInstanceUID
        assert _send_status(node, ds) == 0xC000
        # missing Study Instance UID
        ds = dcmread(good[0])
        del ds.StudyInstanceUID
        assert _send_status(node, ds) == 0xC000
        # dataset says MR while sent in a CT presentation context: the file meta says CT, so
        # pynetdicom sends the raw bytes in the CT context
        ds = dcmread(good[0])
        ds.SOPClassUID = MRImageStorage
        mismatched = tmp_path / "mismatch.dcm"
        ds.save_as(mismatched, enforce_file_format=False)
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
        assert int(assoc.send_c_store(mismatched).Status) == 0xA900
        assoc.release()
        # the node keeps serving and nothing partial was left
        assert _echo_ok(node)
        assert node.files() == [] and node.temporaries() == []
        storescu(node.port, good)
        assert len(node.files()) == 2


def test_three_concurrent_associations_all_stored_and_complete(tmp_path):
    series = [_series(tmp_path, f"ct{i}", n=30, seed=i) for i in range(3)]
    with NodeProcess(tmp_path / "node", stable_after=1.0) as node:
        procs = [subprocess.Popen([require_tool("storescu"), "-aet", f"MOD{i}", "-aec", "CTVLP", "-nh",
                                   "127.0.0.1", str(node.port), *map(str, s)], env=PEER_ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i, s in enumerate(series)]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out
        assert len(node.files()) == 90
        node.wait_for(lambda: node.status()["series"].get("discarded") == 3, what="3 series complete")


def test_resent_instances_are_idempotent(tmp_path):
    files = _series(tmp_path, "ct", n=5)
    with NodeProcess(tmp_path / "node", stable_after=0.5) as node:
        storescu(node.port, files)
        node.wait_for(lambda: node.status()["series"].get("discarded") == 1, what="complete")
        for _ in range(15):  # status checks the listener with real associations: no slots held
            assert node.status()["listeners"][0]["listening"]
        storescu(node.port, files)  # identical bytes again: no new rows, no re-opening
        time.sleep(1.5)
        st = node.status()
        assert len(node.files()) == 5
        assert st["series"] == {"discarded": 1}


def test_kill_9_mid_transfer_keeps_every_acknowledged_instance(tmp_path):
    files = _series(tmp_path, "ct", n=120, size=256)
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = NodeProcess(tmp_path / "node", stable_after=1.0,
                           destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}},
                           rules=[{"name": "ct", "match": {"Modality": "CT"}, "forward": ["pacs"]}])
        node.start()
        try:
            proc = subprocess.Popen([require_tool("storescu"), "-v", "-aet", "MODALITY", "-aec", "CTVLP", "-nh",
                                     "127.0.0.1", str(node.port), *map(str, files)], env=PEER_ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            node.wait_for(lambda: len(node.files()) >= 30, timeout=60, interval=0.01, what="30 files stored")
            node.kill9()
            out, _ = proc.communicate(timeout=60)
            # storescu -v: "Sending file: PATH" ... "Received Store Response (Success)"
            acked, current = [], None
            for line in out.splitlines():
                if m := re.search(r"Sending file: (\S+)", line):
                    current = m[1]
                elif "Received Store Response (Success)" in line and current:
                    acked.append(Path(current))
            # the kill came mid-transfer; a file is in place before its Success is sent, so the one
            # in flight at the kill may be stored without having been acknowledged
            assert 29 <= len(acked) < 120, out[:3000] + node.log()[-3000:]
            node.start()
            stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in node.files()}
            for f in acked:
                uid = dcmread(f, stop_before_pixels=True).SOPInstanceUID
                assert uid in stored, f"acknowledged {uid} lost"
                assert dataset_bytes_after_meta(stored[uid]) == dataset_bytes_after_meta(f)
            assert node.temporaries() == []
            n = len(stored)
            node.wait_for(lambda: node.status()["deliveries"].get("done") == n, timeout=60,
                          what="every stored instance forwarded after restart")
            assert len(pacs.files()) == n
        finally:
            node.stop()


def test_destination_down_then_up_is_delivered_and_never_up_fails_visibly(tmp_path):
    files = _series(tmp_path, "ct", n=5)
    files2 = _series(tmp_path, "ct2", n=3, seed=7)
    from tests.peers import free_port

    late_port, dead_port = free_port(), free_port()
    with NodeProcess(tmp_path / "node", stable_after=0.5,
                     destinations={"late": {"ae_title": "LATE", "host": "127.0.0.1", "port": late_port},
                                   "dead": {"ae_title": "DEAD", "host": "127.0.0.1", "port": dead_port}},
                     rules=[{"name": "ct", "match": {"Modality": "CT", "SeriesInstanceUID":
                                                     str(dcmread(files[0]).SeriesInstanceUID)},
                             "forward": ["late"]},
                            {"name": "other", "match": {"Modality": "CT"}, "forward": ["dead"]}],
                     extra={"workers": {"max_attempts": 6, "backoff_base": 1, "backoff_max": 4}}) as node:
        storescu(node.port, files)
        storescu(node.port, files2)
        node.wait_for(lambda: any(j.params.get("destination") == "late" and j.attempts >= 1 and j.last_error
                                  for j in node.jobs()), timeout=30, interval=0.1,
                      what="a failed attempt to the late destination")
        with StoreSCP(tmp_path / "late", aet="LATE", port=late_port) as late:
            node.wait_for(lambda: len(late.files()) == 5, timeout=30, what="delivery after the peer came up")
        st = node.wait_for(lambda: (s := node.status())["jobs"].get("forward/failed") == 1 and s, timeout=60,
                           what="the dead destination's job to fail")
        assert st["jobs"].get("forward/done") == 1
        assert st["deliveries"].get("failed") == 3
        failed = node.cli("jobs", "--failed").stdout
        assert "DEAD" in failed and "did not answer" in failed


def test_disk_below_watermark_refuses_with_out_of_resources(tmp_path):
    files = _series(tmp_path, "ct", n=2)
    # the watermark set from the environment, as systemd would: far above any real free space
    with NodeProcess(tmp_path / "node", env={"CTVLP__STORAGE__MIN_FREE_MB": str(10**12)}) as node:
        assert _send_status(node, dcmread(files[0])) == 0xA700
        assert node.files() == [] and node.temporaries() == []
        assert _echo_ok(node)
        assert "below the watermark" in node.log() or "watermark" in node.log()


def _proc_stats():
    """(pid, the fields of /proc/PID/stat after the command name) of every process; gone ones skipped."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue


def _children(pid: int) -> list[tuple[str, int, int]]:
    """(command line, niceness, scheduling policy) of a process's direct children, from /proc."""
    out = []
    for child, fields in _proc_stats():
        # after the name: state (field 3 of stat), ppid, ...; nice is field 19, policy field 41
        if int(fields[1]) == pid:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            out.append((cmdline, int(fields[16]), int(fields[38])))
    return out


def _group(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in a process group, from /proc."""
    return [pid for pid, fields in _proc_stats() if int(fields[2]) == pgid and fields[0] != "Z"]  # state, ppid, pgrp


def test_no_worker_outlives_the_node(tmp_path):
    # systemd's stop signals the whole group: the node stops its workers and respawns none behind itself
    with NodeProcess(tmp_path / "a") as node:
        node.wait_for(lambda: len(_group(node.proc.pid)) >= 3, what="the node and its two workers")
        pgid = node.proc.pid
        os.killpg(pgid, signal.SIGTERM)
        node.proc.wait(60)
        node.proc = None
        node.wait_for(lambda: not _group(pgid), timeout=30, what="every process of the node gone after SIGTERM")
    # the node killed alone (the OOM killer, kill -9): its workers notice they are orphans and stop
    node = NodeProcess(tmp_path / "b").start()
    pgid = node.proc.pid
    try:
        node.wait_for(lambda: len(_group(pgid)) >= 3, what="the node and its two workers")
        # running, not still being spawned (a spawned child whose parent dies while it reads its
        # start-up data from the parent ends with an EOFError before it can notice anything)
        node.wait_for(lambda: len(re.findall(r"worker \S+ started", node.log())) >= 2, what="both workers running")
        node.proc.kill()
        node.proc.wait(10)
        node.wait_for(lambda: not _group(pgid), timeout=30, what="the orphaned workers to stop by themselves")
        assert "the node process %d is gone; stopping" % pgid in node.log()
    finally:
        if _group(pgid):
            os.killpg(pgid, signal.SIGKILL)
        node.proc = None


def test_the_node_stops_on_a_sigterm_that_another_thread_receives(tmp_path):
    # The kernel delivers a process-directed signal to any thread that does not block it; the node
    # has several (heartbeat, scheduler, indexer). Sent to one of them, SIGTERM must still stop it.
    import ctypes

    tgkill = ctypes.CDLL(None, use_errno=True).tgkill  # glibc >= 2.30
    with NodeProcess(tmp_path / "a", workers=0) as node:
        pid = node.proc.pid
        main_tid = pid
        node.wait_for(lambda: len(os.listdir(f"/proc/{pid}/task")) > 3, what="the node's threads")
        other = next(int(t) for t in sorted(os.listdir(f"/proc/{pid}/task")) if int(t) != main_tid)
        assert tgkill(pid, other, signal.SIGTERM) == 0, ctypes.get_errno()
        assert node.proc.wait(20) == 0
        node.proc = None
        assert "stopping" in node.log()


def test_analysis_workers_yield_the_cpu_to_receiving(tmp_path):
    # a PACS administrator's node keeps acknowledging images while an analysis runs: the analysis
    # worker runs at a lower priority (workers.analysis_nice, and SCHED_IDLE with
    # workers.analysis_idle), the delivery worker does not
    with NodeProcess(tmp_path / "node") as node:
        workers = []
        for _ in range(100):
            workers = [(nice, policy) for cmd, nice, policy in _children(node.proc.pid) if "spawn_main" in cmd]
            if len(workers) == 2 and (10, os.SCHED_IDLE) in workers:
                break
            time.sleep(0.1)
        assert sorted(workers) == [(0, os.SCHED_OTHER), (10, os.SCHED_IDLE)], workers
    with NodeProcess(tmp_path / "nice", extra={"workers": {"analysis_idle": False}}) as node:
        for _ in range(100):
            workers = [(nice, policy) for cmd, nice, policy in _children(node.proc.pid) if "spawn_main" in cmd]
            if len(workers) == 2 and any(nice == 10 for nice, _ in workers):
                break
            time.sleep(0.1)
        assert sorted(workers) == [(0, os.SCHED_OTHER), (10, os.SCHED_OTHER)], workers


def test_receiver_processes_share_concurrent_associations_and_lose_nothing(tmp_path):
    sets = [_series(tmp_path, f"ct{i}", n=15, size=64, seed=i) for i in range(4)]
    with NodeProcess(tmp_path / "node", stable_after=1.0, workers=0,
                     extra={"network": {"receive_processes": 2, "allowed_peers": [
                         {"ae_title": "MODALITY", "hosts": ["127.0.0.1"]}]}}) as node:
        results = [None] * 4

        def send(i: int) -> None:
            results[i] = storescu(node.port, sets[i], calling="MODALITY", check=False)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(r is not None and r.returncode == 0 for r in results), [r and r.stderr[-500:] for r in results]
        assert len(node.files()) == 60
        # complete (and, with no rules, discarded): every instance was indexed before its series completed
        node.wait_for(lambda: node.status()["series"].get("discarded") == 4, timeout=60, what="four series complete")
        assert _indexed(node) == 60
        # the associations were served by the two receiver processes, round robin: two each
        accepted = re.findall(r"(receiver-\d) dicom_node.receive: association accepted: AE 'MODALITY'", node.log())
        assert sorted(accepted) == ["receiver-1", "receiver-1", "receiver-2", "receiver-2"]
        # a receiver that dies is replaced, and receiving goes on
        pid = int(re.search(r"receiver-1 started as pid (\d+)", node.log()).group(1))
        __import__("os").kill(pid, 9)
        node.wait_for(lambda: node.log().count("receiver-1 started as pid") == 2, timeout=30,
                      what="receiver-1 restarted")
        more = _series(tmp_path, "ct4", n=5, size=64, seed=9)
        for _ in range(2):  # round robin: one of these goes to the new receiver-1
            storescu(node.port, more, calling="MODALITY")
        assert len(node.files()) == 65
        node.wait_for(lambda: _indexed(node) == 65, timeout=30, what="the new instances indexed")
        # the allow-list holds in the receivers too
        r = storescu(node.port, more[:1], calling="INTRUDER", check=False)
        assert r.returncode != 0 and len(node.files()) == 65


def _indexed(node: NodeProcess) -> int:
    from sqlalchemy import func, select

    from storage.models import Instance

    node.status()  # opens the database
    with node._factory() as s:
        return s.scalar(select(func.count()).select_from(Instance))
