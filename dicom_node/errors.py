"""Exceptions of the node.

    NodeError
    ├── UserError          the user can fix it (bad config, bad argument); one message, no traceback
    │   └── ConfigError    config.yaml or an environment override is invalid
    ├── StoreError         an instance could not be stored; carries the DICOM status to answer
    └── DeliveryError      a destination refused or could not be reached
"""


class NodeError(Exception):
    """Base of the node's own errors."""


class UserError(NodeError):
    """An error the user can fix; printed as one message without a traceback."""


class ConfigError(UserError):
    """The configuration is invalid: the message names the key, the value and what is allowed."""


class StoreError(NodeError):
    """An instance could not be stored; ``status`` is the DICOM status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class DeliveryError(NodeError):
    """Sending to a destination failed."""
