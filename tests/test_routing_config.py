"""Routing rules, configuration validation and overrides, the file store and completion timers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
from pydicom import Dataset

from dicom_node.completion import CompletionTracker
from dicom_node.config import Config, load_config
from dicom_node.errors import ConfigError
from dicom_node.routing import Matcher, Router, SeriesAttributes
from storage.filestore import DiskFull, FileStore


def _ds(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("pattern,value,expected", [
    ("CT", "CT", True), ("CT", "MR", False), ("*chest*", "CT CHEST W/O", True), ("AX?AL", "AXIAL", True),
    ("re:^ax.*lung", "AX 1mm LUNG", True), ("re:^lung", "AX LUNG", False),
    ("<=5", "2.5", True), ("<=5", "5.01", False), (">0.5", "0.5", False), ("!=3", "2", True),
    ("0.5..5", "5", True), ("0.5..5", "7", False), (2.5, "2.5", True), ("!*LOCALIZER*", "LOCALIZER", False),
    ("!*LOCALIZER*", "AXIAL", True), ("<=5", "abc", False),
])
def test_matcher(pattern, value, expected):
    assert Matcher(pattern)([value]) is expected


def test_missing_attribute_matches_only_negations():
    assert Matcher("CT")(None) is False
    assert Matcher("!CT")(None) is True


@pytest.mark.parametrize("bad", [True, "re:(", "5..1", {"a": 1}])
def test_bad_patterns_are_refused_with_a_reason(bad):
    with pytest.raises(ValueError):
        Matcher(bad)


def _config(rules, **extra) -> Config:
    return Config.model_validate({"destinations": {"pacs": {"ae_title": "PACS", "host": "h", "port": 104},
                                                   "archive": {"ae_title": "ARC", "host": "h", "port": 104}},
                                  "rules": rules, **extra})


def test_rules_in_order_with_lists_exclusions_multivalue_and_stop():
    router = Router(_config([
        {"name": "no-localizers", "match": {"ImageType": "*LOCALIZER*"}, "discard": True},
        {"name": "thin-ct", "match": {"Modality": ["CT", "!PT"], "SliceThickness": "<=3",
                                      "calling_ae": "SCANNER*"}, "analyze": "default", "results_to": ["pacs"],
         "stop": False},
        {"name": "archive-all-ct", "match": {"Modality": "CT"}, "forward": ["archive"]},
    ]))
    ct = _ds(Modality="CT", SliceThickness="1.0", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])
    d = router.decide(SeriesAttributes(ct, calling_ae="SCANNER1"))
    assert [r.name for r in d.rules] == ["thin-ct", "archive-all-ct"]
    assert d.analyze == [("default", ["pacs"])] and d.forward == ["archive"]
    assert "ImageType" in d.reasons["no-localizers"]
    # wrong sender: only the archive rule
    d = router.decide(SeriesAttributes(ct, calling_ae="OTHER"))
    assert [r.name for r in d.rules] == ["archive-all-ct"]
    assert "calling_ae=OTHER" in d.reasons["thin-ct"]
    # localizer: discarded by the first rule, which stops evaluation
    loc = _ds(Modality="CT", SliceThickness="1.0", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    d = router.decide(SeriesAttributes(loc, calling_ae="SCANNER1"))
    assert d.discard and not d.default and "thin-ct" not in d.reasons


def test_unmatched_series_get_the_default_action():
    router = Router(_config([{"name": "ct", "match": {"Modality": "CT"}, "forward": ["pacs"]}],
                            default_action={"forward": ["archive"], "discard": False}))
    d = router.decide(SeriesAttributes(_ds(Modality="SR")))
    assert d.default and d.forward == ["archive"]


def test_unknown_keyword_in_a_rule_is_a_config_error():
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        Router(_config([{"name": "x", "match": {"Modalty": "CT"}, "forward": ["pacs"]}]))


def test_config_errors_name_key_value_and_allowed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("listeners:\n  - {ae_title: CTVLP, port: 99999}\nworkers: {count: -1}\npipelines:\n"
                 "  default: {device: gpu}\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, environ={})
    msg = str(e.value)
    assert "listeners.0.port = 99999" in msg and "less than or equal to 65535" in msg
    assert "workers.count = -1" in msg
    assert "pipelines.default.device = 'gpu'" in msg and "'cpu', 'cuda' or 'auto'" in msg
    assert "bogus" in msg and "unknown key" in msg


def test_a_pipeline_with_an_unknown_segmenter_or_no_bundle_stops_the_start(tmp_path):
    import typing

    from ai_core.segmentation import BACKENDS
    from dicom_node.config import Pipeline

    assert typing.get_args(Pipeline.model_fields["segmentation"].annotation) == BACKENDS
    p = tmp_path / "c.yaml"
    p.write_text("pipelines:\n  default: {segmentation: monai-bundle}\n  bundle: {segmentation: monai_bundle}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, environ={})
    msg = str(e.value)
    assert "pipelines.default.segmentation = 'monai-bundle'" in msg and "'monai_bundle'" in msg
    assert "pipelines.bundle" in msg and "needs segmentation_path" in msg


def test_rule_naming_an_unknown_destination_is_refused():
    with pytest.raises(Exception, match="names destination 'nowhere'"):
        _config([{"name": "r", "match": {}, "forward": ["nowhere"]}])


def test_environment_overrides_every_key():
    c = load_config(None, environ={"CTVLP__LISTENERS__0__PORT": "11113", "CTVLP__WORKERS__COUNT": "3",
                                   "CTVLP__DESTINATIONS__PACS__HOST": "pacs.example",
                                   "CTVLP__NETWORK__ALLOWED_PEERS": "[{ae_title: '*', hosts: [10.0.0.0/8]}]"})
    assert c.listeners[0].port == 11113 and c.workers.count == 3
    assert c.destinations["pacs"].host == "pacs.example"
    assert c.network.allowed_peers[0].hosts == ["10.0.0.0/8"]
    with pytest.raises(ConfigError, match="CTVLP__LISTENERS__5__PORT"):
        load_config(None, environ={"CTVLP__LISTENERS__5__PORT": "1"})


def test_serve_refuses_an_invalid_config_with_a_clear_message(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("network: {max_pdu: lots}\n")
    r = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--config", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "network.max_pdu = 'lots'" in r.stderr and "Traceback" not in r.stderr


def test_embedded_default_config_is_valid_and_analyzes_ct():
    c = load_config(None, environ={})
    assert c.listeners[0].ae_title == "CTVLP" and c.listeners[0].port == 11112
    assert c.database_url.startswith("sqlite:///")
    d = Router(c).decide(SeriesAttributes(_ds(Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])))
    assert d.analyze == [("default", ["pacs"])]
    assert Router(c).decide(SeriesAttributes(_ds(Modality="SR"))).discard


def test_filestore_is_atomic_idempotent_and_honours_the_watermark(tmp_path, monkeypatch):
    store = FileStore(tmp_path / "files", min_free_mb=100)
    a = store.write("1.2", "1.2.3", "1.2.3.4", b"x" * 1000)
    assert not a.duplicate and a.path.read_bytes() == b"x" * 1000
    assert store.write("1.2", "1.2.3", "1.2.3.4", b"x" * 1000).duplicate
    assert not store.write("1.2", "1.2.3", "1.2.3.4", b"y" * 1000).duplicate  # changed: replaced
    assert a.path.read_bytes() == b"y" * 1000
    assert not list(a.path.parent.glob(".*"))
    with pytest.raises(ValueError, match="not a valid UID"):
        store.write("1.2", "../../etc", "1.2.3.5", b"z")
    # free space below the watermark refuses; space coming back recovers
    free = {"bytes": 10 * 2**20}
    real = shutil.disk_usage
    monkeypatch.setattr("storage.filestore.shutil.disk_usage",
                        lambda p: real(p)._replace(free=free["bytes"]))
    store._free_checked = 0
    with pytest.raises(DiskFull):
        store.write("1.2", "1.2.3", "1.2.3.6", b"z")
    free["bytes"] = 10 * 2**30
    store._free_checked = 0
    assert store.write("1.2", "1.2.3", "1.2.3.6", b"z").path.exists()


def test_completion_waits_for_quiet_and_resets_on_each_arrival():
    done: list[tuple[str, float]] = []
    t0 = time.monotonic()
    tracker = CompletionTracker(lambda uid: done.append((uid, time.monotonic() - t0))).start()
    try:
        for _ in range(6):  # arrivals every 0.2 s for 1 s, stable_after 0.5 s
            tracker.touch("1.2.3", 0.5)
            time.sleep(0.2)
        tracker.touch("1.2.4", 0.3)
        time.sleep(1.2)
    finally:
        tracker.stop()
    times = dict(done)
    assert set(times) == {"1.2.3", "1.2.4"} and len(done) == 2
    assert 1.4 <= times["1.2.3"] < 2.0  # 0.5 s after the last arrival at ~1.0 s, not 0.5 s after the first
