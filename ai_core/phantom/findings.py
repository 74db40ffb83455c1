"""Which findings the phantom can place in which organ, and how a case's findings are chosen.

``FINDINGS`` is the table that training and evaluation read: every (organ, finding) pair in it
is placed by the generator and recorded present or absent in each case's ground truth.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

# Organs of the phantom and their values in its label map (canonical keys; no adrenal glands).
PHANTOM_ORGANS: tuple[str, ...] = (
    "liver",
    "spleen",
    "pancreas",
    "kidney_left",
    "kidney_right",
    "gallbladder",
    "stomach",
    "urinary_bladder",
    "lung_left",
    "lung_right",
    "heart",
    "aorta",
    "esophagus",
)
ORGAN_LABELS: dict[str, int] = {organ: i + 1 for i, organ in enumerate(PHANTOM_ORGANS)}

# Supported (organ, finding) pairs. What each means in the phantom:
#   lesion         focal hypodense (hypo-enhancing) lesion, ill-defined, 6-22 mm radius, 30-60 HU
#                  below the organ and at least 35 HU (above water density)
#   cyst           round, sharp, water density (0-12 HU)
#   calcification  1-4 small foci of 350-1000 HU (stones in gallbladder, kidney and bladder;
#                  wall calcification of the aorta; coronary calcification of the heart)
#   enlargement    organ scaled up (aorta: fusiform aneurysm; esophagus: dilated, fluid/air filled)
#   atrophy        organ scaled down
#   steatosis      liver 20-45 HU below the spleen (about 25-55 HU below a normal liver)
#   emphysema      low-attenuation areas (about -960 HU) in 15-45 % of the lung, upper-zone predominant
#   pleural_effusion  dependent fluid (10-20 HU) in the pleural space; the lung label shrinks
FINDINGS: dict[str, list[str]] = {
    "liver": ["lesion", "cyst", "calcification", "enlargement", "atrophy", "steatosis"],
    "spleen": ["lesion", "calcification", "enlargement"],
    "pancreas": ["lesion", "cyst", "calcification", "atrophy"],
    "kidney_left": ["lesion", "cyst", "calcification", "atrophy"],
    "kidney_right": ["lesion", "cyst", "calcification", "atrophy"],
    "gallbladder": ["calcification", "enlargement"],
    "stomach": [],
    "urinary_bladder": ["calcification", "enlargement"],
    "lung_left": ["emphysema", "pleural_effusion"],
    "lung_right": ["emphysema", "pleural_effusion"],
    "heart": ["calcification", "enlargement"],
    "aorta": ["calcification", "enlargement"],
    "esophagus": ["enlargement"],
}

SUPPORTED_PAIRS: list[tuple[str, str]] = [(o, f) for o in PHANTOM_ORGANS for f in FINDINGS[o]]

# Findings of one organ that cannot be present together.
EXCLUSIVE: tuple[frozenset[str], ...] = (frozenset({"enlargement", "atrophy"}),)

# Share of cases in which each pair is present in balanced mode, per block of BALANCED_BLOCK cases.
BALANCED_BLOCK = 20
BALANCED_PRESENT = 6


@dataclass
class Finding:
    """One placed finding and its ground truth (position in LPS mm, size, attenuation)."""

    organ: str
    finding: str
    present: bool = True
    center_lps: tuple[float, float, float] | None = None
    size_mm: float | None = None
    hu: float | None = None
    voxels: int = 0  # voxels it changed at the generated resolution
    location: str = ""  # words for the report, e.g. "right lobe", "upper pole"
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)


def check_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Validate requested (organ, finding) pairs against FINDINGS; raises ValueError naming the bad one."""
    out: list[tuple[str, str]] = []
    for organ, finding in pairs:
        if organ not in FINDINGS:
            raise ValueError(f"unknown phantom organ {organ!r}; organs: {', '.join(PHANTOM_ORGANS)}")
        if finding not in FINDINGS[organ]:
            allowed = ", ".join(FINDINGS[organ]) or "none"
            raise ValueError(f"the phantom cannot place {finding!r} in {organ}; supported there: {allowed}")
        if (organ, finding) not in out:
            out.append((organ, finding))
    for organ in {o for o, _ in out}:
        chosen = {f for o, f in out if o == organ}
        for group in EXCLUSIVE:
            if len(chosen & group) > 1:
                raise ValueError(f"{organ}: {' and '.join(sorted(chosen & group))} exclude each other")
    return out


def random_pairs(rng: np.random.Generator) -> list[tuple[str, str]]:
    """Zero, one or several findings: each pair with a per-case rate drawn from 0..0.3."""
    rate = float(rng.uniform(0.0, 0.3))
    present = rng.random(len(SUPPORTED_PAIRS)) < rate
    chosen = [p for p, keep in zip(SUPPORTED_PAIRS, present) if keep]
    return _resolve_exclusive(chosen, rng)


def _resolve_exclusive(pairs: list[tuple[str, str]], rng: np.random.Generator) -> list[tuple[str, str]]:
    out = list(pairs)
    for organ in PHANTOM_ORGANS:
        for group in EXCLUSIVE:
            clash = [p for p in out if p[0] == organ and p[1] in group]
            if len(clash) > 1:
                keep = clash[int(rng.integers(len(clash)))]
                out = [p for p in out if p not in clash or p == keep]
    return out


def balanced_pairs(seed: int, index: int) -> list[tuple[str, str]]:
    """Findings of case ``index`` of a balanced set started at ``seed``.

    In every block of BALANCED_BLOCK consecutive indices each supported pair is present in
    exactly BALANCED_PRESENT cases and absent in the others; exclusive findings of one organ
    share a schedule so they never coincide.
    """
    block, pos = divmod(int(index), BALANCED_BLOCK)
    out: list[tuple[str, str]] = []
    for organ in PHANTOM_ORGANS:
        findings = FINDINGS[organ]
        done: set[str] = set()
        for finding in findings:
            if finding in done:
                continue
            group = next((sorted(g & set(findings)) for g in EXCLUSIVE if finding in g), [finding])
            group = [f for f in group if f in findings]
            key = f"{seed}:{block}:{organ}:{'+'.join(group)}".encode()
            perm = np.random.default_rng(zlib.crc32(key)).permutation(BALANCED_BLOCK)
            slot = int(perm[pos])
            for g_i, f in enumerate(group):
                if g_i * BALANCED_PRESENT <= slot < (g_i + 1) * BALANCED_PRESENT:
                    out.append((organ, f))
                done.add(f)
    return out
