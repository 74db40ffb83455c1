"""Implicit 3D shapes in patient coordinates (LPS, mm) that the phantom paints into a voxel grid.

Every shape answers ``bbox()`` (its physical bounding box) and ``inside(x, y, z)`` for arrays of
(deformed) coordinates, so painting costs only the voxels of its box and works on any grid
orientation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Box = tuple[np.ndarray, np.ndarray]  # (min corner, max corner), mm


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class Shape:
    """An implicit solid."""

    def bbox(self) -> Box:
        """Physical bounding box (min, max) in mm."""
        raise NotImplementedError

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the points inside the solid."""
        raise NotImplementedError


_BUMP_MAX = np.array([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 1.0, 2.0])


@dataclass
class Ellipsoid(Shape):
    """A rotated ellipsoid with smooth low-order bumps ("lumps") on its surface."""

    center: np.ndarray
    radii: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    lumps: np.ndarray = field(default_factory=lambda: np.zeros(8))

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=float)
        self.radii = np.asarray(self.radii, dtype=float)
        self.lumps = np.asarray(self.lumps, dtype=float)

    @property
    def bump_bound(self) -> float:
        """Upper bound of |bump term| (the maxima of the basis functions are 1, 1/2 and 2)."""
        return float(np.abs(self.lumps) @ _BUMP_MAX)

    def scaled(self, factor: float | np.ndarray) -> Ellipsoid:
        """The same ellipsoid with radii multiplied by ``factor``."""
        return Ellipsoid(self.center, self.radii * factor, self.rot, self.lumps)

    def bbox(self) -> Box:
        reach = 1.0 + self.bump_bound
        half = np.abs(self.rot) @ (self.radii * reach)
        return self.center - half, self.center + half

    def local(self, x, y, z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coordinates in the ellipsoid's unit frame (1.0 = on the unperturbed surface)."""
        # Python floats keep float32 arrays float32 (numpy scalars would promote to float64).
        c = [float(v) for v in self.center]
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        r = (self.rot / self.radii[None, :]).tolist()
        u = r[0][0] * dx + r[1][0] * dy + r[2][0] * dz
        v = r[0][1] * dx + r[1][1] * dy + r[2][1] * dz
        w = r[0][2] * dx + r[1][2] * dy + r[2][2] * dz
        return u, v, w

    def level(self, x, y, z) -> np.ndarray:
        """Normalised radius divided by the bumpy surface radius: <= 1 inside."""
        return self._level(*self.local(x, y, z))

    def _level(self, u, v, w) -> np.ndarray:
        rr = np.sqrt(u * u + v * v + w * w) + 1e-6
        if not self.lumps.any():
            return rr
        nu, nv, nw = u / rr, v / rr, w / rr
        c = self.lumps.tolist()
        surf = 1.0 + (
            c[0] * nu + c[1] * nv + c[2] * nw + c[3] * nu * nv + c[4] * nv * nw + c[5] * nu * nw
            + c[6] * (nu * nu - nv * nv) + c[7] * (3 * nw * nw - 1)
        )
        return rr / surf

    def inside(self, x, y, z) -> np.ndarray:
        u, v, w = self.local(x, y, z)
        r2 = u * u + v * v + w * w
        reach = self.bump_bound
        if reach == 0.0:
            return r2 <= 1.0
        # only the shell where the bumps can decide needs the full level
        out = r2 <= max(1.0 - reach, 0.0) ** 2
        band = ~out & (r2 <= (1.0 + reach) ** 2)
        out[band] = self._level(u[band], v[band], w[band]) <= 1.0
        return out


@dataclass
class Tube(Shape):
    """A tube along a polyline with a radius interpolated along it."""

    points: np.ndarray  # (n, 3)
    radii: np.ndarray  # (n,)

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=float)
        self.radii = np.asarray(self.radii, dtype=float)

    def bbox(self) -> Box:
        r = self.radii.max()
        return self.points.min(0) - r, self.points.max(0) + r

    def inside(self, x, y, z) -> np.ndarray:
        out = np.zeros(np.shape(x), dtype=bool)
        for a, b, ra, rb in zip(self.points[:-1].tolist(), self.points[1:].tolist(), self.radii[:-1].tolist(),
                                self.radii[1:].tolist()):
            d = [b[0] - a[0], b[1] - a[1], b[2] - a[2]]
            length2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2] or 1e-9
            t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / length2
            t = np.clip(t, 0.0, 1.0)
            px, py, pz = x - (a[0] + t * d[0]), y - (a[1] + t * d[1]), z - (a[2] + t * d[2])
            r = ra + t * (rb - ra)
            out |= px * px + py * py + pz * pz <= r * r
        return out

    def point_at(self, s: float) -> np.ndarray:
        """The centreline point at fraction ``s`` (0..1) of the polyline's length."""
        seg = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        target = s * seg.sum()
        acc = np.concatenate([[0.0], np.cumsum(seg)])
        i = int(np.clip(np.searchsorted(acc, target) - 1, 0, len(seg) - 1))
        t = (target - acc[i]) / (seg[i] or 1.0)
        return self.points[i] + t * (self.points[i + 1] - self.points[i])

    def radius_at(self, s: float) -> float:
        """The radius at fraction ``s`` of the polyline's length."""
        seg = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        target = s * seg.sum()
        acc = np.concatenate([[0.0], np.cumsum(seg)])
        return float(np.interp(target, acc, self.radii))


@dataclass
class Union(Shape):
    """Points inside any of the parts."""

    parts: list[Shape]

    def bbox(self) -> Box:
        boxes = [p.bbox() for p in self.parts]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)

    def inside(self, x, y, z) -> np.ndarray:
        out = self.parts[0].inside(x, y, z)
        for p in self.parts[1:]:
            out |= p.inside(x, y, z)
        return out


class SmoothNoise:
    """A smooth random field: normal values on a coarse lattice, trilinearly interpolated."""

    def __init__(self, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, step_mm: float):
        self.lo = np.asarray(lo, dtype=float)
        self.step = float(step_mm)
        n = np.ceil((np.asarray(hi) - self.lo) / self.step).astype(int) + 2
        self.values = rng.standard_normal(tuple(n)).astype(np.float32)

    def __call__(self, x, y, z) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        coords = np.stack(
            [(np.asarray(c, dtype=np.float32) - lo) / self.step for c, lo in zip((x, y, z), self.lo)]
        )
        return map_coordinates(self.values, coords.reshape(3, -1), order=1, mode="nearest").reshape(
            np.shape(x)
        )
