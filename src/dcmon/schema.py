"""A small validator for the configuration: tables are stdlib dataclasses, limits live in field metadata.

Why not pydantic, or attrs + cattrs: docs/architecture.md ("The configuration model"). In short: pydantic-core
has no armv6l wheel, and either library's errors would need translating into our one line (file, key,
problem, fix, "did you mean") anyway; what is left to write is this module.

A table is a ``@dataclass(kw_only=True)``; a key is a field with a type hint and, where it has limits,
``key(default, ge=…, le=…, …)``::

    @dataclass(kw_only=True)
    class MqttConfig:
        enabled: bool = False
        host: str = ""
        port: int = key(1883, ge=1, le=65535)
        qos: Literal[0, 1, 2] = 1
        password: str = key("", secret=True)        # never shown in an error

        def check(self) -> None:                    # optional: rules across keys of this table
            if self.enabled and not self.host:
                raise Invalid("is required with enabled = true", "set mqtt.host", loc=("host",))

Types understood: bool, int, float, str, ``Literal[...]``, ``X | None``, a dataclass (a sub-table),
``dict[str, str]``, ``dict[str, Table]`` (``[table.NAME]``) and ``list[Table]`` (``[[table]]``).
Rules applied to every key: bool is not a number, an int is not a float's NaN, floats must be finite, strings
hold no control characters. Unknown keys are errors with the closest known key ("did you mean"), reported
before the "is required" that a typo causes. Values from environment variables arrive as ``EnvText`` and are
converted to the key's type first.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Literal, Union

Loc = tuple[str | int, ...]


class Invalid(ValueError):
    """One problem with one key. ``loc`` is relative to where it is raised (a check() raises it relative to
    its table); ``because`` is the key whose value made it a problem (its file is the one named);
    ``show`` = False keeps the value out of the message."""

    def __init__(self, problem: str, fix: str = "", *, loc: Loc = (), because: Loc | None = None,
                 show: bool = True) -> None:
        super().__init__(problem)
        self.problem, self.fix, self.loc, self.because, self.show = problem, fix, loc, because, show

    def __str__(self) -> str:
        return self.problem

    def at(self, prefix: Loc) -> Invalid:
        self.loc = prefix + self.loc
        if self.because is not None:
            self.because = prefix + self.because
        return self


class EnvText(str):
    """A value taken from an environment variable: text, converted to the key's type when parsed."""


@dataclass(frozen=True)
class Rule:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    min_len: int | None = None
    max_len: int | None = None
    check: Callable[[Any], Any] | None = None   # returns the value (maybe normalised) or raises Invalid
    fix: str = ""                                # added to range/choice errors
    secret: bool = False                         # never shown in an error
    internal: bool = False                       # not a key of the file (set by the loader)


NO_RULE = Rule()
INTERNAL = {"rule": Rule(internal=True)}


def key(default: Any = MISSING, *, factory: Any = MISSING, **rule: Any) -> Any:
    """A key with limits: ``key(5.0, ge=0, le=3600)``; ``factory`` for a mutable default."""
    r = Rule(**rule)
    return dataclasses.field(default=default, default_factory=factory, repr=not r.secret, metadata={"rule": r})


def rule_of(f: dataclasses.Field[Any]) -> Rule:
    return f.metadata.get("rule", NO_RULE)


