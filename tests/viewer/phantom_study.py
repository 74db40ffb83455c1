"""A small axial CT phantom with exact organ masks and the analysis result a model could give it.

The viewer tests need ground truth that does not come from the code under test: the masks here
are the ellipsoids the CT was drawn from, so "the arrow is on the organ" is checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ai_core.phantom import write_series
from ai_core.result import AnalysisResult, FindingResult, ModelInfo, OrganResult

# organ key -> (label, centre LPS mm, half-axes mm, HU). Patient left is +x (LPS).
ORGANS = {
    "liver": (1, (-60.0, -10.0, 0.0), (55.0, 45.0, 35.0), 70),
    "spleen": (2, (80.0, 20.0, 5.0), (25.0, 30.0, 25.0), 55),
    "kidney_left": (3, (45.0, 55.0, -15.0), (18.0, 25.0, 25.0), 20),
    "kidney_right": (4, (-45.0, 55.0, -15.0), (18.0, 25.0, 25.0), 20),
}


@dataclass
class PhantomStudy:
    """The CT files, their label map (k, j, i) and the geometry to map LPS mm to voxels."""

    files: list[Path]
    labels: np.ndarray
    origin: np.ndarray  # LPS of voxel (i=0, j=0, k=0)
    spacing: np.ndarray  # (x, y, z) mm
    study_uid: str
    series_uid: str
    sop_uids: list[str]  # per slice k
    instance_numbers: list[int]  # per slice k, as a viewer's overlay shows them

    def slice_of(self, sop_uid: str) -> int | None:
        """Slice index k of a CT instance of the series, or None."""
        return self.sop_uids.index(sop_uid) if sop_uid in self.sop_uids else None

    def voxel(self, lps) -> tuple[int, int, int]:
        """(k, j, i) index of the voxel containing an LPS point (axial, identity direction)."""
        i, j, k = np.rint((np.asarray(lps, float) - self.origin) / self.spacing).astype(int)
        return int(k), int(j), int(i)

    def label_at(self, lps) -> int:
        """Label value at an LPS point; 0 outside the volume."""
        k, j, i = self.voxel(lps)
        if not all(0 <= v < n for v, n in zip((k, j, i), self.labels.shape)):
            return 0
        return int(self.labels[k, j, i])


def make_phantom_study(out_dir: Path, n_slices: int = 20, size: int = 128,
                       spacing: tuple[float, float, float] = (2.8, 2.8, 5.0), seed: int = 11) -> PhantomStudy:
    """Write the phantom CT series (ascending slices, identity orientation) and its label map;
    the UIDs derive from ``seed``."""
    import pydicom

    sx, sy, sz = spacing
    x = (np.arange(size) - (size - 1) / 2) * sx
    y = (np.arange(size) - (size - 1) / 2) * sy
    z = (np.arange(n_slices) - (n_slices - 1) / 2) * sz
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    hu = np.full(Z.shape, -1000, np.int16)
    hu[(X / 150) ** 2 + (Y / 110) ** 2 <= 1] = 40
    labels = np.zeros(Z.shape, np.uint8)
    for label, c, r, value in ORGANS.values():
        m = ((X - c[0]) / r[0]) ** 2 + ((Y - c[1]) / r[1]) ** 2 + ((Z - c[2]) / r[2]) ** 2 <= 1
        hu[m] = value
        labels[m] = label
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(spacing)
    img.SetOrigin((float(x[0]), float(y[0]), float(z[0])))
    files = write_series(img, Path(out_dir), seed=seed, series_description="CT phantom",
                         patient_id=f"VIEWER-{seed % 10**8}")  # OHIF lists a patient's other studies
    # write_series numbers instances along k; keep the files in slice (k) order.
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    order = np.argsort([float(h.ImagePositionPatient[2]) for h in headers])
    files, headers = [files[i] for i in order], [headers[i] for i in order]
    return PhantomStudy(files, labels, np.array([x[0], y[0], z[0]]), np.array(spacing),
                        headers[0].StudyInstanceUID, headers[0].SeriesInstanceUID,
                        [h.SOPInstanceUID for h in headers], [int(h.InstanceNumber) for h in headers])


def phantom_result(study: PhantomStudy) -> AnalysisResult:
    """An analysis of the phantom: two present findings (one localised), one absent, one organ
    not evaluated."""
    organs = [OrganResult(key, label, "evaluated", volume_ml=None)
              for key, (label, *_rest) in ORGANS.items()]
    organs.append(OrganResult("pancreas", 0, "not evaluated", reason="not segmented in this series"))
    liver_c = np.array(ORGANS["liver"][1])
    findings = [
        # localised: 15 mm right of, 10 mm anterior to and 3 mm above the liver centre
        FindingResult("liver", "lesion", "present", probability=0.87, threshold=0.5,
                      point_lps=tuple(float(v) for v in liver_c + (-15.0, -10.0, 3.0))),
        FindingResult("kidney_left", "cyst", "present", probability=0.71, threshold=0.5),
        FindingResult("spleen", "enlargement", "absent", probability=0.12, threshold=0.5),
        FindingResult("pancreas", "lesion", "not evaluated", reason="organ not segmented"),
    ]
    return AnalysisResult(
        study_instance_uid=study.study_uid, series_instance_uid=study.series_uid,
        model=ModelInfo("viewer-test-vlp", "0.1", demo=True),
        segmenter=ModelInfo("viewer-test-segmenter", "0.1", demo=True),
        organs=organs, findings=findings, source_files=list(study.files), labels=study.labels)
