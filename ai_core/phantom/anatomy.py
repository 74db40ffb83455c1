"""The phantom's anatomy: a randomised chest-abdomen body with organs, and its rendering on a grid.

Coordinates are patient LPS in mm (x to the patient's left, y posterior, z superior), body
centred on (0, 0, 0). ``sample_anatomy`` draws one patient (habitus, organ positions, sizes,
shapes, attenuation, a smooth deformation); ``render`` paints it slab by slab onto any grid
(axial, sagittal, coronal, oblique) so memory stays bounded at 512x512 and cost follows the
voxels each structure covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ai_core.phantom.findings import ORGAN_LABELS, Finding
from ai_core.phantom.shapes import Ellipsoid, Shape, SmoothNoise, Tube, Union, rotation

# Field of view the default grid covers (mm, x y z) and its centre.
FOV_MM = np.array([384.0, 384.0, 420.0])
FOV_CENTER = np.array([0.0, 0.0, 0.0])

# Nominal attenuation (HU) of the tissues in the portal venous phase (about 70 s after contrast),
# the phase of most abdominal CT: the parenchyma is enhanced and so is the blood, while what holds
# water (cysts, bile, urine, effusions) is not. Each case jitters them.
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 50.0,
    "bone_cortical": 700.0,
    "bone_cancellous": 250.0,
    "disc": 90.0,
    "csf": 15.0,
    "lung": -850.0,
    "blood_contrast": 150.0,
    "myocardium": 90.0,
    "liver": 110.0,
    "spleen": 105.0,
    "pancreas": 95.0,
    "kidney": 160.0,  # nephrographic: cortex and medulla alike
    "gallbladder": 10.0,
    "water": 5.0,
    "bowel": 30.0,
    "gas": -800.0,
    "wall": 40.0,
    "table": 300.0,
}


@dataclass
class Grid:
    """A voxel grid: origin (LPS mm), spacing (i, j, k), direction (columns = axes), size (i, j, k)."""

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    size: tuple[int, int, int]

    @classmethod
    def covering(cls, spacing, size=None, direction=None, center=FOV_CENTER, fov=FOV_MM) -> Grid:
        """A grid centred on ``center``; ``size`` defaults to covering the field of view ``fov``."""
        d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
        sp = np.asarray(spacing, dtype=float)
        if size is None:
            extent = np.abs(d).T @ np.asarray(fov, dtype=float)
            size = tuple(int(max(1, round(e / s))) for e, s in zip(extent, sp))
        size = tuple(int(n) for n in size)
        half = d @ ((np.asarray(size) - 1) * sp / 2.0)
        return cls(np.asarray(center, dtype=float) - half, sp, d, size)

    def index_box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices (k, j, i) of the voxels whose centres may lie in the physical box."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        idx = (corners - self.origin) @ self.direction / self.spacing  # (8, 3) in i, j, k
        a = np.maximum(np.floor(idx.min(0)).astype(int), 0)
        b = np.minimum(np.ceil(idx.max(0)).astype(int) + 1, np.asarray(self.size))
        if np.any(b <= a):
            return None
        return slice(a[2], b[2]), slice(a[1], b[1]), slice(a[0], b[0])

    def points(self, ks: slice, js: slice, is_: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical x, y, z (float32 arrays shaped k, j, i) of the voxel centres in a box."""
        k = np.arange(ks.start, ks.stop, dtype=np.float32)[:, None, None] * np.float32(self.spacing[2])
        j = np.arange(js.start, js.stop, dtype=np.float32)[None, :, None] * np.float32(self.spacing[1])
        i = np.arange(is_.start, is_.stop, dtype=np.float32)[None, None, :] * np.float32(self.spacing[0])
        d = self.direction.astype(np.float32)
        o = self.origin.astype(np.float32)
        shape = (ks.stop - ks.start, js.stop - js.start, is_.stop - is_.start)
        out = []
        for c in range(3):
            out.append(np.broadcast_to(o[c] + i * d[c, 0] + j * d[c, 1] + k * d[c, 2], shape).astype(np.float32))
        return out[0], out[1], out[2]


