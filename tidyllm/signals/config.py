"""The ``signals:`` section of ``tidyllm.yaml``: judges, deterministic checks, weights of each source.

::

    signals:
      human_weight: 1.0              # a human label counts as one observation
      execution_weight: 1.0          # a score given to a tracked execution, per call made inside it
      provider_quality: true         # learn from a quality the provider reports with the answer (the simulator can)
      failure_weight: 0.1            # a failed call is a reward of 0 worth this many observations (the circuit
                                     # breaker already keeps failing routes out; an outage is not bad quality)
      regenerate_window_s: 120       # the same user sending the same prompt again within this window ...
      regenerate_weight: 0.25        # ... is a weak negative (score 0) for the first answer
      calibration_min_pairs: 20      # judge scores are calibrated on human labels once this many calls have both
      queue_size: 1000               # bounded queue of the background signal worker (judges, checks)
      judges:
        - name: quality
          model: judge               # model group of the governed judge route(s) in the gateway config
          department: evaluation     # whose budget the judge's calls spend (give it its own budget)
          use_case: judge
          scale: [0, 1]              # the judge answers a number in this range
          sample: {default: 0.05, risk: 0.2}   # share of each department's answers judged
          weight: 0.5                # observations one judge score counts for before calibration
          instructions: {default: "Rate how well the answer serves the request.", code: "..."}
      checks:                        # a failed check is a score of 0 at the check's weight; a pass is recorded
        extraction:                  # but not learned. Per use case, run on every answer of that use case
          - {name: json, json_schema: {type: object, required: [amount]}}
          - {name: short, length: {min: 1, max: 2000}}
        code:
          - {name: parses, python_parses: true}
          - {name: has-def, regex: "def \\w+"}
          - {name: house-rules, callable: "mypkg.checks:score"}   # fn(answer, request) -> bool | float
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from tidyllm.errors import ConfigurationError

__all__ = ["Check", "Judge", "SignalSettings", "parse_signals"]

_CHECK_KINDS = ("json_schema", "regex", "length", "python_parses", "callable")
_TOP_KEYS = {"human_weight", "execution_weight", "failure_weight", "provider_quality", "regenerate_window_s", "regenerate_weight",
             "calibration_min_pairs", "queue_size", "judges", "checks", "check_weight"}
_JUDGE_KEYS = {"name", "model", "department", "use_case", "user_id", "scale", "sample", "weight", "instructions",
               "max_tokens"}

DEFAULT_INSTRUCTIONS = ("You are a strict reviewer. Rate how well the answer serves the request: correct, "
                        "complete, and useful for the stated task. Reply with the score only.")


@dataclass(frozen=True)
class Judge:
    """An LLM judge: scores a sample of answers through a governed judge route."""

    name: str
    model: str
    department: str = "evaluation"
    use_case: str = "judge"
    user_id: str = "tidyllm-judge"
    scale: tuple[float, float] = (0.0, 1.0)
    sample: Mapping[str, float] = field(default_factory=lambda: {"default": 0.05})
    weight: float = 0.5
    instructions: Mapping[str, str] = field(default_factory=lambda: {"default": DEFAULT_INSTRUCTIONS})
    max_tokens: int = 16

    @property
    def source(self) -> str:
        """The ``call_signals.source`` of this judge's scores."""
        return f"judge:{self.name}"

    def rate(self, department: str | None) -> float:
        """Share of ``department``'s answers this judge scores."""
        return float(self.sample.get(department or "", self.sample.get("default", 0.0)))

    def instructions_for(self, use_case: str | None) -> str:
        """The instructions for ``use_case`` (else ``default``)."""
        return self.instructions.get(use_case or "", self.instructions.get("default", DEFAULT_INSTRUCTIONS))


@dataclass(frozen=True)
class Check:
    """A deterministic check of the answers of one use case."""

    use_case: str
    name: str
    kind: str
    arg: Any
    weight: float

    @property
    def source(self) -> str:
        """The ``call_signals.source`` of this check's results."""
        return f"check:{self.name}"


