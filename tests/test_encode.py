"""SEG, SR and SC encoders: validity (dciodvfy, dsrdump), round trips in the source geometry, supersession."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.config
import pytest
import SimpleITK as sitk

from ai_core.catalogue import DISPLAY_RGB, FINDINGS, ORGANS
from ai_core.encode import encode_results, encode_to_files, write_results
from ai_core.encode.readback import read_sr_findings
from ai_core.encode.sr import PRESENCE, PROBABILITY, UNITY, finding_probability_concept
from ai_core.phantom.series import body_volume, orientation_direction, write_series
from ai_core.result import AnalysisResult, FindingResult, ModelInfo, OrganResult
from ai_core.volume import read_volume

SHAPE = (12, 40, 48)  # slices, rows, columns: non-square and small


@pytest.fixture()
def strict_reading():
    old = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.reading_validation_mode = old


def _phantom(tmp_path: Path, orientation: str = "HFS", slice_order: str = "ascending", seed: int = 3):
    vol = body_volume(SHAPE[0], SHAPE[1], SHAPE[2], (4.0, 4.5, 5.0), seed)
    vol.SetDirection(orientation_direction(orientation))
    vol.SetOrigin((-91.0, -77.5, 130.0))
    write_series(vol, tmp_path / "ct", slice_order=slice_order, seed=seed)
    return read_volume(tmp_path / "ct")  # files sorted along the slice normal, independently of us


def _labels(identity: bool = False) -> tuple[np.ndarray, dict[str, int]]:
    """A label map with organs of both sides and label values that are not segment numbers."""
    values = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4} if identity else \
        {"liver": 9, "spleen": 4, "kidney_left": 17, "kidney_right": 2}
    lab = np.zeros(SHAPE, np.uint8)
    zz, yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    lab[(((zz - 5) / 4.0) ** 2 + ((yy - 12) / 8.0) ** 2 + ((xx - 14) / 10.0) ** 2) <= 1] = values["liver"]
    lab[2:6, 8:14, 34:42] = values["spleen"]
    lab[6:10, 26:32, 30:36] = values["kidney_left"]
    lab[7:11, 26:33, 10:16] = values["kidney_right"]
    lab[9, 30, 13] = 0  # a hole: masks must round-trip exactly, not as boxes
    return lab, values


def _result(volume, labels: np.ndarray, values: dict[str, int], demo: bool = True) -> AnalysisResult:
    organs = [OrganResult(k, v, "evaluated", volume_ml=None) for k, v in values.items()]
    organs.append(OrganResult("urinary_bladder", 0, "not evaluated", reason="organ not in field of view"))
    findings = [
        FindingResult("liver", "lesion", "present", 0.87, 0.5),
        FindingResult("liver", "steatosis", "absent", 0.12, 0.5),
        FindingResult("spleen", "enlargement", "present", 0.61, 0.5),
        FindingResult("kidney_left", "cyst", "present", 0.93, 0.5),
        FindingResult("kidney_right", "cyst", "absent", 0.08, 0.5),
        FindingResult("kidney_right", "atrophy", "not evaluated", reason="organ partly outside the field of view"),
        FindingResult("urinary_bladder", "calcification", "not evaluated", reason="organ not in field of view"),
    ]
    return AnalysisResult(
        study_instance_uid=volume.study_uid, series_instance_uid=volume.series_uid,
        model=ModelInfo("demo-vlp", "0.1", "cafe", demo=demo), segmenter=ModelInfo("demo-seg", "0.2", demo=demo),
        organs=organs, findings=findings, source_files=list(volume.files), labels=labels,
    )


def _dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy not found: install dicom3tools (apt-get install dicom3tools)"
    out = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("parallel", [True, False])
def test_objects_validate_with_dciodvfy_and_dsrdump(tmp_path, parallel):
    volume = _phantom(tmp_path)
    labels, values = _labels()
    result = _result(volume, labels, values)
    if parallel:  # written as they are built; the SR's bytes straight from the child
        paths = encode_to_files(result, tmp_path / "out")
    else:
        paths = write_results(encode_results(result, parallel=False), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths.values())
    assert {"encode", "encode_seg", "encode_sr_wait"} <= set(result.timings)
    assert set(paths) == {"seg", "sr", "sc"}
    for kind, path in paths.items():
        assert _dciodvfy_errors(path) == [], f"dciodvfy errors in the {kind}"
    exe = shutil.which("dsrdump")
    assert exe, "dsrdump not found: install dcmtk (apt-get install dcmtk)"
    out = subprocess.run([exe, str(paths["sr"])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    noise = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("W:", "E:", "F:"))]
    assert noise == []
    assert "Imaging Measurement Report" in out.stdout


@pytest.mark.parametrize(
    ("orientation", "slice_order", "identity"),
    [("HFS", "ascending", False), ("FFS", "descending", True), ("sagittal", "shuffled", False),
     ("coronal", "ascending", False), ("oblique", "shuffled", False), ("HFP", "descending", False)],
)
def test_seg_masks_round_trip_in_source_geometry(tmp_path, strict_reading, orientation, slice_order, identity):
    volume = _phantom(tmp_path, orientation, slice_order)
    labels, values = _labels(identity)
    objects = encode_results(_result(volume, labels, values), kinds=("seg",))
    path = write_results(objects, tmp_path / "out")["seg"]
    seg = hd.seg.segread(path)
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert seg.StudyInstanceUID == volume.study_uid
    assert seg.SeriesInstanceUID != volume.series_uid
    by_number = {d.segment_number: d for d in seg.SegmentSequence}
    organ_of_number = {}
    for number, desc in by_number.items():
        organ = next(o for o in ORGANS.values() if o.display_name == desc.segment_label)
        assert desc.segmented_property_category == organ.category
        assert desc.segmented_property_type == organ.code
        mods = desc.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence", [])
        assert [(m.CodeValue, m.CodingSchemeDesignator) for m in mods] == (
            [(organ.laterality.value, "SCT")] if organ.laterality else [])
        assert desc.algorithm_identification[0].AlgorithmFamilyCodeSequence[0].CodeMeaning == \
            "Artificial Intelligence"
        # the organ's own colour, as a viewer shows it (CIELab round trip within 1 of the sRGB)
        rgb = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.subtract(rgb, DISPLAY_RGB[organ.key])).max() <= 1
        organ_of_number[number] = organ.key
    assert sorted(organ_of_number.values()) == sorted(values)
    expected = np.zeros_like(labels)
    for number, key in organ_of_number.items():
        expected[labels == values[key]] = number

    # 1. By the per-frame references to the source images.
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in volume.files]
    by_ref = seg.get_pixels_by_source_instance(uids, combine_segments=True, ignore_spatial_locations=True,
                                               assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(by_ref, expected)

    # 2. By geometry alone: the SEG as a volume in patient space, resampled onto the CT grid.
    seg_img = seg.get_volume(combine_segments=True).to_simpleitk()
    on_ct = sitk.Resample(sitk.Cast(seg_img, sitk.sitkUInt8), volume.image, sitk.Transform(),
                          sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_ct), expected)

    # Empty frames are omitted: one frame per (segment, slice) that holds pixels.
    expected_frames = sum(int(np.any(labels[k] == values[o])) for o in values for k in range(SHAPE[0]))
    assert int(seg.NumberOfFrames) == expected_frames


def test_sr_round_trip_finds_every_finding(tmp_path, strict_reading):
    volume = _phantom(tmp_path, "HFS", "shuffled")
    labels, values = _labels()
    result = _result(volume, labels, values)
    paths = write_results(encode_results(result), tmp_path / "out")
    seg = hd.seg.segread(paths["seg"])
    sr = hd.sr.srread(paths["sr"])
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.StudyInstanceUID == volume.study_uid
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription
    report = sr.content
    number_of = {d.segment_label: d.segment_number for d in seg.SegmentSequence}
    source_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in volume.files]
    slices_used: dict[str, list[int]] = {}

    for f in result.findings:
        organ, finding = ORGANS[f.organ], FINDINGS[f.finding]
        volumetric = [g for g in report.get_volumetric_roi_measurement_groups(finding_type=finding.code)
                      if _site_matches(g, organ)]
        if f.organ == "urinary_bladder":  # not segmented: a TID 1501 group without ROI
            groups = [g for g in report.get_image_measurement_groups(finding_type=finding.code)
                      if _site_matches(g, organ)]
            assert len(groups) == 1 and not volumetric
            group = groups[0]
        else:
            assert len(volumetric) == 1, f"{f.organ}/{f.finding}"
            group = volumetric[0]
            seg_ref = group.referenced_segment
            assert seg_ref.referenced_sop_instance_uid == seg.SOPInstanceUID
            assert seg_ref.referenced_segment_numbers == [number_of[organ.display_name]]
            # Referenced through the source series, not a list of every source image.
            assert seg_ref.source_series_for_segmentation.value == volume.series_uid
            assert not seg_ref.has_source_images()
        presence = [e for e in group.get_qualitative_evaluations(name=PRESENCE)]
        assert len(presence) == 1
        assert presence[0].value.meaning == {"present": "Present", "absent": "Absent",
                                             "not evaluated": "Presence Undetermined"}[f.decision]
        probs = group.get_measurements(name=PROBABILITY)
        if f.decision == "not evaluated":
            assert probs == []
            assert f.reason in group.tracking_identifier
        else:
            assert len(probs) == 1 and probs[0].value == pytest.approx(f.probability)
            assert probs[0].unit == UNITY
            assert f"p={f.probability:.2f}" in group.tracking_identifier
        # The 2D point group with the same tracking UID, on a source slice, inside the organ.
        planar = report.get_planar_roi_measurement_groups(tracking_uid=group.tracking_uid)
        assert len(planar) == 1
        region = planar[0].roi
        assert region.graphic_type.value == "POINT"
        if f.decision == "not evaluated":  # nothing for OHIF to draw: a 3D point at the organ
            assert isinstance(region, hd.sr.ImageRegion3D)
            assert region.frame_of_reference_uid == volume.frame_of_reference_uid
            if f.organ in values:
                idx = volume.image.TransformPhysicalPointToIndex([float(v) for v in region.value[0]])
                assert labels[idx[2], idx[1], idx[0]] == values[f.organ]
            continue
        assert isinstance(region, hd.sr.ImageRegion)
        k = source_uids.index(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        col, row = region.value[0]
        assert labels[k, int(row), int(col)] == values[f.organ], "the point must lie inside the organ"
        slices_used.setdefault(f.organ, []).append(k)
        named = planar[0].get_measurements(name=finding_probability_concept(f.finding, f.organ))
        assert len(named) == 1 and named[0].value == pytest.approx(f.probability)
        meaning = named[0].name.meaning.lower()  # what OHIF prints before the value
        assert finding.code.meaning.lower() in meaning
        if organ.laterality is not None:
            assert organ.laterality.meaning.lower() in meaning
    # Findings of one organ point at different slices, so their labels do not pile up in OHIF.
    assert len(slices_used["liver"]) == 2
    assert len(set(slices_used["liver"])) == 2


def _site_matches(group, organ) -> bool:
    sites = group.finding_sites
    if len(sites) != 1 or sites[0].value != organ.code:
        return False
    lat = sites[0].laterality
    return (lat is None and organ.laterality is None) or (lat is not None and lat == organ.laterality)


def test_supersession_references_the_predecessor(tmp_path):
    volume = _phantom(tmp_path)
    labels, values = _labels()
    result = _result(volume, labels, values)
    first = encode_results(result, kinds=("sr",))
    second = encode_results(result, kinds=("sr",), predecessor_sr=first["sr"])
    assert second["sr"].SOPInstanceUID != first["sr"].SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in first["sr"]
    pre = second["sr"].PredecessorDocumentsSequence[0]
    assert pre.StudyInstanceUID == volume.study_uid
    assert pre.ReferencedSeriesSequence[0].SeriesInstanceUID == first["sr"].SeriesInstanceUID
    ref = pre.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first["sr"].SOPInstanceUID
    assert ref.ReferencedSOPClassUID == first["sr"].SOPClassUID


def test_demo_banner_and_descriptions(tmp_path):
    volume = _phantom(tmp_path)
    labels, values = _labels()
    demo = encode_results(_result(volume, labels, values, demo=True))
    real = encode_results(_result(volume, labels, values, demo=False))
    for kind in ("seg", "sr", "sc"):
        assert "NOT FOR CLINICAL USE" in demo[kind].SeriesDescription
        assert "NOT FOR CLINICAL USE" not in real[kind].SeriesDescription
        assert demo[kind].StudyInstanceUID == volume.study_uid
    banner = demo["sc"].pixel_array[:30]
    red = (banner[..., 0] > 150) & (banner[..., 1] < 60) & (banner[..., 2] < 60)
    assert red.mean() > 0.5
    top = real["sc"].pixel_array[:30]
    assert ((top[..., 0] > 150) & (top[..., 1] < 60)).mean() < 0.05


def test_results_join_the_original_study_in_orthanc(tmp_path):
    from tests.peers import Orthanc

    volume = _phantom(tmp_path)
    labels, values = _labels()
    paths = write_results(encode_results(_result(volume, labels, values)), tmp_path / "out")
    with Orthanc(tmp_path / "orthanc") as orthanc:
        for f in volume.files:
            orthanc.upload(f)
        for kind, p in paths.items():
            answer = orthanc.upload(p)
            assert answer.get("Status") in ("Success", "AlreadyStored"), (kind, answer)
        series = orthanc.study_series(volume.study_uid)
        modalities = sorted(s["MainDicomTags"].get("Modality") for s in series)
        assert modalities == ["CT", "OT", "SEG", "SR"]
        assert len({s["ParentStudy"] for s in series}) == 1


def test_errors_name_the_cause_also_from_the_forked_sr(tmp_path):
    volume = _phantom(tmp_path)
    labels, values = _labels()
    result = _result(volume, labels, values)
    result.findings.append(FindingResult("liver", "nonsense", "present", 0.5))
    with pytest.raises(ValueError, match="nonsense"):
        encode_results(result)
    result.findings.pop()
    result.findings.append(FindingResult("liver", "cyst", "present", 1.7))
    with pytest.raises(ValueError, match="outside 0..1"):
        encode_results(result)
    with pytest.raises(ValueError, match="unknown result kind"):
        encode_results(result, kinds=("seg", "pdf"))



def test_a_refused_series_gets_a_report_and_summary_that_say_why(tmp_path):
    volume = _phantom(tmp_path)
    why = "series not analysed: slices are not equally spaced"
    result = AnalysisResult(
        study_instance_uid=volume.study_uid, series_instance_uid=volume.series_uid,
        model=ModelInfo("demo-vlp", "0.1", "cafe", demo=True), segmenter=ModelInfo("demo-seg", "0.2", demo=True),
        organs=[OrganResult(k, 0, "not evaluated", why) for k in ("liver", "kidney_left")],
        findings=[FindingResult("liver", "lesion", "not evaluated", reason=why),
                  FindingResult("kidney_left", "cyst", "not evaluated", reason=why)],
        source_files=list(volume.files), labels=None, refused="slices are not equally spaced")
    paths = encode_to_files(result, tmp_path / "out")
    assert set(paths) == {"sr", "sc"}  # no masks, no SEG
    for kind, path in paths.items():
        assert _dciodvfy_errors(path) == [], f"dciodvfy errors in the {kind}"
        assert "series not analysed" in pydicom.dcmread(path).SeriesDescription
    findings = read_sr_findings(paths["sr"])
    got = {(f.organ, f.finding): f.decision for f in findings}
    assert got == {("liver", "lesion"): "not evaluated", ("kidney_left", "cyst"): "not evaluated"}
    assert all("slices are not equally spaced" in f.tracking_identifier for f in findings)
    # images without positions: nothing to point into, and the error says so
    for ds in (sources := [pydicom.dcmread(f) for f in volume.files]):
        del ds.ImagePositionPatient
    with pytest.raises(ValueError, match="lack ImagePositionPatient"):
        encode_results(result, sources=sources)


def test_sr_alone_brings_its_seg_and_no_organ_means_no_seg(tmp_path):
    volume = _phantom(tmp_path)
    labels, values = _labels()
    result = _result(volume, labels, values)
    objects = encode_results(result, kinds=("sr",))
    assert set(objects) == {"seg", "sr"}
    ref = objects["sr"].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert objects["seg"].SOPInstanceUID in {i.ReferencedSOPInstanceUID for s in ref for i in s.ReferencedSOPSequence}
    # Nothing segmented: no SEG, and the SR still reports every finding (TID 1501 groups).
    empty = _result(volume, np.zeros_like(labels), values)
    objects = encode_results(empty, kinds=("seg", "sr"))
    assert set(objects) == {"sr"}
    path = write_results(objects, tmp_path / "out")["sr"]
    report = hd.sr.srread(path).content
    assert len(report.get_image_measurement_groups()) == len(empty.findings)
    assert _dciodvfy_errors(path) == []


def test_encoding_inside_a_daemonic_process_runs_inline(tmp_path):
    """A daemonic worker may not fork children: the SR is then built in the worker itself."""
    import multiprocessing

    volume = _phantom(tmp_path)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def work():
        labels, values = _labels()
        try:
            objects = encode_results(_result(volume, labels, values))
            queue.put(sorted(objects))
        except BaseException as e:  # noqa: BLE001 - report anything to the test
            queue.put(repr(e))

    proc = ctx.Process(target=work, daemon=True)
    proc.start()
    answer = queue.get(timeout=120)
    proc.join(30)
    assert answer == ["sc", "seg", "sr"]


def _bytes_without_times(ds) -> bytes:
    """A result object's file bytes without the times of its making, to compare two builds."""
    import io

    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        ds.pop(keyword, None)
    for item in ds.get("ContributingEquipmentSequence", []):
        item.pop("ContributionDateTime", None)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_lean_sr_construction_builds_the_same_document(tmp_path, monkeypatch):
    import io
    import itertools

    from ai_core.encode import highdicom_tuning
    from ai_core.encode.common import Device, LabelIndex, read_headers
    from ai_core.encode.seg import plan_segments, seg_reference
    from ai_core.encode.sr import build_sr

    assert hd.__version__ == highdicom_tuning.WRITTEN_FOR, "pin highdicom in pyproject.toml"
    volume = _phantom(tmp_path)
    labels, values = _labels()
    result = _result(volume, labels, values)
    sources = read_headers(result.source_files)
    index = LabelIndex(result.labels)
    segments = plan_segments(result, index)
    seg = seg_reference(result.study_instance_uid, "1.2.3.1", "1.2.3.2")
    previous = encode_results(result, kinds=("sr",))["sr"]

    def document(lean: bool) -> bytes:
        counter = itertools.count(1)
        monkeypatch.setattr(hd, "UID", lambda: f"2.25.{next(counter)}")  # tracking UIDs alike
        ds = build_sr(result, sources, seg=seg, segments=segments, index=index, device=Device(name="n"),
                      predecessor=previous, series_instance_uid="1.2.3.3", sop_instance_uid="1.2.3.4",
                      lean=lean)
        return _bytes_without_times(ds)

    with highdicom_tuning.lean_sr_construction() as active:
        assert active
    assert document(lean=True) == document(lean=False)
    # the evidence check is kept: a referenced instance missing from the evidence is an error
    content = pydicom.dcmread(io.BytesIO(document(lean=True)))
    with pytest.raises(ValueError, match="No evidence was provided"):
        highdicom_tuning._collect_evidence(sources[:1], content, volume.study_uid)
    assert highdicom_tuning.referenced_instance_uids(content) >= {"1.2.3.2"}  # the SEG, among others
    # the typed view highdicom keeps is there either way: taken as built, or parsed from plain data sets
    built = build_sr(result, sources, seg=seg, segments=segments, index=index, device=Device(name="n"))
    assert isinstance(built.content[0], hd.sr.ContainerContentItem)
    assert len(hd.sr.utils.find_content_items(built, value_type=hd.sr.ValueTypeValues.NUM, recursive=True)) > 0
    plain = content.ContentSequence[0]
    assert not highdicom_tuning._fully_typed(plain)
    typed = highdicom_tuning._TypedOrParsed._from_dataset_derived(plain)
    assert isinstance(typed, hd.sr.ContentItem) and highdicom_tuning._fully_typed(typed)


