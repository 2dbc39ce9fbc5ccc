"""The built-in suite name grammar: ``name[:arg][?key=value&...]``.

Examples: ``behaviours``, ``behaviours:sure-thing,hope-helps?train=16&eval=8``,
``reasoning_gym:basic_arithmetic?seed=3``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl

from opsd.data.problems import DatasetError, single_problem


def suite_name(source: str) -> str:
    """The part before ``:`` or ``?`` (the whole string when it has neither)."""
    for separator in "?:":
        source = source.split(separator, 1)[0]
    return source


@dataclass(frozen=True)
class SuiteSource:
    """A parsed suite name; ``seed`` comes from :func:`opsd.data.load_rows`."""

    text: str
    name: str
    arg: str | None
    params: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def parse(cls, text: str, *, seed: int = 0) -> SuiteSource:
        head, _, query = text.partition("?")
        name, colon, arg = head.partition(":")
        source = cls(text, name, arg if colon else None, seed=seed)
        if not query:
            return source
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise source.error(f"bad query {query!r}; write it as ?key=value&key=value") from None
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise source.error(f"query key(s) given twice: {', '.join(repeated)}")
        return replace(source, params=dict(pairs))

    def error(self, reason: str) -> DatasetError:
        return single_problem(self.text, reason)

    def int_params(self, defaults: dict[str, int], *, ignore: tuple[str, ...] = ()) -> dict[str, int]:
        """Query values as non-negative ints over ``defaults``; unknown keys are errors.
        ``ignore``: keys read elsewhere (:meth:`choice`), allowed but not returned."""
        unknown = sorted(set(self.params) - set(defaults) - set(ignore))
        if unknown:
            allowed = ", ".join([*defaults, *ignore])
            raise self.error(f"unknown query key(s) {', '.join(unknown)}; allowed: {allowed}")
        values = dict(defaults)
        for key, text in self.params.items():
            if key in ignore:
                continue
            if not text.isdigit():
                raise self.error(f"{key}={text!r} must be a non-negative integer")
            values[key] = int(text)
        return values

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        """A query value that must be one of ``allowed`` (the first one when absent)."""
        value = self.params.get(key, allowed[0])
        if value not in allowed:
            raise self.error(f"{key}={value!r}; choose one of {', '.join(allowed)}")
        return value
