"""What the config rules (`deit_jax.config.rules`) are written in: a `Rule` (a key, a predicate,
the sentence that says what is allowed), the `Context` a predicate sees, the generic predicates
(integers, intervals, choices, pairs, parsers), those several sections of the table share, and
`problems`, which runs a table of rules.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from deit_jax.data import labels
from deit_jax.models.registry import list_models

MISSING = object()


@dataclasses.dataclass(frozen=True)
class Context:
    """What rules may look at besides the value: the config, the hardware it runs on, and
    whether the command trains the teacher itself before distilling from it (an experiment such
    as the quickstart, which fills in `teacher.checkpoint` for its distillation stages)."""

    config: ml_collections.ConfigDict
    num_devices: int
    num_processes: int
    teacher_from_run: bool = False
    # A plan (`mode=plan`) compiles the run without its files: rules on them do not apply.
    planning: bool = False

    def get(self, key: str) -> Any:
        """The value at a dotted key, or `MISSING`."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                return MISSING
            node = node[part]
        return node

    @property
    def distilling(self) -> bool:
        return self.get("distillation.kind") not in ("none", MISSING)


@dataclasses.dataclass(frozen=True)
class Rule:
    """`key`'s value must satisfy `ok(value, context)`; else `allowed` (a str, or a function of
    the context) says what is allowed and what to do."""

    key: str
    ok: Callable[[Any, Context], bool]
    allowed: str | Callable[[Context], str]
    after: tuple[str, ...] = ()
    on_disk: bool = False  # it needs a file or folder to exist: not a plan's rule


def problem_rule(
    key: str,
    problem: Callable[[Any, Context], str | None],
    after: tuple[str, ...] = (),
    on_disk: bool = False,
) -> Rule:
    """A rule whose check names its own problem: `problem(value, context)` is None when the
    value is allowed, else the sentence that says what is wrong and what to do."""
    return Rule(
        key, lambda v, c: problem(v, c) is None, lambda c: problem(c.get(key), c), after, on_disk
    )


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_at_least(low: int) -> Callable[[Any, Context], bool]:
    return lambda v, c: is_int(v) and v >= low


def in_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """A predicate for a number in the interval [lo, hi], each end open or closed."""

    def ok(v: Any, c: Context) -> bool:
        if not is_num(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok


def one_of(*choices: Any) -> Callable[[Any, Context], bool]:
    return lambda v, c: v in choices


def spoken(options: Mapping[str, str] | Sequence[Any]) -> str:
    """Alternatives as a message says them: "'a' (what a is), 'b' (...) or 'c' (...)"."""
    said = [
        f"{k!r} ({options[k]})" if isinstance(options, Mapping) and options[k] else repr(k)
        for k in options
    ]
    return said[0] if len(said) == 1 else ", ".join(said[:-1]) + " or " + said[-1]


def choice(key: str, options: Mapping[str, str] | Sequence[Any], after: tuple = ()) -> Rule:
    """`key` must be one of `options` (a table name -> what it is, or a sequence), the
    message made from the same table."""
    return Rule(key, one_of(*options), f"must be {spoken(options)}", after)


def bounds(v: Any, c: Context) -> bool:
    """A (min, max) pair with 0 < min <= max."""
    return (
        isinstance(v, Sequence) and len(v) == 2 and all(is_num(x) for x in v) and 0 < v[0] <= v[1]
    )


def three(positive: bool) -> Callable[[Any, Context], bool]:
    def ok(v: Any, c: Context) -> bool:
        if not (isinstance(v, Sequence) and len(v) == 3 and all(is_num(x) for x in v)):
            return False
        return all(x > 0 for x in v) if positive else True

    return ok


def image_size(v: Any, c: Context) -> bool:
    sizes = v if isinstance(v, Sequence) and not isinstance(v, str) else [v]
    return len(sizes) in (1, 2) and all(is_int(s) and s > 0 for s in sizes)


def error_of(parse: Callable[[Any], Any], key: str) -> Callable[[Context], str]:
    """The `allowed` text of a rule whose check is a parser: the parser's own message."""

    def message(c: Context) -> str:
        try:
            parse(c.get(key))
        except (TypeError, ValueError) as e:
            return str(e).rstrip(".")
        return "is not valid"

    return message


def parses(parse: Callable[[Any], Any]) -> Callable[[Any, Context], bool]:
    def ok(v: Any, c: Context) -> bool:
        parse(v)  # a TypeError / ValueError fails the rule (see `problems`)
        return True

    return ok


def shown(value: Any) -> str:
    if isinstance(value, ml_collections.ConfigDict):
        return str(value.to_dict())
    return repr(value) if isinstance(value, str) else str(value)


def problems(rules: Sequence[Rule], context: Context) -> list[str]:
    """Every problem the `rules` find in `context.config`, one `config.<key>=<value>: <what is
    allowed>` line each. A key's rules run in order and stop at its first failure; a rule whose
    `after` keys failed is skipped; keys the config lacks are skipped, and so are the rules on
    files (`on_disk`) when planning."""
    c = context
    failed: dict[str, str] = {}
    for rule in rules:
        value = c.get(rule.key)
        if value is MISSING or rule.key in failed or any(k in failed for k in rule.after):
            continue
        if rule.on_disk and c.planning:
            continue
        try:
            ok = rule.ok(value, c)
        except (TypeError, ValueError, ZeroDivisionError):
            ok = False  # A value of the wrong type for the rule's arithmetic.
        if not ok:
            allowed = rule.allowed(c) if callable(rule.allowed) else rule.allowed
            failed[rule.key] = f"config.{rule.key}={shown(value)}: {allowed}."
    return list(failed.values())


# --------------------------------------------------------------------------- shared by sections


def registered(v: Any, c: Context) -> bool:
    return isinstance(v, str) and v in list_models()


def existing_path(v: Any, c: Context) -> bool:
    return isinstance(v, str) and (not v or os.path.exists(os.path.expanduser(v)))


def label_free(c: Context) -> bool:
    return labels.is_label_free(c.get("data.name"))


LABEL_FREE = "label-free data (data.name='images:...')"

WEIGHTS = (
    "a deit_jax weights directory (python -m deit_jax.convert, or the `weights` directory of a "
    "finished run) or a .pth/.safetensors file"
)
