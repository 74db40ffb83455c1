"""Synthetic CT: a DICOM series writer and a phantom generator with known organs and findings.

    series.py     write_series / make_ct_series: a SimpleITK volume as a CT Image Storage series
    findings.py   FINDINGS (organ -> supported findings), ORGAN_LABELS, balanced selection
    anatomy.py    the randomised body and its rendering on any grid
    placement.py  where each finding goes and how it is painted
    reports.py    per-organ report sentences, prompt pairs, abnormality dictionary
    generator.py  generate_case / write_case / generate_balanced
"""

from ai_core.phantom.findings import FINDINGS, ORGAN_LABELS, PHANTOM_ORGANS, SUPPORTED_PAIRS, Finding
from ai_core.phantom.series import TRANSFER_SYNTAXES, body_volume, make_ct_series, write_series

__all__ = [
    "FINDINGS",
    "ORGAN_LABELS",
    "PHANTOM_ORGANS",
    "SUPPORTED_PAIRS",
    "TRANSFER_SYNTAXES",
    "Finding",
    "body_volume",
    "generate_case",
    "generate_balanced",
    "make_ct_series",
    "write_case",
    "write_series",
]


def __getattr__(name: str):
    # The generator pulls in scipy; import it only when asked for.
    if name in ("generate_case", "generate_balanced", "write_case", "PhantomCase"):
        from ai_core.phantom import generator

        return getattr(generator, name)
    raise AttributeError(name)