@functools.cache
def keys(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The keys of a table, in order (what ``model_fields`` was): name → dataclasses.Field."""
    return {f.name: f for f in dataclasses.fields(cls) if not rule_of(f).internal}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def hint(cls: type, name: str) -> Any:
    return _hints(cls)[name]


def default(f: dataclasses.Field[Any]) -> Any:
    """A key's default value, or MISSING when the key is required."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def is_table(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def is_scalar(tp: Any) -> bool:
    """A key that holds one value (what an environment variable can set)."""
    return not is_table(tp) and typing.get_origin(tp) not in (dict, list)


def show(v: Any) -> str:
    """A value as it would be written in TOML (short)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + (v if len(v) <= 60 else v[:57] + "...") + '"'
    if isinstance(v, dict):
        return "a table"
    if isinstance(v, list):
        return "a list"
    return repr(v)


# ------------------------------------------------------------------------------------------- parsing

def parse(cls: type, data: Any, loc: Loc = ()) -> Any:
    """Build and validate one table from plain data (TOML's). Raises Invalid with the full ``loc``."""
    if not isinstance(data, dict):
        raise Invalid(f"must be a table (got {show(data)})", loc=loc, show=False)
    fields = keys(cls)
    for name in data:  # unknown keys first: a typo is the cause of the "is required" it would also give
        if name not in fields:
            raise Invalid("unknown key", suggest(str(name), list(fields)), loc=loc + (name,))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        tp = hint(cls, name)
        if name in data:
            values[name] = value(tp, data[name], loc + (name,), rule_of(f))
        elif is_table(tp):
            values[name] = parse(tp, {}, loc + (name,))  # so its check() runs too
        elif default(f) is MISSING:
            raise Invalid("is required", f"add {name} = ... to this table", loc=loc + (name,))
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except Invalid as e:
            raise e.at(loc) from None
    return obj


def suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string (in quotes)"}


def value(tp: Any, v: Any, loc: Loc, rule: Rule = NO_RULE) -> Any:
    """One value checked against its type hint and rule."""
    try:
        out = _convert(tp, v, loc)
        out = _apply(rule, out)
    except Invalid as e:
        if not e.loc:  # about this value itself
            e.at(loc)
            if e.show and not rule.secret:
                e.problem += f" (got {show(v)})"
        elif e.loc[: len(loc)] != loc:  # raised by a check, relative to this value
            e.at(loc)
        raise
    return out


def _convert(tp: Any, v: Any, loc: Loc) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if v is None or (isinstance(v, EnvText) and not v.strip()):
            return None
        return _convert(inner[0], v, loc)
    if origin is Literal:
        if isinstance(v, EnvText):
            v = _from_text(type(args[0]), v)
        if not any(type(v) is type(a) and v == a for a in args):
            raise Invalid(f"must be one of {', '.join(show(a) for a in args)}")
        return v
    if is_table(tp):
        return parse(tp, v, loc)
    if origin is dict:
        if not isinstance(v, dict):
            raise Invalid("must be a table, e.g. { name = \"value\" }")
        return {k: value(args[1], item, loc + (k,)) for k, item in v.items()}
    if origin is list:
        if not isinstance(v, list):
            if not is_table(args[0]):
                raise Invalid('must be a list, e.g. ["a", "b"]')
            raise Invalid(f"must be a list of tables ([[{loc[-1]}]])", show=False)
        return [value(args[0], item, loc + (i,)) for i, item in enumerate(v)]
    if isinstance(v, EnvText):
        v = _from_text(tp, v)
    if tp is float and type(v) is int:
        v = float(v)
    if type(v) is not tp:
        raise Invalid(f"must be {_TYPE_WORDS.get(tp, tp.__name__)}")
    if tp is float and not math.isfinite(v):
        raise Invalid("must be a finite number")
    if tp is str and any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise Invalid("must not contain control characters (newline, tab, NUL)", show=False)
    return v


def _from_text(tp: type, v: str) -> Any:
    text = v.strip()
    try:
        if tp is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise Invalid(f"must be {_TYPE_WORDS[tp]}") from None
    return str(v)


def _range_text(r: Rule) -> str:
    if r.ge is not None and r.le is not None:
        return f"from {r.ge:g} to {r.le:g}"
    lo = f"at least {r.ge:g}" if r.ge is not None else f"more than {r.gt:g}" if r.gt is not None else ""
    hi = f"at most {r.le:g}" if r.le is not None else f"less than {r.lt:g}" if r.lt is not None else ""
    return " and ".join(p for p in (lo, hi) if p)


def _apply(r: Rule, v: Any) -> Any:
    if r is NO_RULE or v is None:
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if ((r.ge is not None and v < r.ge) or (r.gt is not None and v <= r.gt)
                or (r.le is not None and v > r.le) or (r.lt is not None and v >= r.lt)):
            raise Invalid(f"must be {_range_text(r)}", r.fix)
    if r.choices is not None and v not in r.choices:
        raise Invalid(f"must be one of {', '.join(show(c) for c in r.choices)}", r.fix)
    if isinstance(v, str):
        if r.min_len is not None and len(v) < r.min_len:
            raise Invalid("must not be empty" if r.min_len == 1 else f"must be at least {r.min_len} characters", r.fix)
        if r.max_len is not None and len(v) > r.max_len:
            raise Invalid(f"must be at most {r.max_len} characters", r.fix, show=False)
    if r.check is not None:
        v = r.check(v)
    return v
