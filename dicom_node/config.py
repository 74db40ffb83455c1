"""The node's configuration: one YAML file validated into pydantic models at start-up.

Every key can be overridden from the environment with the prefix ``CTVLP__`` and ``__`` between
nested keys, e.g. ``CTVLP__LISTENERS__0__PORT=11113`` or ``CTVLP__DESTINATIONS__PACS__HOST=pacs``.
Values are parsed as YAML scalars (``true``, ``10``, ``[a, b]``). Secrets never live in the file:
``database.url`` may name an environment variable with ``database.url_env``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.errors import ConfigError

ENV_PREFIX = "CTVLP__"
AE_TITLE_RE = re.compile(r"^[ -~]{1,16}$")
ResultKind = Literal["seg", "sr", "sc"]


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae(value: str) -> str:
    value = value.strip()
    if not AE_TITLE_RE.match(value) or "\\" in value:
        raise ValueError("an AE title is 1 to 16 printable ASCII characters without backslash")
    return value


class Listener(Strict):
    """One listening AE: a port and AE title, with its own completion delay."""

    ae_title: str = "CTVLP"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    stable_after: float = Field(10.0, gt=0, description="seconds without a new instance before a series is complete")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)


class AllowedPeer(Strict):
    """A calling AE title (glob) and the addresses (IP or CIDR) it may connect from."""

    ae_title: str = "*"
    hosts: list[str] = ["127.0.0.1", "::1"]

    @field_validator("hosts")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for h in v:
            ipaddress.ip_network(h, strict=False)  # raises ValueError naming the bad address
        return v


class Network(Strict):
    """Association parameters shared by all listeners."""

    max_pdu: int = Field(131072, ge=0, description="0 means unlimited")
    max_associations: int = Field(10, ge=1)
    acse_timeout: float = Field(30, gt=0)
    dimse_timeout: float = Field(60, gt=0)
    network_timeout: float = Field(60, gt=0)
    # "all" accepts every storage SOP class pynetdicom knows; or a list of SOP Class UIDs.
    storage_sop_classes: Literal["all"] | list[str] = "all"
    allowed_peers: list[AllowedPeer] = [AllowedPeer()]
    # Reject associations from peers that are not in allowed_peers (the default).
    require_known_peers: bool = True
    # Receiver processes (0: the node process receives). pynetdicom receives on one core per
    # process; with N >= 1 the node accepts each connection and hands it to one of N processes,
    # round robin (max_associations is then shared among them).
    receive_processes: int = Field(0, ge=0, le=64)


class Destination(Strict):
    """A DICOM node the node sends to (C-STORE SCU)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    # Which result objects this destination receives from the analyze action.
    results: list[ResultKind] = ["seg", "sr", "sc"]
    max_pdu: int = Field(131072, ge=0)
    timeout: float = Field(30, gt=0)
    # Concurrent associations one delivery may open (a series is shared among them, at least
    # dicom_node.send.MIN_PER_ASSOCIATION instances each). A PACS that refuses the extra ones
    # still gets everything over the associations it accepts.
    associations: int = Field(1, ge=1, le=16)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)


class Rule(Strict):
    """A routing rule: series-level matches and the actions to take."""

    name: str
    match: dict[str, Any] = {}
    forward: list[str] = []
    analyze: str | None = None  # pipeline name
    results_to: list[str] = []  # destinations for the analyze action's results
    discard: bool = False
    stop: bool = True

    @model_validator(mode="after")
    def _has_action(self) -> "Rule":
        if not (self.forward or self.analyze or self.discard):
            raise ValueError(f"rule {self.name!r} has no action: give forward, analyze or discard")
        return self


class DefaultAction(Strict):
    """What happens to a series no rule matched."""

    forward: list[str] = []
    discard: bool = True


class Pipeline(Strict):
    """An AI pipeline: segmentation backend, VLP model and device."""

    # ai_core.segmentation.BACKENDS (a test keeps the two equal; importing it here would load torch)
    segmentation: Literal["builtin", "monai_bundle", "totalsegmentator"] = "builtin"
    segmentation_path: str | None = None  # bundle directory for monai_bundle
    segmentation_fast: bool = True  # TotalSegmentator fast mode
    model: str = "demo"  # "demo" or a checkpoint path
    device: Literal["cpu", "cuda", "auto"] = "auto"  # auto = cuda when present
    extra_findings: dict[str, dict[str, list[str]]] = {}  # organ -> finding -> [negative, positive]

    @model_validator(mode="after")
    def _bundle_path(self) -> "Pipeline":
        # found at start, not when the first series has waited for its analysis
        if self.segmentation == "monai_bundle" and not self.segmentation_path:
            raise ValueError("segmentation monai_bundle needs segmentation_path: the MONAI bundle's directory")
        return self


