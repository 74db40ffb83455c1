"""Placing the findings of a case in its anatomy and painting them into the voxels.

``place_findings`` turns (organ, finding) pairs into ``Finding`` records with a centre, a size
and an attenuation (anatomy coordinates); the painters then change only voxels of the organ's
own label, so ground truth and image agree by construction.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ai_core.phantom.anatomy import Anatomy, Slab
from ai_core.phantom.findings import ORGAN_LABELS, Finding
from ai_core.phantom.shapes import Ellipsoid, Tube, rotation


def _inside_point(rng: np.random.Generator, e: Ellipsoid, frac: float) -> tuple[np.ndarray, np.ndarray]:
    """A random point within ``frac`` of an ellipsoid's radii; also its unit-frame coordinates."""
    q = rng.normal(size=3)
    q = q / np.linalg.norm(q) * rng.uniform(0.0, frac)
    return e.center + e.rot @ (q * e.radii), q


def _surface_point(rng: np.random.Generator, e: Ellipsoid, frac: float, bias: np.ndarray | None = None) -> np.ndarray:
    q = rng.normal(size=3)
    if bias is not None:
        q = q + bias
    q = q / np.linalg.norm(q) * frac
    return e.center + e.rot @ (q * e.radii)


def _pole(q_long: float) -> str:
    return "upper pole" if q_long > 0.3 else "lower pole" if q_long < -0.3 else "interpolar region"


Accept = Callable[[str, np.ndarray, float], bool]


def place_findings(an: Anatomy, pairs: list[tuple[str, str]], seed: int, accept: Accept | None = None) -> list[Finding]:
    """Finding records (anatomy coordinates) for the requested pairs, deterministic from ``seed``.

    ``accept(organ, centre, radius)`` vets a candidate spot of a focal finding (e.g. by rendering
    the labels around it); rejected spots are redrawn.
    """
    rng = np.random.default_rng([seed, 2])
    out: list[Finding] = []
    org = an.organs
    # drawn first so that lesions are hypodense to the liver as it is (fatty or not)
    # on an enhanced CT the liver and spleen of a normal patient differ by up to about 15 HU either
    # way, so a steatosis the phantom calls present is clearly below that
    steatosis_hu = float(an.hu["spleen"] - rng.uniform(20, 45))
    liver_hu = steatosis_hu if ("liver", "steatosis") in pairs else an.hu["liver"]
    for organ, finding in pairs:
        f = Finding(organ, finding)
        if finding in ("lesion", "cyst"):
            radius_range = {
                "liver": (8, 20), "spleen": (7, 14), "pancreas": (6, 11),
                "kidney_left": (7, 15), "kidney_right": (7, 15),
            }[organ]
            if finding == "cyst":
                radius_range = (radius_range[0] - 1, radius_range[1] + 1)
            r0 = float(rng.uniform(*radius_range))
            for _attempt in range(25):  # until the spot really lies in the organ
                r = r0
                if organ == "liver":
                    right, left = an.extras["liver_lobes"]
                    lobe, name = (right, "right lobe") if rng.random() < 0.7 else (left, "left lobe")
                    c, _ = _inside_point(rng, lobe, 0.5)
                    r = min(r, 0.45 * float(lobe.radii.min()))
                    f.location = name
                elif organ == "pancreas":
                    tube: Tube = org[organ]
                    t = float(rng.uniform(0.1, 0.9))
                    c = tube.point_at(t)
                    r = min(r, 0.85 * tube.radius_at(t))
                    f.location = "head" if t < 0.3 else "body" if t < 0.65 else "tail"
                else:
                    e: Ellipsoid = org[organ]
                    c, q = _inside_point(rng, e, 0.5)
                    r = min(r, 0.5 * float(e.radii.min()))
                    f.location = _pole(q[2]) if organ.startswith("kidney") or organ == "spleen" else ""
                if accept is None or accept(organ, c, r):
                    break
            f.center_lps = tuple(float(v) for v in c)
            f.size_mm = round(2 * r, 1)
            if finding == "cyst":
                f.hu = float(rng.uniform(0, 12))
            else:
                base = liver_hu if organ == "liver" else an.hu["kidney" if organ.startswith("kidney") else organ]
                # hypo-enhancing solid tissue: 30-60 HU below the enhanced organ, and never below
                # 35 HU, so that its density is above any cyst's, which is how a radiologist tells
                # the two apart on a contrast-enhanced CT
                f.hu = float(max(base - rng.uniform(30, 60), 35.0))
            f.details = {"radius_mm": r, "lumps": list(rng.normal(0, 0.08 if finding == "lesion" else 0.02, 8)),
                         "rot": list(rng.uniform(-np.pi, np.pi, 3))}
        elif finding == "calcification":
            foci = []
            if organ in ("gallbladder", "urinary_bladder"):
                e = org[organ]
                n = int(rng.integers(1, 4))
                lo, hi = (3.0, 7.0) if organ == "gallbladder" else (4.0, 8.0)
                for _ in range(n):
                    # stones sink: bias towards the dependent wall
                    p = _surface_point(rng, e, float(rng.uniform(0.3, 0.55)), np.array([0, an.gravity * 2.0, 0]))
                    foci.append((p, float(rng.uniform(lo, hi))))
                f.location = ""
            elif organ == "aorta":
                tube = org["aorta"]
                n = int(rng.integers(2, 6))
                for _ in range(n):
                    t = float(rng.uniform(0.3, 0.95))
                    axis = tube.point_at(min(t + 0.01, 1.0)) - tube.point_at(max(t - 0.01, 0.0))
                    perp = np.cross(axis, rng.normal(size=3))
                    perp /= np.linalg.norm(perp) or 1.0
                    foci.append((tube.point_at(t) + perp * tube.radius_at(t) * 0.8, float(rng.uniform(2.5, 4.5))))
                f.location = ""
            elif organ == "heart":
                e = org["heart"]
                n = int(rng.integers(2, 5))
                for _ in range(n):
                    foci.append((_surface_point(rng, e, 0.9, np.array([0, -1.5, 1.0])), float(rng.uniform(2.5, 4.0))))
                f.location = "coronary arteries"
            elif organ == "pancreas":
                tube = org[organ]
                n = int(rng.integers(2, 5))
                for _ in range(n):
                    t = float(rng.uniform(0.05, 0.95))
                    foci.append((tube.point_at(t) + rng.normal(0, 2.0, 3), float(rng.uniform(2.0, 3.5))))
                f.location = ""
            else:  # liver, spleen (granulomas), kidneys (stones)
                e = org[organ]
                if organ == "liver":
                    e = an.extras["liver_lobes"][0]
                n = int(rng.integers(1, 4))
                qs = []
                for _ in range(n):
                    rf = float(rng.uniform(2.5, 4.5))
                    for _attempt in range(25):
                        p, q = _inside_point(rng, e, 0.6)
                        if accept is None or accept(organ, p, rf):
                            break
                    foci.append((p, rf))
                    qs.append(q)
                f.location = _pole(qs[0][2]) if organ.startswith("kidney") else ""
            f.center_lps = tuple(float(v) for v in foci[0][0])
            f.size_mm = round(2 * max(r for _, r in foci), 1)
            f.hu = float(rng.uniform(400, 1000))
            f.details = {"foci": [[*map(float, p), r] for p, r in foci], "count": len(foci)}
        elif finding in ("enlargement", "atrophy"):
            shape = org[organ]
            lo, hi = shape.bbox()
            f.center_lps = tuple(float(v) for v in (lo + hi) / 2)
            if organ == "aorta":
                centre, radius = an.extras["aneurysm"]
                f.center_lps = tuple(float(v) for v in centre)
                f.size_mm = round(2 * radius, 1)
                f.location = "infrarenal abdominal aorta"
            elif organ == "esophagus":
                f.size_mm = round(2 * float(org[organ].radii.max()), 1)
                f.location = "distal"
            else:
                f.details = {"scale": an.extras["scales"][organ]}
                f.size_mm = round(float(np.max(hi - lo)), 1)
        elif finding == "steatosis":
            f.hu = steatosis_hu
            f.center_lps = tuple(float(v) for v in an.extras["liver_lobes"][0].center)
        elif finding == "emphysema":
            f.details = {"threshold": float(rng.uniform(0.35, 0.9))}
            f.hu = -965.0
            f.location = "upper lobes"
        elif finding == "pleural_effusion":
            f.details = {"depth": float(rng.uniform(22, 55)), "height": float(rng.uniform(90, 160))}
            f.hu = float(rng.uniform(8, 20))
            f.size_mm = round(f.details["depth"], 1)
        else:
            raise ValueError(f"no painter for finding {finding!r}")
        out.append(f)
    return out