@dataclass(frozen=True)
class SignalSettings:
    """The parsed ``signals:`` section."""

    human_weight: float = 1.0
    execution_weight: float = 1.0
    failure_weight: float = 0.1
    check_weight: float = 0.3
    provider_quality: bool = True
    regenerate_window_s: float = 120.0
    regenerate_weight: float = 0.25
    calibration_min_pairs: int = 20
    queue_size: int = 1000
    judges: tuple[Judge, ...] = ()
    checks: Mapping[str, tuple[Check, ...]] = field(default_factory=dict)

    def judge_use_cases(self) -> set[tuple[str, str]]:
        """``(department, use_case)`` of the judges' own calls (never judged or checked themselves)."""
        return {(j.department, j.use_case) for j in self.judges}


def _weight(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 10.0:
        raise ConfigurationError(f"{where} must be a number of observations in [0, 10], got {value!r}")
    return float(value)


def _share(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigurationError(f"{where} must be a share in [0, 1] (0.05 = 5 %), got {value!r}")
    return float(value)


def _judge(i: int, raw: Any) -> Judge:
    where = f"signals.judges[{i}]"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("model"), str):
        raise ConfigurationError(f"{where} needs at least 'name' and 'model' (the model group of the judge route)")
    unknown = set(raw) - _JUDGE_KEYS
    if unknown:
        raise ConfigurationError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_JUDGE_KEYS)}")
    kw: dict[str, Any] = {"name": raw["name"], "model": raw["model"]}
    for key in ("department", "use_case", "user_id"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise ConfigurationError(f"{where}.{key} must be a non-empty string")
            kw[key] = raw[key]
    if "scale" in raw:
        scale = raw["scale"]
        if (not isinstance(scale, (list, tuple)) or len(scale) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
                or not scale[0] < scale[1]):
            raise ConfigurationError(f"{where}.scale must be [low, high] with low < high, e.g. [1, 5]; got {scale!r}")
        kw["scale"] = (float(scale[0]), float(scale[1]))
    if "sample" in raw:
        sample = raw["sample"]
        sample = {"default": sample} if isinstance(sample, (int, float)) and not isinstance(sample, bool) else sample
        if not isinstance(sample, Mapping):
            raise ConfigurationError(f"{where}.sample must be a share or {{department: share, default: share}}")
        kw["sample"] = {str(k): _share(f"{where}.sample.{k}", v) for k, v in sample.items()}
    if "weight" in raw:
        kw["weight"] = _weight(f"{where}.weight", raw["weight"])
    if "instructions" in raw:
        ins = raw["instructions"]
        ins = {"default": ins} if isinstance(ins, str) else ins
        if not isinstance(ins, Mapping) or not all(isinstance(v, str) and v for v in ins.values()):
            raise ConfigurationError(f"{where}.instructions must be a text or {{use_case: text, default: text}}")
        kw["instructions"] = {str(k): v for k, v in ins.items()}
    if "max_tokens" in raw:
        if not isinstance(raw["max_tokens"], int) or isinstance(raw["max_tokens"], bool) or raw["max_tokens"] < 1:
            raise ConfigurationError(f"{where}.max_tokens must be a positive integer")
        kw["max_tokens"] = raw["max_tokens"]
    return Judge(**kw)


def _check(use_case: str, i: int, raw: Any, default_weight: float) -> Check:
    where = f"signals.checks.{use_case}[{i}]"
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{where} must be a mapping like {{name: json, json_schema: {{...}}}}")
    kinds = [k for k in _CHECK_KINDS if k in raw]
    unknown = set(raw) - set(_CHECK_KINDS) - {"name", "weight"}
    if unknown or len(kinds) != 1:
        raise ConfigurationError(f"{where} needs exactly one of {', '.join(_CHECK_KINDS)} (plus optional name, "
                                 f"weight); got keys {sorted(raw)}")
    kind = kinds[0]
    arg = raw[kind]
    if kind == "json_schema":
        if not isinstance(arg, Mapping):
            raise ConfigurationError(f"{where}.json_schema must be a JSON schema (a mapping)")
        import jsonschema

        try:
            jsonschema.validators.validator_for(arg).check_schema(arg)
        except jsonschema.SchemaError as exc:
            raise ConfigurationError(f"{where}.json_schema is not a valid JSON schema: {exc.message}") from None
    elif kind == "regex":
        if not isinstance(arg, str):
            raise ConfigurationError(f"{where}.regex must be a regular expression (a string)")
        try:
            arg = re.compile(arg)
        except re.error as exc:
            raise ConfigurationError(f"{where}.regex {arg!r} does not compile: {exc}") from None
    elif kind == "length":
        if not isinstance(arg, Mapping) or not set(arg) <= {"min", "max"} or not arg:
            raise ConfigurationError(f"{where}.length must be {{min: chars, max: chars}}")
        lo, hi = arg.get("min", 0), arg.get("max")
        if not isinstance(lo, int) or (hi is not None and (not isinstance(hi, int) or hi < lo)):
            raise ConfigurationError(f"{where}.length: min and max are character counts with min <= max")
        arg = (lo, hi)
    elif kind == "python_parses":
        if arg is not True:
            raise ConfigurationError(f"{where}.python_parses must be true")
    elif kind == "callable":
        if not isinstance(arg, str) or ":" not in arg:
            raise ConfigurationError(f"{where}.callable must be an import path 'package.module:function'")
    name = raw.get("name", kind)
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{where}.name must be a non-empty string")
    weight = _weight(f"{where}.weight", raw.get("weight", default_weight))
    return Check(use_case, name, kind, arg, weight)


def parse_signals(raw: Mapping[str, Any] | None) -> SignalSettings:
    """Validate the ``signals:`` section; raises :class:`~tidyllm.errors.ConfigurationError` naming the key."""
    raw = dict(raw or {})
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigurationError(f"signals: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    kw: dict[str, Any] = {}
    for key in ("human_weight", "execution_weight", "failure_weight", "regenerate_weight", "check_weight"):
        if key in raw:
            kw[key] = _weight(f"signals.{key}", raw[key])
    if "provider_quality" in raw:
        if not isinstance(raw["provider_quality"], bool):
            raise ConfigurationError("signals.provider_quality must be true or false")
        kw["provider_quality"] = raw["provider_quality"]
    if "regenerate_window_s" in raw:
        value = raw["regenerate_window_s"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigurationError("signals.regenerate_window_s must be a number of seconds >= 0")
        kw["regenerate_window_s"] = float(value)
    for key in ("calibration_min_pairs", "queue_size"):
        if key in raw:
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                raise ConfigurationError(f"signals.{key} must be a positive integer")
            kw[key] = raw[key]
    judges = raw.get("judges") or []
    if not isinstance(judges, (list, tuple)):
        raise ConfigurationError("signals.judges must be a list of judges")
    kw["judges"] = tuple(_judge(i, j) for i, j in enumerate(judges))
    names = [j.name for j in kw["judges"]]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"signals.judges: judge names must be distinct, got {names}")
    checks = raw.get("checks") or {}
    if not isinstance(checks, Mapping):
        raise ConfigurationError("signals.checks must map each use case to a list of checks")
    default_weight = kw.get("check_weight", SignalSettings.check_weight)
    parsed: dict[str, tuple[Check, ...]] = {}
    for use_case, items in checks.items():
        if not isinstance(items, (list, tuple)):
            raise ConfigurationError(f"signals.checks.{use_case} must be a list of checks")
        parsed[str(use_case)] = tuple(_check(str(use_case), i, c, default_weight) for i, c in enumerate(items))
        names = [c.name for c in parsed[str(use_case)]]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"signals.checks.{use_case}: give checks of the same kind distinct names")
    kw["checks"] = parsed
    return SignalSettings(**kw)
