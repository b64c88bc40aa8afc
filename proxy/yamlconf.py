"""Reading a YAML configuration: YAML 1.2 scalars, `${VAR}` substitution, typed fields.

    problems: list[Problem] = []
    tree = load_yaml(text, problems)                 # None when it does not parse
    root = Section(substitute(tree, os.environ, problems), "", problems, {"listen", ...})
    listen = root.string("listen", "0.0.0.0:8080")   # a wrong type records a Problem

Every problem is recorded with its key path (`apps[1].secrets[0]`). A message may quote the
offending value (`quoted()`: an id, a name, a choice) but never one from `${VAR}` substitution,
and never the value of a key that may hold a secret. Booleans are YAML 1.2's (`true`/`false`;
`yes`, `on` stay strings), and a string produced by substitution is read as a number or
boolean where the key takes one.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import yaml

from .errors import Problem

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, "duplicate key in a mapping", key_node.start_mark
                )
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_DROPPED = {
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:value",
}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?i:true|false)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    return str(loader.construct_scalar(node)).lower() == "true"


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


def load_yaml(text: str, problems: list[Problem]) -> Any:
    """Parse YAML text; on a syntax error record where it is (never the line's text)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problems.append(Problem("", f"{where}not valid YAML ({error.problem or 'syntax'})"))
    except yaml.YAMLError:
        problems.append(Problem("", "not valid YAML"))
    return None


class Substituted(str):
    """A string that came from `${VAR}` substitution: numbers and booleans may be read in it."""

    __slots__ = ()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute(value: Any, env: Mapping[str, str], problems: list[Problem], path: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string value of a YAML tree."""
    if isinstance(value, dict):
        return {k: substitute(v, env, problems, join(path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, env, problems, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(found: re.Match[str]) -> str:
        name, default = found.group(1), found.group(2)
        current = env.get(name)
        if current is None or (current == "" and default is not None):
            if default is None:
                problems.append(Problem(path, f"environment variable {name} is not set"))
                return ""
            return default
        return current

    return Substituted(_VAR.sub(replace, value))


def quoted(value: object) -> str | None:
    """`value` as a message may show it ("ghost-app", ASCII, shortened), or None when it came
    from `${VAR}` substitution (it may be a secret) or is not a plain scalar."""
    if isinstance(value, Substituted) or not isinstance(value, str | int | float | bool):
        return None
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 82 else text[:80] + '…"'


def kind_of(value: object) -> str:
    """What a YAML value is, for "must be a string, not a list" (the type, never the value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "a mapping"


def substituted_strings(value: Any) -> frozenset[str]:
    """Every string a `${VAR}` substitution produced in a YAML tree (kept out of messages)."""
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Substituted):
            found.add(str(item))
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return frozenset(found)


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


_MISSING: Any = object()


class Section:
    """One YAML mapping being read: unknown keys are problems, fields are read by type."""

    def __init__(self, data: Any, path: str, problems: list[Problem], keys: Iterable[str]) -> None:
        self.path = path
        self.problems = problems
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problem("", "must be a mapping")
            data = {}
        self.data: dict[Any, Any] = data
        known = set(keys)
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.problem(str(key), "unknown key" + hint)

    def at(self, key: str) -> str:
        return join(self.path, key)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(join(self.path, key) if key else self.path, message))

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def field(
        self, key: str, read: Callable[[Any], T], what: str, default: Any = _MISSING
    ) -> T | None:
        """The value of `key` read by `read` (which raises ValueError), or None after a problem."""
        if key not in self.data:
            if default is _MISSING:
                self.problem(key, f"is required ({what})")
                return None
            return default  # type: ignore[no-any-return]
        try:
            return read(self.data[key])
        except ValueError as error:
            self.problem(key, str(error) or f"must be {what}")
            return None

    def string(self, key: str, default: Any = _MISSING) -> str | None:
        return self.field(key, as_string, "a string", default)

    def optional_string(self, key: str) -> str | None:
        return self.field(key, optional(as_string), "a string or null", None)

    def number(self, key: str, default: Any = _MISSING, minimum: float = 0) -> float | None:
        return self.field(key, lambda v: as_number(v, minimum), "a number", default)

    def integer(self, key: str, default: Any = _MISSING, minimum: int = 0) -> int | None:
        return self.field(key, lambda v: as_integer(v, minimum), "an integer", default)

    def boolean(self, key: str, default: Any = _MISSING) -> bool | None:
        return self.field(key, as_boolean, "true or false", default)

    def strings(self, key: str, default: Any = _MISSING) -> tuple[str, ...] | None:
        return self.field(key, as_strings, "a list of strings", default)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> str | None:
        def read(value: Any) -> str:
            if value not in choices:
                shown = quoted(value)
                got = f", not {shown}" if shown else ""
                raise ValueError("must be one of " + ", ".join(choices) + got)
            return str(value)

        return self.field(key, read, "one of " + ", ".join(choices), default)


def optional(read: Callable[[Any], T]) -> Callable[[Any], T | None]:
    return lambda value: None if value is None else read(value)


def as_string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {kind_of(value)} (quote it)")
    return str(value)


def as_strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of strings, not {kind_of(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"must be a list of strings ([{index}] is {kind_of(item)})")
    return tuple(str(v) for v in value)


def as_number(value: Any, minimum: float = 0) -> float:
    if isinstance(value, Substituted):
        try:
            value = float(value)
        except ValueError:
            raise ValueError("must be a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"must be a number, not {kind_of(value) if value == value else 'NaN'}")
    if value < minimum or value == float("inf"):
        raise ValueError(f"must be a number of at least {minimum:g}")
    return value


def as_integer(value: Any, minimum: int = 0) -> int:
    if isinstance(value, Substituted):
        try:
            value = int(value, 10)
        except ValueError:
            raise ValueError("must be an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {kind_of(value)}")
    if value < minimum:
        raise ValueError(f"must be an integer of at least {minimum}")
    return value


def as_boolean(value: Any) -> bool:
    if isinstance(value, Substituted) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        shown = quoted(value) if isinstance(value, str) else None
        raise ValueError(f"must be true or false, not {shown or kind_of(value)}")
    return value
