"""The organs and findings the node knows: SNOMED CT codes and the label groups of each segmenter.

Codes were checked against the DICOM content mapping resource as shipped in pydicom's
``pydicom.sr.codedict`` (anatomy: CID 4031/7166; SEG category: CID 7150) and public SNOMED CT
usage. Label names and numbers of TotalSegmentator v2 (task ``total``, 117 classes) and of the
MONAI ``wholeBody_ct_segmentation`` bundle (104 classes, TotalSegmentator v1 order) are copied
from their published class maps below; ``segmenter_label_groups`` turns them into label numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.coding import Code

# SEG Segmented Property Category (CID 7150): every organ segment is an anatomical structure.
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
LEFT = Code("7771000", "SCT", "Left")
RIGHT = Code("24028007", "SCT", "Right")
LATERALITY = Code("272741003", "SCT", "Laterality")
FINDING_SITE = Code("363698007", "SCT", "Finding Site")


@dataclass(frozen=True)
class Organ:
    """One organ of the catalogue: how DICOM names it and which segmenter labels make it up."""

    key: str
    display_name: str
    code: Code  # SEG Segmented Property Type / SR finding site
    laterality: Code | None  # SEG Segmented Property Type Modifier
    totalsegmentator_v2: tuple[str, ...]  # TotalSegmentator v2 `total` class names
    wholebody_ct: tuple[str, ...]  # MONAI wholeBody_ct_segmentation (TotalSegmentator v1) names
    category: Code = ANATOMICAL_STRUCTURE

    def __post_init__(self) -> None:
        if self.laterality is not None and self.laterality not in (LEFT, RIGHT):
            raise ValueError(f"laterality of {self.key} must be LEFT or RIGHT, got {self.laterality}")
        if not self.totalsegmentator_v2 or not self.wholebody_ct:
            raise ValueError(f"organ {self.key} needs at least one label in each segmenter")


@dataclass(frozen=True)
class FindingCode:
    """A canonical finding: its SNOMED CT code and the organs it applies to (None: any organ)."""

    key: str
    display_name: str
    code: Code
    organs: tuple[str, ...] | None = None


_LUNG_LEFT_LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left")
_LUNG_RIGHT_LOBES = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
_HEART_V1 = (
    "heart_myocardium",
    "heart_atrium_left",
    "heart_ventricle_left",
    "heart_atrium_right",
    "heart_ventricle_right",
)

_KIDNEY = Code("64033007", "SCT", "Kidney")
_ADRENAL = Code("23451007", "SCT", "Adrenal gland")
_LUNG = Code("39607008", "SCT", "Lung")

ORGANS: dict[str, Organ] = {
    o.key: o
    for o in (
        Organ("liver", "Liver", Code("10200004", "SCT", "Liver"), None, ("liver",), ("liver",)),
        Organ("spleen", "Spleen", Code("78961009", "SCT", "Spleen"), None, ("spleen",), ("spleen",)),
        Organ("pancreas", "Pancreas", Code("15776009", "SCT", "Pancreas"), None, ("pancreas",), ("pancreas",)),
        # TotalSegmentator v2 segments renal cysts separately: they are part of the kidney.
        Organ("kidney_left", "Left kidney", _KIDNEY, LEFT, ("kidney_left", "kidney_cyst_left"), ("kidney_left",)),
        Organ(
            "kidney_right", "Right kidney", _KIDNEY, RIGHT, ("kidney_right", "kidney_cyst_right"), ("kidney_right",)
        ),
        Organ(
            "gallbladder", "Gallbladder", Code("28231008", "SCT", "Gallbladder"), None, ("gallbladder",),
            ("gallbladder",),
        ),
        Organ("stomach", "Stomach", Code("69695003", "SCT", "Stomach"), None, ("stomach",), ("stomach",)),
        Organ(
            "urinary_bladder", "Urinary bladder", Code("89837001", "SCT", "Urinary bladder"), None,
            ("urinary_bladder",), ("urinary_bladder",),
        ),
        Organ(
            "adrenal_gland_left", "Left adrenal gland", _ADRENAL, LEFT, ("adrenal_gland_left",),
            ("adrenal_gland_left",),
        ),
        Organ(
            "adrenal_gland_right", "Right adrenal gland", _ADRENAL, RIGHT, ("adrenal_gland_right",),
            ("adrenal_gland_right",),
        ),
        Organ("lung_left", "Left lung", _LUNG, LEFT, _LUNG_LEFT_LOBES, _LUNG_LEFT_LOBES),
        Organ("lung_right", "Right lung", _LUNG, RIGHT, _LUNG_RIGHT_LOBES, _LUNG_RIGHT_LOBES),
        # v2 has one heart label (with the left atrial appendage apart); v1 has five chambers.
        Organ("heart", "Heart", Code("80891009", "SCT", "Heart"), None, ("heart", "atrial_appendage_left"), _HEART_V1),
        Organ("aorta", "Aorta", Code("15825003", "SCT", "Aorta"), None, ("aorta",), ("aorta",)),
        Organ("esophagus", "Esophagus", Code("32849002", "SCT", "Esophagus"), None, ("esophagus",), ("esophagus",)),
    )
}

# Display colours (sRGB) of the segments, from 3D Slicer's GenericAnatomyColors table (the
# colours Slicer and TotalSegmentator's DICOM SEG export use), so organs look as radiologists who
# use those tools expect; without a Recommended Display CIELab Value viewers invent colours (and
# OHIF warns).
DISPLAY_RGB: dict[str, tuple[int, int, int]] = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "pancreas": (249, 180, 111),
    "kidney_left": (185, 102, 83),
    "kidney_right": (185, 102, 83),
    "gallbladder": (139, 150, 98),
    "stomach": (216, 132, 105),
    "urinary_bladder": (222, 154, 132),
    "adrenal_gland_left": (244, 214, 49),
    "adrenal_gland_right": (244, 214, 49),
    "lung_left": (197, 165, 145),
    "lung_right": (197, 165, 145),
    "heart": (206, 110, 84),
    "aorta": (224, 97, 76),
    "esophagus": (211, 171, 143),
}

_LUNGS = ("lung_left", "lung_right")

FINDINGS: dict[str, FindingCode] = {
    f.key: f
    for f in (
        FindingCode("lesion", "Focal hypodense lesion", Code("52988006", "SCT", "Lesion")),
        FindingCode("cyst", "Cyst", Code("367643001", "SCT", "Cyst")),
        FindingCode("calcification", "Calcification or stone", Code("18115005", "SCT", "Pathologic calcification")),
        FindingCode("enlargement", "Enlargement", Code("442021009", "SCT", "Enlargement")),
        FindingCode("atrophy", "Atrophy", Code("13331008", "SCT", "Atrophy")),
        FindingCode("steatosis", "Steatosis", Code("197321007", "SCT", "Steatosis of liver"), ("liver",)),
        FindingCode("emphysema", "Emphysema", Code("87433001", "SCT", "Pulmonary emphysema"), _LUNGS),
        FindingCode("pleural_effusion", "Pleural effusion", Code("60046008", "SCT", "Pleural effusion"), _LUNGS),
    )
}

# TotalSegmentator v2, task "total" (totalsegmentator/map_to_binary.py, class_map["total"]).
TOTALSEGMENTATOR_V2_CLASSES: dict[int, str] = dict(
    enumerate(
        (
            "spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right "
            "adrenal_gland_left lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right "
            "lung_middle_lobe_right lung_lower_lobe_right esophagus trachea thyroid_gland small_bowel "
            "duodenum colon urinary_bladder prostate kidney_cyst_left kidney_cyst_right sacrum vertebrae_S1 "
            "vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1 vertebrae_T12 vertebrae_T11 "
            "vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 vertebrae_T5 vertebrae_T4 "
            "vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 vertebrae_C5 vertebrae_C4 "
            "vertebrae_C3 vertebrae_C2 vertebrae_C1 heart aorta pulmonary_vein brachiocephalic_trunk "
            "subclavian_artery_right subclavian_artery_left common_carotid_artery_right "
            "common_carotid_artery_left brachiocephalic_vein_left brachiocephalic_vein_right "
            "atrial_appendage_left superior_vena_cava inferior_vena_cava portal_vein_and_splenic_vein "
            "iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right "
            "scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right hip_left hip_right "
            "spinal_cord gluteus_maximus_left gluteus_maximus_right gluteus_medius_left gluteus_medius_right "
            "gluteus_minimus_left gluteus_minimus_right autochthon_left autochthon_right iliopsoas_left "
            "iliopsoas_right brain skull "
            + " ".join(f"rib_left_{i}" for i in range(1, 13))
            + " "
            + " ".join(f"rib_right_{i}" for i in range(1, 13))
            + " sternum costal_cartilages"
        ).split(),
        start=1,
    )
)

# MONAI model zoo wholeBody_ct_segmentation (configs/metadata.json channel_def) = TotalSegmentator v1.
WHOLEBODY_CT_CLASSES: dict[int, str] = dict(
    enumerate(
        (
            "spleen kidney_right kidney_left gallbladder liver stomach aorta inferior_vena_cava "
            "portal_vein_and_splenic_vein pancreas adrenal_gland_right adrenal_gland_left "
            "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right lung_middle_lobe_right "
            "lung_lower_lobe_right vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1 "
            "vertebrae_T12 vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7 vertebrae_T6 "
            "vertebrae_T5 vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1 vertebrae_C7 vertebrae_C6 "
            "vertebrae_C5 vertebrae_C4 vertebrae_C3 vertebrae_C2 vertebrae_C1 esophagus trachea "
            "heart_myocardium heart_atrium_left heart_ventricle_left heart_atrium_right heart_ventricle_right "
            "pulmonary_artery brain iliac_artery_left iliac_artery_right iliac_vena_left iliac_vena_right "
            "small_bowel duodenum colon "
            + " ".join(f"rib_left_{i}" for i in range(1, 13))
            + " "
            + " ".join(f"rib_right_{i}" for i in range(1, 13))
            + " humerus_left humerus_right scapula_left scapula_right clavicula_left clavicula_right "
            "femur_left femur_right hip_left hip_right sacrum face gluteus_maximus_left gluteus_maximus_right "
            "gluteus_medius_left gluteus_medius_right gluteus_minimus_left gluteus_minimus_right "
            "autochthon_left autochthon_right iliopsoas_left iliopsoas_right urinary_bladder"
        ).split(),
        start=1,
    )
)

SEGMENTER_CLASS_MAPS: dict[str, dict[int, str]] = {
    "totalsegmentator_v2": TOTALSEGMENTATOR_V2_CLASSES,
    "wholebody_ct": WHOLEBODY_CT_CLASSES,
}


def organ_label_names(organ: Organ, class_set: str) -> tuple[str, ...]:
    """The class names of ``class_set`` ("totalsegmentator_v2" or "wholebody_ct") that make up an organ."""
    if class_set == "totalsegmentator_v2":
        return organ.totalsegmentator_v2
    if class_set == "wholebody_ct":
        return organ.wholebody_ct
    raise ValueError(f"unknown class set {class_set!r}; expected one of {sorted(SEGMENTER_CLASS_MAPS)}")


def segmenter_label_groups(class_set: str, class_map: dict[int, str] | None = None) -> dict[str, tuple[int, ...]]:
    """Catalogue key -> the label numbers of ``class_set`` that make up that organ.

    ``class_map`` overrides the published map (e.g. one read from a bundle's metadata); organs
    with none of their labels in it are left out.
    """
    names = class_map if class_map is not None else SEGMENTER_CLASS_MAPS.get(class_set)
    if names is None:
        raise ValueError(f"unknown class set {class_set!r}; expected one of {sorted(SEGMENTER_CLASS_MAPS)}")
    by_name = {name: value for value, name in names.items()}
    groups: dict[str, tuple[int, ...]] = {}
    for key, organ in ORGANS.items():
        values = tuple(sorted(by_name[n] for n in organ_label_names(organ, class_set) if n in by_name))
        if values:
            groups[key] = values
    return groups


def organ_for_label_name(name: str) -> str | None:
    """The catalogue organ a segmenter class name belongs to (catalogue key, v1 or v2 name), if any."""
    for key, o in ORGANS.items():
        if name == key or name in o.totalsegmentator_v2 or name in o.wholebody_ct:
            return key
    return None


def label_groups_from_names(class_map: dict[int, str]) -> dict[str, tuple[int, ...]]:
    """Catalogue key -> label numbers, for a class map whose names are catalogue keys or
    TotalSegmentator v1/v2 names (as in a MONAI bundle's ``channel_def``); others are ignored."""
    groups: dict[str, list[int]] = {}
    for value, name in sorted(class_map.items()):
        key = organ_for_label_name(str(name).strip())
        if key is not None and int(value) != 0:
            groups.setdefault(key, []).append(int(value))
    return {k: tuple(groups[k]) for k in ORGANS if k in groups}


def organ(key: str) -> Organ:
    """The catalogue entry of an organ key; the error lists the known keys."""
    try:
        return ORGANS[key]
    except KeyError:
        raise KeyError(f"unknown organ {key!r}; the catalogue knows {', '.join(ORGANS)}") from None


def finding(key: str) -> FindingCode:
    """The catalogue entry of a finding key; the error lists the known keys."""
    try:
        return FINDINGS[key]
    except KeyError:
        raise KeyError(f"unknown finding {key!r}; the catalogue knows {', '.join(FINDINGS)}") from None
