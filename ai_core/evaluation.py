"""Metrics of segmentation and zero-shot findings, and the evaluation of a pipeline on fresh phantoms.

    dice(pred, truth)                          overlap of two masks
    roc_auc(labels, scores)                    area under the ROC curve (sklearn), NaN with one class
    sensitivity_specificity(labels, scores, t) at a decision threshold (score >= t is "present")
    youden_threshold(scores, labels)           the threshold that maximises sensitivity + specificity
    evaluate_phantoms(pipeline, n, seed)       Dice per organ, AUC/sensitivity/specificity per finding

Training's calibration and ``dicom-node evaluate`` share these, so a threshold is chosen and
checked by the same arithmetic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


# -- metrics -----------------------------------------------------------------------------------


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two boolean masks (1.0 when both are empty)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} and {truth.shape}")
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def dice_per_label(pred: np.ndarray, truth: np.ndarray, pairs: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """Dice per organ between two label maps; ``pairs`` maps organ -> (value in pred, value in truth).

    One pass over the voxels (a joint histogram), whatever the number of organs.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} and {truth.shape}")
    joint = np.bincount(pred.astype(np.int64).ravel() * 256 + truth.astype(np.int64).ravel(),
                        minlength=256 * 256).reshape(256, 256)
    pred_n, truth_n = joint.sum(1), joint.sum(0)
    out = {}
    for organ, (p, t) in pairs.items():
        total = (int(pred_n[p]) if p else 0) + int(truth_n[t])
        inter = int(joint[p, t]) if p else 0
        out[organ] = 1.0 if total == 0 else 2.0 * inter / total
    return out


def _binary(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if np.any((y != 0) & (y != 1)):
        raise ValueError("labels must be 0/1 (absent/present)")
    return y, s


def roc_auc(labels: Sequence, scores: Sequence) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y, s = _binary(labels, scores)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, s))


def roc_points(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of the ROC curve; empty with one class."""
    from sklearn.metrics import roc_curve

    y, s = _binary(labels, scores)
    if y.size == 0 or y.min() == y.max():
        return np.empty(0), np.empty(0)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def sensitivity_specificity(labels: Sequence, scores: Sequence, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of the decision ``score >= threshold``; NaN for a class with no cases."""
    y, s = _binary(labels, scores)
    pred = s >= threshold
    pos, neg = int(y.sum()), int((y == 0).sum())
    sens = float((pred & (y == 1)).sum() / pos) if pos else float("nan")
    spec = float((~pred & (y == 0)).sum() / neg) if neg else float("nan")
    return sens, spec


def youden_threshold(scores: Sequence, labels: Sequence) -> float:
    """Threshold maximising sensitivity + specificity - 1 (midpoints between scores; 0.5 with one class)."""
    y, s = _binary(labels, scores)
    if y.size == 0 or y.min() == y.max():
        return 0.5
    order = np.unique(s)
    candidates = np.concatenate([[order[0] - 1e-6], (order[:-1] + order[1:]) / 2, [order[-1] + 1e-6]])
    pred = s[None, :] >= candidates[:, None]
    j = (pred & (y == 1)).sum(1) / y.sum() + (~pred & (y == 0)).sum(1) / (y == 0).sum() - 1
    return float(min(max(candidates[int(np.argmax(j))], 0.0), 1.0))


# -- evaluation on phantoms ----------------------------------------------------------------------


@dataclass
class FindingScores:
    """Scores of one (organ, finding) over cases, and how often it could not be evaluated."""

    organ: str
    finding: str
    threshold: float | None = None
    scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    not_evaluated: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """"organ/finding", as thresholds are keyed."""
        return f"{self.organ}/{self.finding}"

    @property
    def auc(self) -> float:
        """ROC AUC over the evaluated cases (NaN unless both classes occur)."""
        return roc_auc(self.labels, self.scores)

    def sensitivity_specificity(self) -> tuple[float, float]:
        """At the calibrated threshold (NaN without one)."""
        if self.threshold is None or not self.labels:
            return float("nan"), float("nan")
        return sensitivity_specificity(self.labels, self.scores, self.threshold)


@dataclass
class EvaluationReport:
    """Dice per organ and scores per finding over a set of cases."""

    cases: int = 0
    dice: dict[str, list[float]] = field(default_factory=dict)  # organ -> Dice per case with the organ
    findings: dict[str, FindingScores] = field(default_factory=dict)  # "organ/finding" -> scores
    model: str = ""
    segmenter: str = ""
    refused: int = 0
    # One entry per case, in order: its Dice per organ and, per scored finding, the truth and the
    # probability, so a weak finding's errors can be looked at case by case (evaluation.json).
    per_case: list[dict] = field(default_factory=list)

    def mean_dice(self) -> dict[str, float]:
        """Mean Dice per organ."""
        return {o: float(np.mean(v)) for o, v in self.dice.items() if v}

    def summary(self) -> dict[str, float]:
        """dice_min (lowest mean organ Dice), macro_auc and min_auc (over findings with both classes)."""
        means = list(self.mean_dice().values())
        aucs = [a for a in (f.auc for f in self.findings.values()) if not math.isnan(a)]
        return {
            "dice_min": min(means) if means else float("nan"),
            "macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
            "min_auc": min(aucs) if aucs else float("nan"),
        }

    def to_json(self) -> dict:
        """A JSON-serialisable form (for evaluation.json)."""
        def num(x: float) -> float | None:
            return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 4)

        findings = {}
        for key, f in sorted(self.findings.items()):
            sens, spec = f.sensitivity_specificity()
            findings[key] = {"auc": num(f.auc), "sensitivity": num(sens), "specificity": num(spec),
                             "threshold": num(f.threshold), "evaluated": len(f.labels),
                             "positives": int(sum(f.labels)), "not_evaluated": f.not_evaluated,
                             "not_evaluated_reasons": dict(f.reasons)}
        return {
            "cases": self.cases, "refused": self.refused, "model": self.model, "segmenter": self.segmenter,
            "dice": {o: {"mean": num(float(np.mean(v))), "min": num(float(np.min(v))), "cases": len(v)}
                     for o, v in sorted(self.dice.items()) if v},
            "findings": findings,
            "summary": {k: num(v) for k, v in self.summary().items()},
            "per_case": self.per_case,
        }


