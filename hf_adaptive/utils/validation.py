"""One way to refuse a bad option: `OptionError` names the owner, the field, the value and what is allowed.

Every config of the package validates through these checks, so a config that builds another config (the
composed `ContinualConfig` building a `RouterConfig`) can restate an error under the option name the user set
(`OptionError.renamed`), without parsing messages. Shared rules: numbers are finite (NaN and +-inf are refused
unless `allow_inf`), bools are real bools (`'yes'` and `2` are refused), a lone string for a list option is a
one-element list (never split into characters).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NoReturn


class OptionError(ValueError):
    """`<owner>.<field>=<value> is not allowed: <allowed>`, with the parts kept for renaming.

    A rule that compares two fields names the other one too: `allowed` then holds `{0}`, `{1}`, ... placeholders
    for the `related` `(field, value)` pairs, written `<owner>.<field>=<value>` (and renamed with the option).
    """

    def __init__(
        self, owner: str, field: str, value: Any, allowed: str, related: tuple[tuple[str, Any], ...] = ()
    ) -> None:
        self.owner, self.field, self.value, self.allowed, self.related = owner, field, value, allowed, tuple(related)
        if self.related:
            allowed = allowed.format(*(f"{owner}.{name}={other!r}" for name, other in self.related))
        super().__init__(f"{owner}.{field}={value!r} is not allowed: {allowed}")

    def renamed(self, owner: str, field: str, names: dict[str, str] | None = None) -> OptionError:
        """The same refusal, restated for the option `owner.field` that carried the value (`names` renames the
        related fields: field name -> option name)."""
        names = names or {}
        related = tuple((names.get(name, name), other) for name, other in self.related)
        return OptionError(owner, field, self.value, self.allowed, related)


def fail(owner: str, field: str, value: Any, allowed: str) -> NoReturn:
    raise OptionError(owner, field, value, allowed)


def check_choice(owner: str, field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if isinstance(value, bool) or value not in choices:
        fail(owner, field, value, f"choose one of {choices}")


def check_bool(owner: str, field: str, value: Any) -> None:
    """A real `bool`: `'yes'`, `'false'` or `2` would be truthy by accident (the CLI and YAML convert strings)."""
    if not isinstance(value, bool):
        fail(owner, field, value, "must be True or False (a bool)")


def check_number(
    owner: str,
    field: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
    allow_inf: bool = False,
) -> None:
    """`low <= value <= high` (strict where `low_open` / `high_open`); `None` passes when `optional`."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        fail(owner, field, value, f"must be {kind}" + (" or None" if optional else ""))
    if isinstance(value, float) and math.isnan(value):
        fail(owner, field, value, "must not be NaN")
    if isinstance(value, float) and math.isinf(value) and not allow_inf:
        fail(owner, field, value, "must be finite")
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    bounds = " and ".join(parts)
    if low is not None and (value <= low if low_open else value < low):
        fail(owner, field, value, f"must be {bounds}")
    if high is not None and (value >= high if high_open else value > high):
        fail(owner, field, value, f"must be {bounds}")


def check_order(owner: str, field: str, value: Any, other: str, other_value: Any) -> None:
    """`value <= other_value`, two fields of one config (both already checked to be numbers): the refusal names
    both, since either may be the one the user got wrong."""
    if value > other_value:
        raise OptionError(owner, field, value, "must be <= {0}", related=((other, other_value),))


def check_str(owner: str, field: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        fail(owner, field, value, "a non-empty string" + (" or None" if optional else ""))


def check_str_list(
    owner: str,
    field: str,
    value: Any,
    choices: Iterable[str] | None = None,
    optional: bool = False,
    allow_empty: bool = False,
) -> list[str] | None:
    """A list of non-empty strings, returned as a new list; a lone string is a one-element list."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        value = [value]
    choices = None if choices is None else list(choices)
    allowed = "a list of non-empty strings" + (f" from {choices}" if choices is not None else "")
    allowed += " (or None)" if optional else ""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        fail(owner, field, value, allowed)
    if not value and not allow_empty:
        fail(owner, field, value, f"must be non-empty: {allowed}")
    if choices is not None:
        for item in value:
            check_choice(owner, field, item, choices)
    return list(value)
