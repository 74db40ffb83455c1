"""Synthetic CT: a DICOM series writer and a phantom generator with known organs and findings."""

from ai_core.phantom.series import TRANSFER_SYNTAXES, body_volume, make_ct_series, write_series

__all__ = ["TRANSFER_SYNTAXES", "body_volume", "make_ct_series", "write_series"]