def test_lean_seg_construction_builds_the_same_segmentation(tmp_path, monkeypatch):
    from highdicom import _standard_utils
    from highdicom._standard_utils import get_sop_class_iod_map

    from ai_core.encode import highdicom_tuning
    from ai_core.encode.common import read_headers
    from ai_core.encode.seg import build_seg

    assert highdicom_tuning.cache_iod_lookups(), "pin highdicom in pyproject.toml"
    lookup = _standard_utils.is_attribute_in_iod
    assert lookup.cache_info is not None

    def answer(function, *args):
        try:
            return function(*args)
        except KeyError as exc:  # the same error for an IOD highdicom has no modules of
            return repr(exc)

    # the memoised lookup answers as highdicom's walk of the tables, for every SOP class
    for sop_class in [*get_sop_class_iod_map(), "1.2.3.4"]:
        for attribute, exclude in (("PerFrameFunctionalGroupsSequence", None), ("ContentDate", None),
                                   ("PixelData", ["IconImageSequence"]), ("NoSuchKeyword", None)):
            assert answer(lookup, attribute, sop_class, exclude) == answer(lookup.uncached, attribute, sop_class,
                                                                           exclude)

    volume = _phantom(tmp_path)
    labels, values = _labels()
    result = _result(volume, labels, values)

    def segmentation(lean: bool) -> bytes:
        if not lean:
            monkeypatch.setattr(highdicom_tuning, "WRITTEN_FOR", "not this version")
            for module in ("highdicom._standard_utils", "highdicom.base", "highdicom.sr.content"):
                monkeypatch.setattr(f"{module}.is_attribute_in_iod", lookup.uncached)
        monkeypatch.setattr("highdicom.image.UID", lambda: "2.25.1")  # the dimension organization
        # fresh headers: their raw values are converted (and, unless lean, checked) on first use
        ds = build_seg(result, read_headers(result.source_files), series_instance_uid="1.2.3.1",
                       sop_instance_uid="1.2.3.2")
        return _bytes_without_times(ds)

    lean = segmentation(lean=True)
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.WARN, "the setting is restored"
    assert lean == segmentation(lean=False)