class Workers(Strict):
    """Job workers: separate processes that claim jobs from the database."""

    count: int = Field(1, ge=0, description="worker processes started by `serve`; 0 when they run as their own service")
    # workers that only deliver (forward jobs), so results and forwards never wait behind an analysis
    delivery_count: int = Field(1, ge=0, description="delivery-only worker processes started by `serve`")
    max_attempts: int = Field(5, ge=1)
    backoff_base: float = Field(2.0, gt=0, description="seconds before the first retry; doubles each attempt")
    backoff_max: float = Field(300.0, gt=0)
    lease: float = Field(60.0, gt=0, description="seconds after which a silent running job is taken over")
    poll_interval: float = Field(0.5, gt=0)
    # CPU threads one analysis may use (torch); on a small CPU host leave a core for receiving.
    # 0: torch's default (all cores).
    analysis_threads: int = Field(1, ge=0)
    # Scheduling niceness of workers that may analyse: when the CPU is short, receiving (which the
    # sender waits on for every acknowledgement) and delivery go first and the analysis slows,
    # instead of the other way round. 0 leaves the workers at the node's own priority.
    analysis_nice: int = Field(10, ge=0, le=19)
    # Linux SCHED_IDLE for those workers as well: a receiver or sender that wakes up preempts the
    # analysis at once, where niceness alone still leaves it a slice of the core it shares with
    # them (measured: ingest during an analysis 0.90-1.00 of idle with it, 0.64-0.70 without).
    # The analysis then runs on CPU time nothing else wants; false: niceness only.
    analysis_idle: bool = True


class Storage(Strict):
    """Where files and the index live, and when stores are refused for lack of space."""

    data_dir: str | None = None  # default: $XDG_DATA_HOME/ct-vlp-node or ./data
    min_free_mb: int = Field(1024, ge=0, description="refuse stores (0xA700) below this much free disk")
    fsync: bool = True  # fsync each received file before answering Success
    retention_days: int = Field(30, ge=0, description="delete received series older than this; 0 keeps forever")
    result_retention_days: int = Field(365, ge=0)


class Database(Strict):
    """The index database: SQLite (default) or PostgreSQL."""

    url: str | None = None  # default: sqlite:///<data_dir>/node.sqlite
    url_env: str | None = None  # name of an environment variable holding the URL (with password)


class Config(Strict):
    """The whole configuration file."""

    listeners: list[Listener] = [Listener()]
    network: Network = Network()
    storage: Storage = Storage()
    database: Database = Database()
    destinations: dict[str, Destination] = {}
    rules: list[Rule] = []
    default_action: DefaultAction = DefaultAction()
    pipelines: dict[str, Pipeline] = {"default": Pipeline()}
    workers: Workers = Workers()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _references(self) -> "Config":
        for rule in self.rules:
            for d in [*rule.forward, *rule.results_to]:
                if d not in self.destinations:
                    raise ValueError(f"rule {rule.name!r} names destination {d!r}, which is not in "
                                     f"destinations (known: {sorted(self.destinations) or 'none'})")
            if rule.analyze and rule.analyze not in self.pipelines:
                raise ValueError(f"rule {rule.name!r} names pipeline {rule.analyze!r}, which is not in "
                                 f"pipelines (known: {sorted(self.pipelines)})")
        for d in self.default_action.forward:
            if d not in self.destinations:
                raise ValueError(f"default_action forwards to unknown destination {d!r}")
        return self

    @property
    def data_dir(self) -> Path:
        """The data directory (created on demand)."""
        if self.storage.data_dir:
            return Path(self.storage.data_dir).expanduser()
        xdg = os.environ.get("XDG_DATA_HOME")
        return Path(xdg) / "ct-vlp-node" if xdg else Path.cwd() / "data"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the index database."""
        if self.database.url_env:
            url = os.environ.get(self.database.url_env)
            if not url:
                raise ConfigError(f"database.url_env names {self.database.url_env!r}, but that environment "
                                  "variable is not set: export it with the database URL")
            return url
        return self.database.url or f"sqlite:///{self.data_dir / 'node.sqlite'}"


def default_config_text() -> str:
    """The embedded default configuration (the repository's config.yaml)."""
    return resources.files("dicom_node").joinpath("config.yaml").read_text()


def _apply_env(data: dict, environ: dict[str, str]) -> dict:
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        if not path:
            continue
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"environment variable {key}: {part!r} is not an index of the "
                                      f"list at {'.'.join(path[:i]) or 'top level'} (0..{len(node) - 1})")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"environment variable {key}: {'.'.join(path[:i])} is not a section")
            else:
                # destination and pipeline names keep their case from the file
                part = next((k for k in node if isinstance(k, str) and k.lower() == part), part)
            if last:
                node[part] = yaml.safe_load(raw) if raw != "" else None
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
    return data


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against config.yaml and the README)"
        elif e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
            msg = f"not allowed; allowed: {e['ctx']['expected']}"
        lines.append(f"  {loc} = {shown}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load, override from the environment and validate a configuration file."""
    source = str(path) if path else "the embedded default config.yaml"
    try:
        text = Path(path).read_text() if path else default_config_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror}; pass --config with an existing file") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of sections (listeners, network, ...)")
    data = _apply_env(data, dict(os.environ if environ is None else environ))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
