"""The result of analysing one CT series: the contract between the AI core, the encoders and the node."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

Decision = Literal["present", "absent", "not evaluated"]
OrganStatus = Literal["evaluated", "not evaluated"]


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a model, cited by every output it produces."""

    name: str
    version: str
    spec_hash: str = ""
    demo: bool = False  # demo models are "not for clinical use" in every output

    @property
    def label(self) -> str:
        """Human-readable name and version."""
        return f"{self.name} {self.version}"


@dataclass(frozen=True)
class OrganResult:
    """One organ of the catalogue as seen in this series."""

    organ: str  # catalogue key, e.g. "kidney_left"
    label: int  # value of this organ in ``AnalysisResult.labels`` (0 when not segmented)
    status: OrganStatus
    reason: str | None = None  # why it was not evaluated
    volume_ml: float | None = None


@dataclass(frozen=True)
class FindingResult:
    """One (organ, finding) decision."""

    organ: str  # catalogue key
    finding: str  # finding key, e.g. "cyst"
    decision: Decision
    probability: float | None = None
    threshold: float | None = None
    reason: str | None = None  # set when decision is "not evaluated"
    # A point in patient coordinates (LPS, mm) where a viewer should point for this finding:
    # the finding itself when the model localises it, else the organ's centre.
    point_lps: tuple[float, float, float] | None = None


@dataclass
class AnalysisResult:
    """Everything the encoders and the node need about one analysed series."""

    study_instance_uid: str
    series_instance_uid: str
    model: ModelInfo
    segmenter: ModelInfo
    organs: list[OrganResult] = field(default_factory=list)
    findings: list[FindingResult] = field(default_factory=list)
    # Source files sorted along the slice normal; ``labels[i]`` is the label map of
    # ``source_files[i]`` (shape: slices, rows, columns; uint8; 0 = background).
    source_files: list[Path] = field(default_factory=list)
    labels: np.ndarray | None = None
    # Headers of ``source_files`` without pixel data, when the reader kept them (not serialised).
    source_headers: list[Dataset] | None = field(default=None, repr=False, compare=False)
    refused: str | None = None  # the whole series could not be analysed safely: why
    timings: dict[str, float] = field(default_factory=dict)

    def organ(self, key: str) -> OrganResult | None:
        """The organ result for a catalogue key, if any."""
        return next((o for o in self.organs if o.organ == key), None)

    def summary(self) -> dict:
        """A JSON-serialisable summary (no pixel data), as written to ``analysis.json``."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "model": asdict(self.model),
            "segmenter": asdict(self.segmenter),
            "refused": self.refused,
            "organs": [asdict(o) for o in self.organs],
            "findings": [asdict(f) for f in self.findings],
            "timings": self.timings,
            "source_files": [str(p) for p in self.source_files],
        }

    def write_json(self, path: Path) -> None:
        """Write the summary as pretty JSON."""
        Path(path).write_text(json.dumps(self.summary(), indent=2))