@dataclass
class Deformation:
    """A smooth displacement field: a sum of low-frequency sine waves per component."""

    waves: list[tuple[int, np.ndarray, float, float]]  # (component, wave vector, phase, amplitude)

    @classmethod
    def sample(cls, rng: np.random.Generator, amplitude: float = 5.0) -> Deformation:
        """Two random waves per component, wavelengths 180-400 mm."""
        waves = []
        for c in range(3):
            for _ in range(2):
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                k = direction * 2 * np.pi / rng.uniform(180.0, 400.0)
                waves.append((c, k, float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.4, 1.0) * amplitude)))
        return cls(waves)

    @property
    def max_shift(self) -> float:
        """Upper bound of the displacement length (mm)."""
        per = np.zeros(3)
        for c, _, _, a in self.waves:
            per[c] += a
        return float(np.linalg.norm(per))

    def shift(self, x, y, z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Displacement (dx, dy, dz) at the points."""
        out = [np.zeros(np.shape(x), dtype=np.float32) for _ in range(3)]
        for c, k, phase, a in self.waves:
            out[c] += np.float32(a) * np.sin(
                np.float32(k[0]) * x + np.float32(k[1]) * y + np.float32(k[2]) * z + np.float32(phase)
            )
        return out[0], out[1], out[2]

    def apply(self, x, y, z):
        """Anatomy coordinates of the physical points (the phantom is drawn in deformed space)."""
        dx, dy, dz = self.shift(x, y, z)
        return x + dx, y + dy, z + dz

    def invert_point(self, p: np.ndarray) -> np.ndarray:
        """The physical point whose anatomy coordinate is ``p`` (fixed-point iteration)."""
        q = np.asarray(p, dtype=float).copy()
        for _ in range(6):
            d = np.array([float(v) for v in self.shift(*(np.float32(c) for c in q))])
            q = np.asarray(p, dtype=float) - d
        return q


@dataclass
class Anatomy:
    """One sampled patient: shapes, attenuation and textures (all in anatomy coordinates)."""

    rng_seed: int
    prone: bool
    habitus: float
    body_a: np.ndarray  # LR half-axis at the knots BODY_Z
    body_b: np.ndarray  # AP half-axis at the knots
    fat: float
    muscle: float
    spine_y: float
    diaphragm: tuple[float, float, float, float]  # right dome z, left dome z, curvature k, y of domes
    organs: dict[str, Shape]
    hu: dict[str, float]
    noise_sigma: float
    deformation: Deformation
    extras: dict = field(default_factory=dict)

    @property
    def gravity(self) -> float:
        """+1 when fluid sinks to +y (posterior: supine), -1 when prone."""
        return -1.0 if self.prone else 1.0


BODY_Z = np.array([-230.0, -150.0, -60.0, 30.0, 120.0, 230.0])


# Radius factors of enlargement per organ (volume grows with the cube).
_ENLARGEMENT = {"liver": (1.2, 1.3), "heart": (1.2, 1.3), "spleen": (1.35, 1.5), "gallbladder": (1.35, 1.5)}


def _lumps(rng: np.random.Generator, scale: float = 0.06) -> np.ndarray:
    return rng.normal(0.0, scale, 8)


def _jit(rng: np.random.Generator, s: float) -> float:
    return float(rng.uniform(-s, s))


def sample_anatomy(seed: int, pairs: list[tuple[str, str]], *, prone: bool = False) -> Anatomy:
    """Draw one patient's anatomy with the size findings (enlargement/atrophy) of ``pairs`` applied."""
    rng = np.random.default_rng([seed, 1])
    present = set(pairs)
    hab = float(rng.uniform(0.92, 1.06))
    body_a = np.array([165, 155, 150, 158, 160, 150]) * hab * rng.uniform(0.96, 1.04, 6)
    body_b = np.array([112, 110, 112, 115, 112, 105]) * hab * rng.uniform(0.96, 1.04, 6)
    fat = float(rng.uniform(8, 32))
    muscle = float(rng.uniform(8, 13))
    spine_y = 50.0 * hab
    dz = _jit(rng, 10)  # craniocaudal shift of the whole trunk within the field of view
    diaphragm = (45.0 + dz + _jit(rng, 6), 35.0 + dz + _jit(rng, 6), float(rng.uniform(95, 130)), 0.0)

    scales: dict[str, float] = {}

    def size(organ: str, normal: float = 0.08) -> float:
        if (organ, "enlargement") in present:
            f = float(rng.uniform(*_ENLARGEMENT.get(organ, (1.32, 1.45))))
        elif (organ, "atrophy") in present:
            f = float(rng.uniform(0.62, 0.72))
        else:
            f = float(1.0 + rng.uniform(-normal, normal))
        scales[organ] = f
        return f

    def c(x, y, z, s=8.0) -> np.ndarray:
        return np.array([x * hab + _jit(rng, s), y * hab + _jit(rng, s), z + dz + _jit(rng, s)])

    organs: dict[str, Shape] = {}
    extras: dict = {}

    # Liver: right lobe and left lobe; enlargement grows it mostly downwards.
    f = size("liver", 0.07)
    right = Ellipsoid(c(-65, 5, -10), np.array([78, 78, 72]) * f, rotation(0, 0, _jit(rng, 0.2)), _lumps(rng))
    left = Ellipsoid(
        c(10, -48, 5), np.array([58, 34, 40]) * f, rotation(_jit(rng, 0.15), 0, 0.3 + _jit(rng, 0.2)), _lumps(rng)
    )
    shift = np.array([0.0, 0.0, -(f - 1.0) * 60.0])
    right.center = right.center + shift
    left.center = left.center + shift * 0.5
    organs["liver"] = Union([right, left])
    extras["liver_lobes"] = (right, left)

    f = size("gallbladder", 0.1)
    gb_center = right.center + np.array([18.0, -52.0, -45.0]) * np.array([1, 1, max(1.0, f)])
    organs["gallbladder"] = Ellipsoid(
        gb_center + rng.uniform(-5, 5, 3), np.array([16, 16, 32]) * f, rotation(0.5 + _jit(rng, 0.2), _jit(rng, 0.3), 0),
        _lumps(rng, 0.05),
    )

    f = size("spleen", 0.08)
    spl = Ellipsoid(
        c(88, 42, 0), np.array([28, 48, 50]) * f, rotation(_jit(rng, 0.2), 0, -0.6 + _jit(rng, 0.2)), _lumps(rng)
    )
    spl.center = spl.center + np.array([0.0, -(f - 1) * 20, -(f - 1) * 45])
    organs["spleen"] = spl

    f = size("stomach", 0.08)
    fundus = Ellipsoid(c(52, 5, 15), np.array([40, 38, 42]) * f, rotation(0, 0, 0), _lumps(rng, 0.05))
    body = Ellipsoid(
        fundus.center + np.array([-20, -38, -40]), np.array([48, 30, 38]) * f, rotation(0, 0.3, 0.6), _lumps(rng, 0.05)
    )
    organs["stomach"] = Union([fundus, body])
    extras["stomach_fill"] = float(rng.uniform(0.2, 0.6))  # share of the lumen that is gas

    f = size("pancreas", 0.08)
    head = c(-22, -8, -48, 5)
    pts = np.array([head, head + [30, 10, 14], head + [70, 28, 24], head + [105, 40, 34]])
    pts[1:, 2] += rng.uniform(-5, 5, 3)
    organs["pancreas"] = Tube(pts, np.array([19, 14, 12, 11]) * f * rng.uniform(0.92, 1.08))

    for side, sx, z0 in (("kidney_left", 1.0, -72.0), ("kidney_right", -1.0, -85.0)):
        f = size(side, 0.07)
        k = Ellipsoid(
            c(66 * sx, 45, z0, 6), np.array([26, 24, 52]) * f,
            rotation(0.25 + _jit(rng, 0.1), -0.2 * sx + _jit(rng, 0.1), 0.5 * sx + _jit(rng, 0.2)),
            _lumps(rng, 0.04),
        )
        organs[side] = k
        # renal sinus: a notch of fat on the medial side
        extras[f"{side}_sinus"] = Ellipsoid(
            k.center + np.array([-sx * 18.0 * f, -4.0, 0.0]), np.array([10, 10, 22]) * f, k.rot
        )

    f = size("urinary_bladder", 0.15)
    organs["urinary_bladder"] = Ellipsoid(
        c(0, -35, -175, 6) + np.array([0, 0, (f - 1) * 25]), np.array([45, 35, 30]) * f,
        rotation(_jit(rng, 0.1), 0, 0), _lumps(rng, 0.05),
    )

    f = size("heart", 0.06)
    organs["heart"] = Ellipsoid(
        c(22, -28, 80, 6) + np.array([(f - 1) * 25, 0, 0]), np.array([62, 46, 50]) * f,
        rotation(_jit(rng, 0.15), 0.35 + _jit(rng, 0.1), 0.55 + _jit(rng, 0.15)), _lumps(rng, 0.04),
    )

    # Aorta: root at the heart, arch, descending left of the spine, bifurcation.
    root = organs["heart"].center + np.array([-15.0, 0.0, 20.0])
    ao = np.array([
        root,
        [5, -22, 130 + dz],
        [10, 0, 158 + dz],
        [24, 34, 142 + dz],
        [25, 36, 60 + dz],
        [18, 28, -20 + dz],
        [12, 24, -100 + dz],
        [6, 22, -150 + dz],
    ], dtype=float)
    ao[1:, :2] *= hab
    ao[1:] += rng.uniform(-4, 4, (7, 3))
    ao_r = np.array([15, 14, 13, 12, 11, 10, 9.5, 9]) * rng.uniform(0.9, 1.1)
    if ("aorta", "enlargement") in present:
        # fusiform infrarenal aneurysm: insert a wide segment between -60 and -130
        zc = float(rng.uniform(-120, -85)) + dz
        ext = float(rng.uniform(2.3, 3.0))
        upper = [p for p in ao if p[2] > zc + 25]
        lower = [p for p in ao if p[2] < zc - 25]
        i = len(upper)
        a, b = upper[-1], lower[0]
        seg = [a + (b - a) * t for t in (0.25, 0.5, 0.75)]
        pts = upper + seg + lower
        radii = np.interp([p[2] for p in pts], ao[::-1, 2], ao_r[::-1])
        radii[i:i + 3] *= [ext * 0.75, ext, ext * 0.75]
        ao, ao_r = np.array(pts), radii
        extras["aneurysm"] = (ao[i + 1].copy(), float(ao_r[i + 1]))
    organs["aorta"] = Tube(ao, ao_r)

    eso_r = float(rng.uniform(8.5, 10.5))
    eso = np.array([
        [0, 22, 215 + dz], [2, 24, 150 + dz], [6, 24, 90 + dz], [14, 18, 45 + dz],
        list(organs["stomach"].parts[0].center + np.array([-22.0, 0.0, 12.0])),
    ], dtype=float)
    eso[:4, :2] *= hab
    eso[1:4] += rng.uniform(-3, 3, (3, 3))
    f = 1.9 if ("esophagus", "enlargement") in present else 1.0
    organs["esophagus"] = Tube(eso, np.array([eso_r, eso_r, eso_r * f, eso_r * f, eso_r]))

    extras["trachea"] = Tube(
        np.array([[0, -2, 230 + dz], [0, 0, 150 + dz], [-35, 10, 120 + dz]]) * [hab, hab, 1], np.array([9, 9, 6])
    )
    extras["bronchus_left"] = Tube(np.array([[0, 0, 150 + dz], [38, 10, 122 + dz]]) * [hab, hab, 1], np.array([7, 5]))
    extras["psoas"] = [
        Tube(np.array([[s * 32, 42, -10 + dz], [s * 48, 30, -120 + dz], [s * 62, 10, -200 + dz]]) * [hab, hab, 1],
             np.array([8, 20, 22]) * rng.uniform(0.9, 1.1))
        for s in (-1.0, 1.0)
    ]
    extras["dz"] = dz
    extras["scales"] = scales

    hu = {k: v for k, v in HU.items()}
    for k in ("liver", "spleen", "pancreas", "kidney", "muscle", "fat", "lung", "blood_contrast", "bowel"):
        hu[k] = HU[k] + _jit(rng, 6 if k != "blood_contrast" else 25)
    # a normal liver is not darker than the spleen, so that steatosis (a liver well below the
    # spleen) is told from the case's own organs and not from a population value
    hu["spleen"] = min(hu["spleen"], hu["liver"] - 4)
    return Anatomy(
        rng_seed=seed,
        prone=prone,
        habitus=hab,
        body_a=body_a,
        body_b=body_b,
        fat=fat,
        muscle=muscle,
        spine_y=spine_y,
        diaphragm=diaphragm,
        organs=organs,
        hu=hu,
        noise_sigma=float(rng.uniform(8, 16)),
        deformation=Deformation.sample(rng),
        extras=extras,
    )


def diaphragm_z(an: Anatomy, x, y) -> np.ndarray:
    """Height of the diaphragm surface over (x, y): two domes, deepest posterolaterally."""
    zr, zl, k, _ = an.diaphragm
    right = zr - ((x + 55.0) ** 2 + (y + 5.0) ** 2 * 0.8) / (2.0 * k)
    left = zl - ((x - 55.0) ** 2 + (y + 5.0) ** 2 * 0.8) / (2.0 * k)
    return np.maximum(right, left)


class Slab:
    """The voxels of one chunk of a grid being painted: HU, labels and anatomy coordinates."""

    def __init__(self, grid: Grid, an: Anatomy, k0: int, k1: int):
        self.grid, self.an, self.k0, self.k1 = grid, an, k0, k1
        nx, ny, _ = grid.size
        x, y, z = grid.points(slice(k0, k1), slice(0, ny), slice(0, nx))
        self.px, self.py, self.pz = x, y, z  # physical (for the table, which does not deform)
        self.x, self.y, self.z = an.deformation.apply(x, y, z)
        shape = x.shape
        self.hu = np.full(shape, HU["air"], dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.pad = an.deformation.max_shift + 2.0

    def box(self, shape_or_box) -> tuple[slice, slice, slice] | None:
        """Slab-local index box of a shape (or physical box), padded for the deformation."""
        lo, hi = shape_or_box.bbox() if isinstance(shape_or_box, Shape) else shape_or_box
        b = self.grid.index_box(np.asarray(lo) - self.pad, np.asarray(hi) + self.pad)
        if b is None:
            return None
        ks = slice(max(b[0].start, self.k0) - self.k0, min(b[0].stop, self.k1) - self.k0)
        if ks.stop <= ks.start:
            return None
        return ks, b[1], b[2]

    def xyz(self, b):
        """Anatomy coordinates inside a box."""
        return self.x[b], self.y[b], self.z[b]


def render_slab(s: Slab, findings: list[Finding], ctx: dict) -> None:
    """Paint the whole anatomy and its findings into one slab."""
    an = s.an
    hu = an.hu
    x, y, z = s.x, s.y, s.z
    g = an.gravity

    # Table under the patient (does not move with the deformation).
    ty = an.body_b.max() + 14.0
    plate = (np.abs(s.px) < 210) & (np.abs(s.py * g - ty) < 3.0)
    s.hu[plate] = hu["table"]

    # Body outline, muscle wall and the cavity inside.
    a = np.interp(z, BODY_Z, an.body_a).astype(np.float32)
    b = np.interp(z, BODY_Z, an.body_b).astype(np.float32)
    r_body = (x / a) ** 2 + (y / b) ** 2
    body = r_body <= 1.0
    s.hu[body] = hu["fat"]
    a1, b1 = a - an.fat, b - an.fat * 0.8
    wall = (x / a1) ** 2 + (y / b1) ** 2 <= 1.0
    s.hu[wall] = hu["muscle"]
    a2, b2 = a1 - an.muscle, b1 - an.muscle
    cavity = (x / a2) ** 2 + (y / b2) ** 2 <= 1.0
    band = wall & ~cavity
    dz = an.extras["dz"]
    ribs = band & (np.mod(z - 0.45 * y, 27.0) < 8.0) & (z > -40 + dz) & (z < 195 + dz) & ~((np.abs(x) < 35) & (y < 0))
    s.hu[ribs] = hu["bone_cortical"] - 150
    sternum = band & (np.abs(x) < 17) & (y < 0) & (z > 40 + dz) & (z < 170 + dz)
    s.hu[sternum] = hu["bone_cancellous"] + 150
    zd = diaphragm_z(an, x, y)
    thorax = cavity & (z > zd)
    abdomen = cavity & ~thorax
    s.hu[thorax] = hu["fat"] + 10  # mediastinal fat; lungs and organs overwrite it
    if abdomen.any():
        t = ctx["bowel"](x[abdomen], y[abdomen], z[abdomen])
        # bowel loops: a wall around fluid content, gas in the widest parts; mesenteric fat between
        v = np.where(t > 0.25, hu["bowel"], hu["fat"] + 10).astype(np.float32)
        v[t > 0.65] = hu["bowel"] - 22.0
        v[t > 1.5] = hu["gas"]
        s.hu[abdomen] = v
    ctx["cavity"] = cavity
    ctx["thorax"] = thorax
    ctx["abdomen"] = abdomen

    _paint_spine(s, ctx)
    for tube in an.extras["psoas"]:
        _fill(s, tube, hu["muscle"], within=abdomen)
    _paint_lungs(s, findings, ctx)
    for name in ("trachea", "bronchus_left"):
        _fill(s, an.extras[name], hu["air"], within=cavity)

    lab = ORGAN_LABELS
    # Mediastinum
    heart = an.organs["heart"]
    _paint_organ(s, "heart", heart, hu["myocardium"], cavity)
    _fill(s, heart.scaled(np.array([0.8, 0.78, 0.8])), hu["blood_contrast"], label_only=lab["heart"])
    eso = an.organs["esophagus"]
    _paint_organ(s, "esophagus", eso, hu["wall"], cavity)
    if "esophagus_dilated" in ctx:
        lumen = Tube(eso.points, np.maximum(eso.radii - 3.0, 1.0))
        _fill_fluid_level(s, lumen, lab["esophagus"], 15.0, 0.35)

    # Abdomen: everything below the diaphragm.
    below = abdomen
    _paint_organ(s, "liver", an.organs["liver"], ctx["liver_hu"], below)
    _paint_organ(s, "gallbladder", an.organs["gallbladder"], hu["gallbladder"], below)
    _paint_organ(s, "spleen", an.organs["spleen"], hu["spleen"], below)
    st = an.organs["stomach"]
    _paint_organ(s, "stomach", st, hu["wall"], below)
    _fill_fluid_level(
        s, Union([p.scaled((p.radii - 5.0) / p.radii) for p in st.parts]), lab["stomach"], 15.0,
        an.extras["stomach_fill"],
    )
    pan = an.organs["pancreas"]
    _fill(s, Tube(pan.points, pan.radii + 5.0), hu["fat"] + 15, within=below, label_only=0)  # peripancreatic fat
    # ... and a fat plane where the liver or spleen reach it: in a patient the duodenum, the lesser
    # sac and fat lie between them (the tail meets the splenic hilum in fat, with its vessels).
    # Without it the pancreas (95 HU) abutted the liver (110) on 30-60 % of its surface with
    # nothing but 15 HU between them, and segmenters split that boundary at random.
    for organ in ("liver", "spleen"):
        _fill(s, Tube(pan.points, pan.radii + 3.0), hu["fat"] + 15, within=below, label_only=lab[organ], relabel=0)
    _paint_organ(s, "pancreas", pan, hu["pancreas"], below)
    for side in ("kidney_left", "kidney_right"):
        _fill(s, an.organs[side].scaled(1.35), hu["fat"], within=below, label_only=0)  # perirenal fat
        _paint_organ(s, side, an.organs[side], hu["kidney"], below)
        sinus = an.extras[f"{side}_sinus"]
        bx = s.box(sinus)
        if bx is not None:
            m = sinus.inside(*s.xyz(bx)) & (s.labels[bx] == lab[side])
            s.hu[bx][m] = hu["fat"] + 20
            s.labels[bx][m] = 0
    bl = an.organs["urinary_bladder"]
    _paint_organ(s, "urinary_bladder", bl, hu["wall"], below)
    _fill(s, bl.scaled((bl.radii - 3.5) / bl.radii), hu["water"], label_only=lab["urinary_bladder"])
    # last: no organ, however enlarged, covers the aorta
    _paint_organ(s, "aorta", an.organs["aorta"], hu["blood_contrast"], cavity)

    for f in findings:
        ctx["painters"][f.finding](s, f, ctx)


def _fill(s: Slab, shape: Shape, value: float, *, within=None, label_only: int | None = None,
          relabel: int | None = None) -> np.ndarray | None:
    b = s.box(shape)
    if b is None:
        return None
    m = shape.inside(*s.xyz(b))
    if within is not None:
        m &= within[b]
    if label_only is not None:
        m &= s.labels[b] == label_only
    s.hu[b][m] = value
    if relabel is not None:
        s.labels[b][m] = relabel
    return m


def _paint_organ(s: Slab, organ: str, shape: Shape, value: float, within: np.ndarray) -> None:
    b = s.box(shape)
    if b is None:
        return
    m = shape.inside(*s.xyz(b)) & within[b]
    s.hu[b][m] = value
    s.labels[b][m] = ORGAN_LABELS[organ]


def _fill_fluid_level(s: Slab, lumen: Shape, label: int, fluid_hu: float, gas_share: float) -> None:
    """Fluid in the dependent part of a lumen, gas above it (a level perpendicular to gravity)."""
    b = s.box(lumen)
    if b is None:
        return
    lo, hi = lumen.bbox()
    g = s.an.gravity
    # level: fraction ``gas_share`` of the lumen's vertical extent from its non-dependent side
    y_top, y_bottom = (lo[1], hi[1]) if g > 0 else (hi[1], lo[1])
    level = y_top + (y_bottom - y_top) * gas_share
    x, y, z = s.xyz(b)
    m = lumen.inside(x, y, z) & (s.labels[b] == label)
    gas = m & ((y - level) * g < 0)
    s.hu[b][m] = fluid_hu
    s.hu[b][gas] = HU["gas"] - 100


def _paint_spine(s: Slab, ctx: dict) -> None:
    an = s.an
    hu = an.hu
    ys = an.spine_y
    lo = np.array([-60.0, ys - 25, -1e4])
    hi = np.array([60.0, ys + 65, 1e4])
    b = s.box((lo, hi))
    if b is None:
        return
    x, y, z = s.xyz(b)
    h = s.hu[b]
    body = (x / 60.0) ** 2 + (y / (an.body_b.mean() - 5)) ** 2 <= 1.0  # stay inside the body
    para = (((np.abs(x) - 30.0) / 22.0) ** 2 + ((y - ys - 40.0) / 17.0) ** 2 <= 1.0) & body
    h[para] = hu["muscle"]
    r2 = x**2 + (y - ys) ** 2
    vb = r2 <= 18.0**2
    h[vb] = hu["bone_cortical"]
    h[r2 <= 15.0**2] = hu["bone_cancellous"]
    disc = vb & (np.mod(z - an.extras["dz"], 32.0) < 6.0)
    h[disc] = hu["disc"]
    rc2 = x**2 + (y - ys - 30.0) ** 2
    h[(rc2 <= 14.0**2) & (rc2 > 7.5**2)] = hu["bone_cortical"] - 100
    h[rc2 <= 7.5**2] = hu["csf"]
    spinous = (np.abs(x) < 5.0) & (y > ys + 40.0) & (y < ys + 58.0) & body
    h[spinous] = hu["bone_cortical"] - 100


def _paint_lungs(s: Slab, findings: list[Finding], ctx: dict) -> None:
    an = s.an
    hu = an.hu
    thorax = ctx["thorax"]
    if not thorax.any():
        return
    x, y, z = s.x, s.y, s.z
    ys = an.spine_y
    dz = an.extras["dz"]
    apex = (x / 150.0) ** 2 + ((y - 5) / 110.0) ** 2 + (np.maximum(z - 70.0 - dz, 0) / 150.0) ** 2 <= 1.0
    # mediastinum: narrow behind the sternum and at the apex, widest at the hila
    half = 16.0 + 10.0 * np.clip(1.0 - np.abs(z - 95.0 - dz) / 90.0, 0.0, 1.0)
    medi = ((x - 6.0) / half) ** 2 + ((y - ys + 50.0) / 85.0) ** 2 <= 1.0
    spine_zone = (x / 32.0) ** 2 + ((y - ys - 12.0) / 40.0) ** 2 <= 1.0  # paravertebral tissue
    space = thorax & apex & ~medi & ~spine_zone
    for organ, side in (("lung_right", x < 6.0), ("lung_left", x >= 6.0)):
        m = space & side
        if not m.any():
            continue
        s.labels[m] = ORGAN_LABELS[organ]
        xs, ysel, zs = x[m], y[m], z[m]
        v = np.full(xs.shape, hu["lung"], dtype=np.float32)
        n1 = ctx["vessels1"](xs, ysel, zs)
        n2 = ctx["vessels2"](xs, ysel, zs)
        vessel = (np.abs(n1) < 0.13) & (np.abs(n2) < 0.13)
        v[vessel] = 30.0
        emph = next((f for f in findings if f.organ == organ and f.finding == "emphysema"), None)
        if emph is not None:
            t = ctx["emphysema"](xs, ysel, zs) + (zs - (110.0 + dz)) / 80.0  # upper-zone predominant
            low = t > emph.details["threshold"]
            v[low] = -965.0
            emph.voxels += int(low.sum())
        s.hu[m] = v
        eff = next((f for f in findings if f.organ == organ and f.finding == "pleural_effusion"), None)
        if eff is not None:
            _paint_effusion(s, m, organ, eff)


def _paint_effusion(s: Slab, lung: np.ndarray, organ: str, f: Finding) -> None:
    """Dependent pleural fluid: the deepest ``depth`` mm of the pleural space along gravity."""
    an = s.an
    x, y, z = s.x[lung], s.y[lung], s.z[lung]
    g = an.gravity
    b = np.interp(z, BODY_Z, an.body_b) - an.fat * 0.8 - an.muscle
    a = np.interp(z, BODY_Z, an.body_a) - an.fat - an.muscle
    wall_y = b * np.sqrt(np.clip(1.0 - (x / a) ** 2, 0.0, 1.0))  # pleural wall along gravity
    zd = diaphragm_z(an, x, y)
    depth = f.details["depth"] * np.clip(1.0 - (z - zd) / f.details["height"], 0.0, 1.0) ** 0.5
    fluid = (wall_y - y * g) < depth
    idx = np.flatnonzero(lung.ravel())[fluid]
    s.hu.reshape(-1)[idx] = f.hu
    s.labels.reshape(-1)[idx] = 0
    f.voxels += int(fluid.sum())
