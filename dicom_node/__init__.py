"""The DICOM node: receive, store, complete, route, run jobs and export."""

__version__ = "0.1.0"