def test_a_built_segmentation_indexes_its_frames_when_first_queried(tmp_path):
    import io
    import pickle

    from ai_core.encode import highdicom_tuning
    from ai_core.encode.common import read_headers
    from ai_core.encode.seg import build_seg

    volume = _phantom(tmp_path)
    labels, values = _labels()
    result = _result(volume, labels, values)
    seg = build_seg(result, read_headers(result.source_files))
    assert isinstance(seg, highdicom_tuning.DeferredIndexSegmentation), "pin highdicom in pyproject.toml"
    assert "_db_con" not in seg.__dict__, "no frame index is built for writing"
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    assert "_db_con" not in seg.__dict__
    # Queried, the object built in memory answers as the file read back does.
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in volume.files]
    options = dict(combine_segments=True, ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    in_memory = seg.get_pixels_by_source_instance(uids, **options)
    buffer.seek(0)
    np.testing.assert_array_equal(in_memory, hd.seg.segread(buffer).get_pixels_by_source_instance(uids, **options))
    assert in_memory.any() and len(np.unique(in_memory)) == len(values) + 1
    # a copy (pickled: highdicom serialises the index) answers the same
    fresh = build_seg(result, read_headers(result.source_files))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fresh)).get_pixels_by_source_instance(uids, **options),
                                  in_memory)


