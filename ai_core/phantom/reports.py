"""Free-text radiology reports of phantom cases, built from per-organ sentences that agree with the truth.

Each sentence carries its organ and the findings it asserts (True) or negates (False), so training
can use the text (``organ_sentences``) and tests can check it against the ground truth. The
phrasings are also exposed as data: NORMAL_SENTENCES (the organ's "no significant abnormality"
texts, positives of each other in fVLM's false-negative calibration), POSITIVE_SENTENCES and
NEGATIVE_SENTENCES (per organ and finding: CT-GLIP's abnormality dictionary), and
``prompt_pair`` (a negative/positive prompt per finding for zero-shot scoring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import re

import numpy as np

from ai_core.phantom.findings import EXCLUSIVE, FINDINGS, PHANTOM_ORGANS, Finding

# organ -> (noun, adjective)
ORGAN_WORDS: dict[str, tuple[str, str]] = {
    "liver": ("liver", "hepatic"),
    "spleen": ("spleen", "splenic"),
    "pancreas": ("pancreas", "pancreatic"),
    "kidney_left": ("left kidney", "left renal"),
    "kidney_right": ("right kidney", "right renal"),
    "gallbladder": ("gallbladder", "gallbladder"),
    "stomach": ("stomach", "gastric"),
    "urinary_bladder": ("urinary bladder", "bladder"),
    "lung_left": ("left lung", "left pulmonary"),
    "lung_right": ("right lung", "right pulmonary"),
    "heart": ("heart", "cardiac"),
    "aorta": ("aorta", "aortic"),
    "esophagus": ("esophagus", "esophageal"),
}

# Words that show a finding is asserted; used by tests and handy for text mining.
FINDING_KEYWORDS: dict[str, tuple[str, ...]] = {
    "lesion": ("lesion",),
    "cyst": ("cyst",),
    "calcification": ("calcif", "stone", "calcul", "lithiasis"),
    "enlargement": ("enlarg", "megaly", "distended", "aneurysm", "dilat"),
    "atrophy": ("atroph",),
    "steatosis": ("steatosis", "fatty"),
    "emphysema": ("emphysem",),
    "pleural_effusion": ("effusion",),
}
# "a" before a vowel sound: "an 8 mm", "an 11 mm", "an ill-defined"
_ARTICLE = re.compile(r"\b([Aa]) (?=(?:8\d*|11|18|ill-)\b|ill-)")
NEGATION_CUES = ("no ", "without", "normal", "unremarkable", "not ", "negative")

_GENERIC_NORMAL = (
    "The {noun} is unremarkable.",
    "No significant abnormality of the {noun}.",
    "{Noun}: no significant abnormality.",
    "The {noun} appears normal.",
)

NORMAL_SENTENCES: dict[str, tuple[str, ...]] = {
    "liver": ("The liver is normal in size and attenuation without focal lesion.", "Unremarkable liver.",
              "No focal hepatic abnormality; the liver is of normal size."),
    "spleen": ("The spleen is normal in size.", "Unremarkable spleen."),
    "pancreas": ("The pancreas is unremarkable without focal lesion or calcification.", "Normal pancreas."),
    "kidney_left": ("The left kidney is normal without stones or focal lesions.", "Unremarkable left kidney."),
    "kidney_right": ("The right kidney is normal without stones or focal lesions.", "Unremarkable right kidney."),
    "gallbladder": ("The gallbladder is unremarkable without stones.", "Normal gallbladder."),
    "stomach": ("The stomach is unremarkable.", "Normal appearance of the stomach.",
                "The stomach is partially filled with fluid and gas, otherwise unremarkable."),
    "urinary_bladder": ("The urinary bladder is unremarkable.", "Normal urinary bladder."),
    "lung_left": ("The left lung is clear.", "No abnormality of the left lung.", "Left lung: unremarkable."),
    "lung_right": ("The right lung is clear.", "No abnormality of the right lung.", "Right lung: unremarkable."),
    "heart": ("Heart size is normal.", "The heart is unremarkable.", "Normal heart size without calcifications."),
    "aorta": ("The aorta is normal in caliber.", "Unremarkable aorta.", "Normal caliber of the aorta without calcification."),
    "esophagus": ("The esophagus is unremarkable.", "Normal esophagus."),
}

_LESION_POS = (
    "A {size} mm ill-defined hypodense lesion in the {loc_of}{noun}.",
    "Hypodense focal lesion in the {loc_of}{noun}.",
    "Focal hypoattenuating {adj} lesion measuring {size} mm{loc_in}.",
    "There is a {size} mm hypodense focal lesion in the {loc_of}{noun}.",
)
_CYST_POS = (
    "A {size} mm simple cyst in the {loc_of}{noun}.",
    "Simple {adj} cyst{loc_in}.",
    "Well-circumscribed fluid-density {adj} cyst measuring {size} mm{loc_in}.",
    "There is a {size} mm cyst in the {loc_of}{noun}.",
)
_ATROPHY_POS = ("The {noun} is small and atrophic.", "Atrophy of the {noun}.", "Diffuse {adj} atrophy.")

POSITIVE_SENTENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "liver": {
        "lesion": _LESION_POS,
        "cyst": _CYST_POS,
        "calcification": ("A calcified granuloma in the liver.", "Punctate hepatic calcification."),
        "enlargement": ("Hepatomegaly.", "The liver is enlarged, spanning {size} mm.", "Enlarged liver."),
        "atrophy": _ATROPHY_POS,
        "steatosis": ("Diffuse hepatic steatosis, the liver attenuation being lower than that of the spleen.",
                      "Decreased liver attenuation consistent with fatty infiltration.", "Hepatic steatosis."),
    },
    "spleen": {
        "lesion": _LESION_POS,
        "calcification": ("A calcified granuloma in the spleen.", "Punctate splenic calcifications."),
        "enlargement": ("Splenomegaly.", "The spleen is enlarged, measuring {size} mm.", "Enlarged spleen."),
    },
    "pancreas": {
        "lesion": _LESION_POS,
        "cyst": _CYST_POS,
        "calcification": ("Pancreatic parenchymal calcifications, as in chronic pancreatitis.",
                          "Coarse calcifications in the pancreas."),
        "atrophy": _ATROPHY_POS,
    },
    "kidney_left": {
        "lesion": _LESION_POS,
        "cyst": _CYST_POS,
        "calcification": ("A {size} mm nonobstructing calculus in the {loc_of}{noun}.",
                          "Left nephrolithiasis with a {size} mm stone.", "Calcified stone in the left kidney."),
        "atrophy": _ATROPHY_POS,
    },
    "kidney_right": {
        "lesion": _LESION_POS,
        "cyst": _CYST_POS,
        "calcification": ("A {size} mm nonobstructing calculus in the {loc_of}{noun}.",
                          "Right nephrolithiasis with a {size} mm stone.", "Calcified stone in the right kidney."),
        "atrophy": _ATROPHY_POS,
    },
    "gallbladder": {
        "calcification": ("Cholelithiasis, the largest gallstone measuring {size} mm.",
                          "Calcified gallstones in the gallbladder.", "Gallstones are present."),
        "enlargement": ("The gallbladder is markedly distended.", "Distended gallbladder.",
                        "Gallbladder enlargement (hydrops)."),
    },
    "urinary_bladder": {
        "calcification": ("A {size} mm calculus in the urinary bladder.", "Bladder stone measuring {size} mm.",
                          "Calculus in the urinary bladder."),
        "enlargement": ("The urinary bladder is markedly distended.", "Distended urinary bladder."),
    },
    "lung_left": {
        "emphysema": ("Centrilobular emphysema of the left lung, upper-lobe predominant.",
                      "Emphysematous changes in the left lung.",
                      "Areas of low attenuation in the left lung consistent with emphysema."),
        "pleural_effusion": ("{amount} left pleural effusion.", "There is a {amount_l} left-sided pleural effusion.",
                             "Left pleural effusion, {amount_l}."),
    },
    "lung_right": {
        "emphysema": ("Centrilobular emphysema of the right lung, upper-lobe predominant.",
                      "Emphysematous changes in the right lung.",
                      "Areas of low attenuation in the right lung consistent with emphysema."),
        "pleural_effusion": ("{amount} right pleural effusion.", "There is a {amount_l} right-sided pleural effusion.",
                             "Right pleural effusion, {amount_l}."),
    },
    "heart": {
        "calcification": ("Coronary artery calcifications.", "Calcifications along the coronary arteries."),
        "enlargement": ("Cardiomegaly.", "The heart is enlarged.", "Enlarged cardiac silhouette."),
    },
    "aorta": {
        "calcification": ("Atherosclerotic calcifications of the aortic wall.",
                          "Calcified atherosclerotic plaques along the aorta."),
        "enlargement": ("Fusiform aneurysm of the infrarenal abdominal aorta measuring {size} mm in diameter.",
                        "Abdominal aortic aneurysm, maximal diameter {size} mm.",
                        "Aneurysmal dilatation of the abdominal aorta to {size} mm.", "Abdominal aortic aneurysm."),
    },
    "esophagus": {
        "enlargement": ("The esophagus is dilated with an air-fluid level.",
                        "Dilated esophagus measuring {size} mm.", "Esophageal dilatation."),
    },
}

NEGATIVE_SENTENCES: dict[str, tuple[str, ...]] = {
    "lesion": ("No focal {adj} lesion.", "No focal lesion in the {noun}."),
    "cyst": ("No {adj} cysts.", "No cyst in the {noun}."),
    "calcification": ("No calcifications in the {noun}.", "No {adj} stones or calcifications."),
    "enlargement": ("The {noun} is not enlarged.", "Normal size of the {noun}."),
    "atrophy": ("No atrophy of the {noun}.", "The {noun} is not atrophic."),
    "steatosis": ("No hepatic steatosis.", "Normal liver attenuation without fatty infiltration."),
    "emphysema": ("No emphysema in the {noun}.", "No emphysematous changes of the {noun}."),
    "pleural_effusion": ("No {side} pleural effusion.", "No pleural fluid on the {side}."),
}

# Zero-shot prompt pairs (negative, positive), one per supported finding.
_PROMPT_POSITIVE = {
    "lesion": "Focal hypodense lesion in the {noun}.",
    "cyst": "Cyst in the {noun}.",
    "calcification": "Calcification or stone in the {noun}.",
    "enlargement": "The {noun} is enlarged.",
    "atrophy": "The {noun} is atrophic.",
    "steatosis": "Hepatic steatosis.",
    "emphysema": "Emphysema in the {noun}.",
    "pleural_effusion": "{Side} pleural effusion.",
}


@dataclass(frozen=True)
class Sentence:
    """One report sentence: its organ, text, and the findings it asserts (True) or negates (False)."""

    organ: str
    text: str
    findings: dict[str, bool] = field(default_factory=dict)

    @property
    def normal(self) -> bool:
        """True for a "no significant abnormality" sentence (asserts no finding)."""
        return not any(self.findings.values())


def _words(organ: str) -> dict[str, str]:
    noun, adj = ORGAN_WORDS[organ]
    side = "left" if organ.endswith("_left") else "right" if organ.endswith("_right") else ""
    return {"noun": noun, "Noun": noun[0].upper() + noun[1:], "adj": adj, "side": side,
            "Side": side.capitalize()}


def _fmt(template: str, organ: str, f: Finding | None = None) -> str:
    w = _words(organ)
    loc = f.location if f is not None else ""
    w["loc_of"] = f"{loc} of the " if loc else ""
    w["loc_in"] = f" in the {loc}" if loc else ""
    size = f.size_mm if f is not None and f.size_mm else None
    w["size"] = f"{size:.0f}" if size else "several"
    depth = (f.details or {}).get("depth", 0.0) if f is not None else 0.0
    w["amount"] = "Small" if depth < 35 else "Moderate"
    w["amount_l"] = w["amount"].lower()
    text = _ARTICLE.sub(lambda m: m.group(1) + "n ", template.format(**w))
    return text[0].upper() + text[1:]


def prompt_pair(organ: str, finding: str) -> tuple[str, str]:
    """(negative, positive) zero-shot prompts for a supported (organ, finding) pair."""
    if finding not in FINDINGS.get(organ, []):
        raise ValueError(f"{finding!r} is not a supported finding of {organ!r}")
    neg = _fmt(NEGATIVE_SENTENCES[finding][0], organ)
    return neg, _fmt(_PROMPT_POSITIVE[finding], organ)


def abnormality_dictionary() -> dict[str, dict[str, list[str]]]:
    """Per organ and finding, descriptions of the abnormality (sizes and places left generic)."""
    out: dict[str, dict[str, list[str]]] = {}
    for organ, per in POSITIVE_SENTENCES.items():
        out[organ] = {}
        for finding, templates in per.items():
            dummy = Finding(organ, finding, location="", details={"depth": 30.0})
            generic = [t for t in templates if "{size}" not in t] or list(templates[:1])
            out[organ][finding] = [_fmt(t, organ, dummy).replace("several mm ", "") for t in generic]
    return out


def organ_sentences(organ: str, findings: list[Finding], rng: np.random.Generator) -> list[Sentence]:
    """The sentences about one organ: one per present finding, or a normal sentence, maybe a negation."""
    present = [f for f in findings if f.organ == organ]
    out: list[Sentence] = []
    if present:
        for f in present:
            templates = POSITIVE_SENTENCES[organ][f.finding]
            t = templates[int(rng.integers(len(templates)))]
            out.append(Sentence(organ, _fmt(t, organ, f), {f.finding: True}))
    else:
        pool = NORMAL_SENTENCES[organ] + tuple(_GENERIC_NORMAL)
        t = pool[int(rng.integers(len(pool)))]
        out.append(Sentence(organ, _fmt(t, organ), {}))
    found = {p.finding for p in present}
    # never negate a finding that excludes a present one ("normal size" beside atrophy)
    blocked = set().union(*(g for g in EXCLUSIVE if g & found)) if found else set()
    absent = [f for f in FINDINGS[organ] if f not in found and f not in blocked]
    if absent and rng.random() < 0.35:
        finding = absent[int(rng.integers(len(absent)))]
        t = NEGATIVE_SENTENCES[finding][int(rng.integers(len(NEGATIVE_SENTENCES[finding])))]
        out.append(Sentence(organ, _fmt(t, organ), {finding: False}))
    return out


# Report sections in reading order.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Lungs and pleura", ("lung_right", "lung_left")),
    ("Heart and mediastinum", ("heart", "aorta", "esophagus")),
    ("Liver and biliary system", ("liver", "gallbladder")),
    ("Spleen", ("spleen",)),
    ("Pancreas", ("pancreas",)),
    ("Kidneys", ("kidney_right", "kidney_left")),
    ("Stomach", ("stomach",)),
    ("Urinary bladder", ("urinary_bladder",)),
)

_NO_IMPRESSION = (
    "No significant abnormality in the chest, abdomen or pelvis.",
    "Unremarkable CT of the chest and abdomen.",
    "No acute or significant findings.",
)


def build_report(findings: list[Finding], seed: int, organs: tuple[str, ...] = PHANTOM_ORGANS) -> tuple[str, list[Sentence]]:
    """Report text and its per-organ sentences for the present ``findings`` (deterministic from ``seed``)."""
    rng = np.random.default_rng([seed, 5])
    sentences: list[Sentence] = []
    lines = [
        "EXAMINATION: CT chest, abdomen and pelvis (synthetic phantom, not a patient).",
        "TECHNIQUE: Helical CT from the lung apices to the pelvis.",
        "",
        "FINDINGS:",
    ]
    for title, members in SECTIONS:
        part: list[str] = []
        for organ in members:
            if organ not in organs:
                continue
            s = organ_sentences(organ, findings, rng)
            sentences.extend(s)
            part.extend(x.text for x in s)
        if part:
            lines.append(f"{title}: {' '.join(part)}")
    lines += ["", "IMPRESSION:"]
    positives = [s for s in sentences if not s.normal]
    if positives:
        lines += [f"{i}. {s.text}" for i, s in enumerate(positives, 1)]
    else:
        lines.append(_NO_IMPRESSION[int(rng.integers(len(_NO_IMPRESSION)))])
    return "\n".join(lines) + "\n", sentences