def phantom_volume(case):
    """A phantom case as the pipeline's in-memory volume (``ai_core.volume.CTVolume``)."""
    from ai_core.volume import CTVolume

    return CTVolume(image=case.image, files=[], study_uid=case.study_uid, series_uid=case.series_uid,
                    frame_of_reference_uid=case.frame_of_reference_uid or None)


def score_case(report: EvaluationReport, case, result) -> None:
    """Add one analysed phantom case (ground truth ``case``, pipeline ``result``) to ``report``."""
    import SimpleITK as sitk

    from ai_core.phantom.findings import SUPPORTED_PAIRS

    report.cases += 1
    if result.refused:
        report.refused += 1
    # "case": the position in the set; for evaluate_phantoms, generate_case(seed, balanced_index=case)
    record: dict = {"case": report.cases - 1, "refused": bool(result.refused), "findings": {}}
    report.per_case.append(record)
    in_fov = set(case.organs_in_fov)
    if result.labels is not None:
        truth = sitk.GetArrayViewFromImage(case.labels)
        # An organ's value in the result's labels (0: not segmented, so its Dice is 0).
        segmented = {o.organ: o.label for o in result.organs}
        pairs = {o: (segmented.get(o, 0), v) for o, v in case.organ_labels.items() if o in in_fov}
        dice = dice_per_label(result.labels, truth, pairs)
    else:
        dice = {organ: 0.0 for organ in in_fov}
    for organ, d in dice.items():
        report.dice.setdefault(organ, []).append(d)
    record["dice"] = {o: round(float(d), 4) for o, d in sorted(dice.items())}
    truth_findings = case.truth()
    supported = set(SUPPORTED_PAIRS)
    for f in result.findings:
        if (f.organ, f.finding) not in supported or f.organ not in in_fov:
            continue
        entry = report.findings.setdefault(f"{f.organ}/{f.finding}", FindingScores(f.organ, f.finding))
        if f.threshold is not None:
            entry.threshold = f.threshold
        present = bool(truth_findings[f.organ][f.finding])
        if f.decision == "not evaluated" or f.probability is None:
            entry.not_evaluated += 1
            reason = f.reason or "not evaluated"
            entry.reasons[reason] = entry.reasons.get(reason, 0) + 1
            record["findings"][entry.key] = {"present": present, "probability": None, "not_evaluated": reason}
            continue
        entry.scores.append(float(f.probability))
        entry.labels.append(int(present))
        record["findings"][entry.key] = {"present": present, "probability": round(entry.scores[-1], 4)}


def evaluate_phantoms(
    pipeline,
    n: int,
    seed: int,
    *,
    spacing: Sequence[float] | None = None,
    progress: bool = False,
    cases: Iterable | None = None,
) -> EvaluationReport:
    """Run ``pipeline`` on the first ``n`` cases of the balanced phantom set ``seed`` and score it.

    Cases are generated in memory at ``spacing`` (default: the VLP model's working spacing); the
    segmenter runs on the phantom image, never on its ground-truth labels.
    """
    from tqdm import tqdm

    from ai_core.phantom.generator import generate_case

    spacing = tuple(float(v) for v in (spacing or pipeline.spec.preprocess.spacing_mm))
    report = EvaluationReport(model=pipeline.model_info.label, segmenter=pipeline.segmenter_info.label)
    source = cases if cases is not None else (generate_case(seed, balanced_index=i, spacing=spacing) for i in range(n))
    for case in tqdm(source, total=n, desc="phantoms", unit="case", disable=not progress):
        result = pipeline.analyze_volume(phantom_volume(case))
        score_case(report, case, result)
    return report


def plot_roc(report: EvaluationReport, path: Path) -> Path:
    """ROC curves, one panel per organ with one curve per finding, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organs: dict[str, list[FindingScores]] = {}
    for f in report.findings.values():
        organs.setdefault(f.organ, []).append(f)
    names = sorted(organs)
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, organ in zip(axes.ravel(), names):
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, ls="--")
        for f in sorted(organs[organ], key=lambda f: f.finding):
            fpr, tpr = roc_points(f.labels, f.scores)
            if fpr.size:
                ax.plot(fpr, tpr, lw=1.5, label=f"{f.finding} {f.auc:.2f}")
            else:
                ax.plot([], [], lw=0, label=f"{f.finding}: n/a")
        ax.set_title(organ, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="lower right", title="AUC", title_fontsize=7)
    fig.suptitle(f"ROC on {report.cases} phantoms - {report.model}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