def test_seg_written_with_both_cores_is_byte_for_byte_the_plain_write(tmp_path, monkeypatch):
    import io

    from ai_core.encode import parallel

    volume = _phantom(tmp_path)
    labels, values = _labels()
    seg = encode_results(_result(volume, labels, values), kinds=("seg",))["seg"]
    frames = len(seg.PerFrameFunctionalGroupsSequence)
    assert 4 <= frames < parallel.SPLIT_MIN_ITEMS
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    plain = buffer.getvalue()  # pydicom's own write
    assert parallel.encode_file(seg) == plain  # the items by _ItemEncoder, here
    assert parallel.encode_file(seg, split=True) == plain  # a short sequence: not split
    monkeypatch.setattr(parallel, "SPLIT_MIN_ITEMS", 2)
    assert parallel.encode_file(seg, split=True) == plain  # half the frames' items from a forked child
    # the dataset itself is untouched: its sequence is still there, item by item
    assert len(seg.PerFrameFunctionalGroupsSequence) == frames and not seg["PerFrameFunctionalGroupsSequence"].is_raw
    assert pydicom.dcmread(io.BytesIO(plain)).NumberOfFrames == frames


def test_sequence_items_with_shared_sub_items_encode_as_pydicom_writes_them():
    from pydicom.dataelem import DataElement, RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_sequence_item
    from pydicom.sequence import Sequence
    from pydicom.tag import Tag

    from ai_core.encode import parallel

    def code(value: str) -> Dataset:
        ds = Dataset()
        ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = value, "DCM", f"meaning {value}"
        return ds

    shared = code("121322")  # one object in every item, as highdicom shares them
    per_slice = [Dataset() for _ in range(3)]
    for i, ds in enumerate(per_slice):
        ds.ReferencedSOPInstanceUID = f"1.2.3.{i}"
        ds.PurposeOfReferenceCodeSequence = [shared]
    items = []
    for i in range(9):
        item = Dataset()
        item.SourceImageSequence = [per_slice[i % 3]]
        item.DerivationCodeSequence = [shared]
        item.DimensionIndexValues = [1, i + 1]
        item.ImagePositionPatient = [0.5, -1.25, 3.0 * i]
        item.ReferencedSegmentNumber = i % 4 + 1
        items.append(item)
    items[1]["DerivationCodeSequence"].is_undefined_length = True  # same items, other framing
    items[2].SourceImageSequence[0].is_undefined_length_sequence_item = True
    items[3].ReferencedImageSequence = Sequence()  # empty
    items[3].add(DataElement(0x00200000, "UL", 4))  # a group length: not written
    items[4].SpecificCharacterSet = "ISO_IR 100"
    items[4].PatientName = "Müller^Jürgen"
    items[5].SpecificCharacterSet = "ISO_IR 192"
    items[5].PatientName = "Ζεὺς^Κρόνου"
    # an item read from implicit VR: raw, and not in the encoding written, so pydicom converts it
    raw = Dataset()
    raw[0x00200013] = RawDataElement(Tag(0x00200013), None, 2, b"7 ", 0, True, True)
    raw.set_original_encoding(True, True, None)
    items[6].ReferencedInstanceSequence = [raw]
    for item in items:
        for ds in (item, *[x for e in item if e.VR == "SQ" for x in e.value]):
            if ds is not raw and ds.original_encoding == (None, None):
                ds.set_original_encoding(False, True, ds._character_set)

    def pydicom_write(items) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        for item in items:
            write_sequence_item(fp, item, ["iso8859"])
        return fp.getvalue()

    assert parallel._encode_items(items, ["iso8859"]) == pydicom_write(items)


