"""The organ and finding catalogue: keys, codes and segmenter label groups."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from ai_core import catalogue
from ai_core.catalogue import DISPLAY_RGB, FINDINGS, ORGANS, segmenter_label_groups

CANONICAL_ORGANS = (
    "liver spleen pancreas kidney_left kidney_right gallbladder stomach urinary_bladder "
    "adrenal_gland_left adrenal_gland_right lung_left lung_right heart aorta esophagus"
).split()
CANONICAL_FINDINGS = "lesion cyst calcification enlargement atrophy steatosis emphysema pleural_effusion".split()


def test_keys_are_the_canonical_ones():
    assert list(ORGANS) == CANONICAL_ORGANS
    assert list(FINDINGS) == CANONICAL_FINDINGS
    assert all(o.key == k for k, o in ORGANS.items())
    assert set(DISPLAY_RGB) == set(ORGANS)  # every segment gets its display colour


def test_anatomy_codes_match_pydicoms_dicom_dictionary():
    # pydicom's code dictionary is generated from the DICOM standard's content mapping resource.
    expected = {
        "liver": codes.SCT.Liver, "spleen": codes.SCT.Spleen, "pancreas": codes.SCT.Pancreas,
        "kidney_left": codes.SCT.Kidney, "gallbladder": codes.SCT.Gallbladder, "stomach": codes.SCT.Stomach,
        "urinary_bladder": codes.SCT.Bladder, "adrenal_gland_right": codes.SCT.AdrenalGland,
        "lung_left": codes.SCT.Lung, "heart": codes.SCT.Heart, "aorta": codes.SCT.Aorta,
        "esophagus": codes.SCT.Esophagus,
    }
    for key, code in expected.items():
        assert ORGANS[key].code.value == code.value, key
        assert ORGANS[key].code.scheme_designator == "SCT"
    assert catalogue.LEFT.value == codes.SCT.Left.value
    assert catalogue.RIGHT.value == codes.SCT.Right.value
    assert catalogue.ANATOMICAL_STRUCTURE.value == "123037004"


def test_laterality_follows_the_key():
    for key, organ in ORGANS.items():
        if key.endswith("_left"):
            assert organ.laterality == catalogue.LEFT, key
        elif key.endswith("_right"):
            assert organ.laterality == catalogue.RIGHT, key
        else:
            assert organ.laterality is None, key


def test_finding_codes_are_sct_and_distinct():
    values = [f.code.value for f in FINDINGS.values()]
    assert len(set(values)) == len(values)
    assert FINDINGS["pleural_effusion"].code.value == codes.SCT.PleuralEffusion.value
    assert FINDINGS["atrophy"].code.value == codes.SCT.Atrophy.value
    assert FINDINGS["lesion"].code.value == codes.SCT.Lesion.value
    assert FINDINGS["steatosis"].organs == ("liver",)
    assert set(FINDINGS["emphysema"].organs) == {"lung_left", "lung_right"}


def test_class_maps_have_the_published_sizes_and_unique_names():
    for name, size in (("totalsegmentator_v2", 117), ("wholebody_ct", 104)):
        cmap = catalogue.SEGMENTER_CLASS_MAPS[name]
        assert sorted(cmap) == list(range(1, size + 1)), name
        assert len(set(cmap.values())) == size, name


def test_every_organ_label_exists_in_both_class_maps():
    for organ in ORGANS.values():
        for n in organ.totalsegmentator_v2:
            assert n in catalogue.TOTALSEGMENTATOR_V2_CLASSES.values(), (organ.key, n)
        for n in organ.wholebody_ct:
            assert n in catalogue.WHOLEBODY_CT_CLASSES.values(), (organ.key, n)


def test_label_groups_spot_values():
    ts = segmenter_label_groups("totalsegmentator_v2")
    wb = segmenter_label_groups("wholebody_ct")
    assert ts["liver"] == (5,) and wb["liver"] == (5,)
    assert ts["pancreas"] == (7,) and wb["pancreas"] == (10,)
    assert ts["aorta"] == (52,) and wb["aorta"] == (7,)
    assert ts["heart"] == (51, 61) and wb["heart"] == (44, 45, 46, 47, 48)
    assert ts["lung_right"] == (12, 13, 14) and wb["lung_right"] == (15, 16, 17)
    assert ts["kidney_left"] == (3, 23)
    assert ts["urinary_bladder"] == (21,) and wb["urinary_bladder"] == (104,)
    # No label belongs to two organs.
    for groups in (ts, wb):
        flat = [v for vs in groups.values() for v in vs]
        assert len(flat) == len(set(flat))
        assert set(groups) == set(ORGANS)


def test_label_groups_from_a_custom_class_map():
    groups = segmenter_label_groups("wholebody_ct", {1: "liver", 2: "lung_upper_lobe_left", 7: "spleen"})
    assert groups == {"liver": (1,), "spleen": (7,), "lung_left": (2,)}


def test_unknown_keys_name_the_known_ones():
    with pytest.raises(KeyError, match="liver"):
        catalogue.organ("livr")
    with pytest.raises(KeyError, match="cyst"):
        catalogue.finding("cist")
    with pytest.raises(ValueError, match="totalsegmentator_v2"):
        segmenter_label_groups("nnunet")


def test_label_groups_from_names_accepts_keys_and_both_totalsegmentator_versions():
    cmap = {0: "background", 1: "liver", 2: "heart_myocardium", 3: "heart_atrium_left", 4: "kidney_cyst_left",
            5: "kidney_left", 6: "lung_left", 7: "vertebrae_L1", 8: "heart"}
    groups = catalogue.label_groups_from_names(cmap)
    assert groups == {"liver": (1,), "kidney_left": (4, 5), "lung_left": (6,), "heart": (2, 3, 8)}
    assert catalogue.organ_for_label_name("vertebrae_L1") is None
    # The published maps give the same groups through either function.
    for name, cmap in catalogue.SEGMENTER_CLASS_MAPS.items():
        assert catalogue.label_groups_from_names(cmap) == segmenter_label_groups(name)