def _paint_focal(s: Slab, f: Finding, ctx: dict) -> None:
    label = ORGAN_LABELS[f.organ]
    r = f.details["radius_mm"]
    e = Ellipsoid(np.array(f.center_lps), np.array([r, r * 0.9, r * 1.1]), rotation(*f.details["rot"]),
                  np.array(f.details["lumps"]))
    b = s.box(e)
    if b is None:
        return
    x, y, z = s.xyz(b)
    organ = s.labels[b] == label
    h = s.hu[b]
    if f.finding == "cyst":
        m = (e.level(x, y, z) <= 1.0) & organ
        h[m] = f.hu
    else:
        # ill-defined margin: blend into the organ over the outer fifth of the radius
        lev = e.level(x, y, z)
        m = (lev <= 1.15) & organ
        w = np.clip((1.15 - lev[m]) / 0.3, 0.0, 1.0)
        h[m] = h[m] * (1 - w) + f.hu * w
        m = (lev <= 1.0) & organ
    f.voxels += int(m.sum())


def _paint_foci(s: Slab, f: Finding, ctx: dict) -> None:
    label = ORGAN_LABELS[f.organ]
    rmin = 0.55 * float(np.linalg.norm(s.grid.spacing))  # every focus covers at least one voxel
    for *p, r in f.details["foci"]:
        e = Ellipsoid(np.array(p), np.full(3, max(r, rmin)))
        b = s.box(e)
        if b is None:
            continue
        m = e.inside(*s.xyz(b)) & (s.labels[b] == label)
        s.hu[b][m] = f.hu
        f.voxels += int(m.sum())


def _paint_nothing(s: Slab, f: Finding, ctx: dict) -> None:
    # size, steatosis, emphysema and effusion are drawn with the organ itself
    lab = ORGAN_LABELS[f.organ]
    f.voxels += int((s.labels == lab).sum()) if f.finding in ("enlargement", "atrophy", "steatosis") else 0


PAINTERS: dict[str, Callable[[Slab, Finding, dict], None]] = {
    "lesion": _paint_focal,
    "cyst": _paint_focal,
    "calcification": _paint_foci,
    "enlargement": _paint_nothing,
    "atrophy": _paint_nothing,
    "steatosis": _paint_nothing,
    "emphysema": _paint_nothing,
    "pleural_effusion": _paint_nothing,
}