def test_marking_result_objects_as_written_keeps_their_bytes(tmp_path):
    import copy
    import io

    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from ai_core.encode import parallel

    volume = _phantom(tmp_path)
    labels, values = _labels()
    # built here (not read back from a child's bytes): as the encoders hold them before writing
    objects = encode_results(_result(volume, labels, values), kinds=("seg", "sr", "sc"), parallel=False)

    def plain_write(ds) -> bytes:
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    for kind, ds in objects.items():
        expected = plain_write(copy.deepcopy(ds))
        assert parallel.mark_as_written(ds) > 3, kind  # nested items too
        assert parallel.encode_file(ds) == expected, kind
        assert parallel.mark_as_written(ds) == 0  # nothing left to mark

    # An item holding an element still raw from an implicit-VR file is not marked: pydicom must
    # still convert that element (its VR is unknown in the file) for an explicit-VR write.
    source = pydicom.dcmread(volume.files[0])
    source.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    implicit = io.BytesIO()
    source.save_as(implicit, implicit_vr=True, little_endian=True)
    reread = pydicom.dcmread(io.BytesIO(implicit.getvalue()))
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item[0x00200032] = reread.get_item(0x00200032)  # Image Position (Patient), raw, VR unknown
    assert isinstance(item.get_item(0x00200032), RawDataElement) and item.get_item(0x00200032).VR is None
    sr = objects["sr"]
    sr.ReferencedInstanceSequence = Sequence([item])
    expected = plain_write(copy.deepcopy(sr))
    assert parallel.mark_as_written(sr) == 0  # the rest was marked above; the new item holds a raw element
    assert item.original_encoding == (None, None)
    assert parallel.encode_file(sr) == expected
    assert pydicom.dcmread(io.BytesIO(expected)).ReferencedInstanceSequence[0].ImagePositionPatient \
        == source.ImagePositionPatient


