"""Routing rules: ordered matchers on series-level attributes, parsed once, never ``eval``-ed.

A rule's ``match`` maps a DICOM keyword (or ``calling_ae`` / ``called_ae``) to a pattern:

- ``CT``: exact string; ``"*CHEST*"`` / ``"AX?AL"``: glob (case-insensitive);
  ``"re:^AX.*"``: regular expression (case-insensitive, searched);
- ``5``, ``"<=5"``, ``">0.5"``, ``"!=3"``, ``"0.5..5"``: numbers, comparisons and inclusive ranges;
- a leading ``!`` negates any string pattern: ``"!*LOCALIZER*"``;
- a list matches if any of its positive items matches and none of its ``!`` items does
  (a list of only ``!`` items matches everything else).

Multi-valued attributes (e.g. ImageType) match if any value matches, or the values joined with
``\\`` do. An attribute the series does not have matches only negated patterns.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue

from dicom_node.config import Config, Rule

SPECIAL_KEYS = {"calling_ae", "called_ae"}
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CMP = re.compile(rf"^\s*(<=|>=|<|>|==|!=)\s*({_NUM})\s*$")
_RANGE = re.compile(rf"^\s*({_NUM})\s*\.\.\s*({_NUM})\s*$")
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq,
        "!=": operator.ne}


class Matcher:
    """One parsed pattern; ``__call__`` says whether a set of attribute values matches."""

    def __init__(self, pattern: Any):
        self.source = pattern
        self.negated = False
        if isinstance(pattern, bool):
            raise ValueError(f"{pattern!r}: a boolean is not a pattern; quote it if you mean text")
        if isinstance(pattern, (int, float)):
            self.kind, self.arg = "num", (operator.eq, float(pattern))
            return
        if not isinstance(pattern, str):
            raise ValueError(f"{pattern!r}: expected text, a number or a list")
        text = pattern
        if text.startswith("!") and not text.startswith("!="):
            self.negated, text = True, text[1:]
        if m := _CMP.match(text):
            self.kind, self.arg = "num", (_OPS[m[1]], float(m[2]))
        elif m := _RANGE.match(text):
            lo, hi = float(m[1]), float(m[2])
            if lo > hi:
                raise ValueError(f"{pattern!r}: range start {lo} is above its end {hi}")
            self.kind, self.arg = "range", (lo, hi)
        elif text.startswith("re:"):
            try:
                self.kind, self.arg = "regex", re.compile(text[3:], re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"{pattern!r}: invalid regular expression: {exc}") from None
        elif any(c in text for c in "*?["):
            self.kind, self.arg = "glob", re.compile(fnmatch.translate(text), re.IGNORECASE)
        else:
            self.kind, self.arg = "exact", text.strip()

    def _one(self, value: str) -> bool:
        if self.kind == "exact":
            return value.strip() == self.arg
        if self.kind == "glob":
            return bool(self.arg.match(value.strip()))
        if self.kind == "regex":
            return bool(self.arg.search(value))
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        if self.kind == "range":
            return self.arg[0] <= number <= self.arg[1]
        op, ref = self.arg
        return op(number, ref)

    def raw_match(self, values: list[str] | None) -> bool:
        """Whether the pattern (ignoring its negation) matches any value."""
        if not values:
            return False
        candidates = list(values)
        if len(values) > 1:
            candidates.append("\\".join(values))
        return any(self._one(v) for v in candidates)

    def __call__(self, values: list[str] | None) -> bool:
        return self.raw_match(values) != self.negated


class Condition:
    """All the patterns for one key: a single pattern or a list with ``!`` exclusions."""

    def __init__(self, key: str, spec: Any):
        if key not in SPECIAL_KEYS and tag_for_keyword(key) is None:
            raise ValueError(f"{key!r} is not a DICOM keyword (e.g. Modality, SeriesDescription) nor one of "
                             f"{sorted(SPECIAL_KEYS)}")
        self.key = key
        items = spec if isinstance(spec, list) else [spec]
        if not items:
            raise ValueError(f"{key}: an empty list matches nothing; remove the key instead")
        matchers = [Matcher(i) for i in items]
        # one pattern stands alone (a negated one means "anything but"); in a list, positive
        # items are alternatives and negated items are exclusions
        self.single = matchers[0] if len(matchers) == 1 else None
        self.include = [m for m in matchers if not m.negated] if self.single is None else []
        self.exclude = [m for m in matchers if m.negated] if self.single is None else []

    def explain(self, values: list[str] | None) -> str | None:
        """None when the condition holds, else why it does not."""
        shown = "absent" if not values else "\\".join(values)
        if self.single is not None:
            return None if self.single(values) else f"{self.key}={shown} does not match {self.single.source!r}"
        if self.include and not any(m.raw_match(values) for m in self.include):
            return f"{self.key}={shown} matches none of {[m.source for m in self.include]}"
        for m in self.exclude:
            if not m(values):
                return f"{self.key}={shown} is excluded by {m.source!r}"
        return None


@dataclass
class CompiledRule:
    """A rule from the config with its conditions parsed."""

    rule: Rule
    conditions: list[Condition]

    def explain(self, attrs: "SeriesAttributes") -> str | None:
        """None when the rule matches, else the first reason it does not."""
        for c in self.conditions:
            why = c.explain(attrs.get(c.key))
            if why:
                return why
        return None


class SeriesAttributes:
    """Series-level attribute values as lists of strings, looked up by keyword."""

    def __init__(self, ds: Dataset | None = None, *, calling_ae: str | None = None,
                 called_ae: str | None = None, values: dict[str, list[str]] | None = None):
        self.ds = ds
        self.values = dict(values or {})
        if calling_ae:
            self.values["calling_ae"] = [calling_ae]
        if called_ae:
            self.values["called_ae"] = [called_ae]

    def get(self, key: str) -> list[str] | None:
        """The values of ``key``, or None when absent or empty."""
        if key in self.values:
            return self.values[key] or None
        if self.ds is None or key not in self.ds:
            return None
        value = self.ds[key].value
        if value is None or value == "":
            return None
        if isinstance(value, (list, MultiValue)):
            return [str(v) for v in value] or None
        if dictionary_VR(tag_for_keyword(key)) == "SQ":
            return None
        return [str(value)]


@dataclass
class Decision:
    """What routing decided for a series, and why."""

    rules: list[Rule]  # matched rules, in order (evaluation stops at a rule with stop: true)
    default: bool  # no rule matched: the default action applies
    reasons: dict[str, str]  # rule name -> why it did not match

    @property
    def forward(self) -> list[str]:
        """Destinations to forward the series to."""
        out: list[str] = []
        for r in self.rules:
            out += [d for d in r.forward if d not in out]
        return out

    @property
    def analyze(self) -> list[tuple[str, list[str]]]:
        """(pipeline, result destinations) pairs to run."""
        return [(r.analyze, list(r.results_to)) for r in self.rules if r.analyze]

    @property
    def discard(self) -> bool:
        """True when nothing is to be done with the series."""
        return not self.forward and not self.analyze


class Router:
    """Evaluates the configured rules in order."""

    def __init__(self, config: Config):
        self.config = config
        self.rules = [compile_rule(r) for r in config.rules]

    def decide(self, attrs: SeriesAttributes) -> Decision:
        """Which rules match a series (evaluation stops after a matching rule with ``stop``)."""
        matched: list[Rule] = []
        reasons: dict[str, str] = {}
        for cr in self.rules:
            why = cr.explain(attrs)
            if why is not None:
                reasons[cr.rule.name] = why
                continue
            matched.append(cr.rule)
            if cr.rule.stop:
                break
        if matched:
            return Decision([r for r in matched if not r.discard or r.forward or r.analyze], False, reasons)
        default = self.config.default_action
        pseudo = [] if default.discard and not default.forward else [
            Rule(name="default_action", forward=default.forward, discard=not default.forward)]
        return Decision(pseudo, True, reasons)


def compile_rule(rule: Rule) -> CompiledRule:
    """Parse a rule's patterns; a bad pattern raises ValueError naming the rule and key."""
    conditions = []
    for key, spec in rule.match.items():
        try:
            conditions.append(Condition(key, spec))
        except ValueError as exc:
            raise ValueError(f"rules: rule {rule.name!r}, match.{key}: {exc}") from None
    return CompiledRule(rule, conditions)
