"""The AI core: CT series in, per-organ findings and DICOM result objects out.

Layering: ``ai_core`` imports neither ``dicom_node`` nor ``storage``; it takes files or arrays
and returns result objects.
"""

__version__ = "0.1.0"