def test_encoder_warm_up_runs_the_whole_encoding_on_a_made_up_series():
    from ai_core.encode import warm_up

    assert 0 < warm_up() < 60  # builds a SEG, SR and SC (inline) and leaves nothing behind


_HELD_AT_FORK = __import__("threading").Lock()


def _pid_under_held_lock() -> int:
    with _HELD_AT_FORK:  # in a child forked while the parent held it, this never returns
        return __import__("os").getpid()


def test_an_encoder_child_stuck_on_a_lock_held_at_the_fork_is_killed_and_the_work_runs_inline(caplog):
    import os
    import time

    from ai_core.encode.parallel import Forked

    with _HELD_AT_FORK:  # e.g. the heartbeat thread inside a database call at the moment of the fork
        job = Forked(_pid_under_held_lock, plain=True)
    child = job._proc
    started = time.monotonic()
    value, raw = job.outcome(stall=1.0)
    assert value == os.getpid() and raw is None  # computed here, after the child was given up
    assert time.monotonic() - started < 15
    assert not child.is_alive()
    assert "used no CPU for 1 s without answering" in caplog.text
    # a healthy child is left to finish, however long it computes
    busy = Forked(_busy_pid, plain=True, seconds=2.5)
    assert busy.outcome(stall=1.0) == (busy._proc.pid, None)


def _busy_pid(seconds: float) -> int:
    import os
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return os.getpid()
