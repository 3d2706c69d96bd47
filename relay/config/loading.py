"""Reading the configuration: YAML in, one validated, frozen :class:`Config` out.

- :func:`load_config`: read and validate the YAML file at a path;
- :func:`parse_config`: validate an already-loaded document (tests, the health probe);
- :data:`DEFAULT_CONFIG_PATH`: where the commands look without ``--config``.

Every option is parsed and checked once, at start-up (and on reload), so the rest of the
relay never sees a half-valid setting. Validation goes in three rounds, each reporting
all of its problems as a :class:`relay.config.errors.ConfigError` that names the exact key
path: the models (:mod:`relay.config.sections`), then the references between sections
and the settings that contradict each other (:mod:`relay.config.checks`), then the files
and secrets the config names. Relative file paths are taken relative to the directory of
the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from relay.config.checks import contradictions, cross_references, named_files, secret_problems
from relay.config.credentials import Credential
from relay.config.errors import ConfigError, key_path
from relay.config.sections import Config, Profile, Upstream, User
from relay.config.values import Section

DEFAULT_CONFIG_PATH = Path("/etc/smtp-oauth-relay/config.yaml")


class _Cycle(Exception):
    """A mapping or list of the document contains itself, at ``path``."""

    def __init__(self, path: tuple[Any, ...]) -> None:
        self.path = path


def _absolutise(data: Any, base: Path, key: str = "", path: tuple[Any, ...] = (),
                within: frozenset[int] = frozenset()) -> Any:
    """Make every ``*_file`` / ``file`` value absolute relative to the config's directory.

    Raises :class:`_Cycle` for a YAML alias inside its own anchor (``a: &x {b: *x}``),
    which would otherwise recurse until the interpreter gives up.
    """
    if isinstance(data, dict | list):
        if id(data) in within:
            raise _Cycle(path)
        within = within | {id(data)}
    if isinstance(data, dict):
        return {k: _absolutise(v, base, str(k), (*path, k), within) for k, v in data.items()}
    if isinstance(data, list):
        return [_absolutise(v, base, key, (*path, i), within) for i, v in enumerate(data)]
    if isinstance(data, str) and (key in ("file", "directory") or key.endswith("_file")):
        p = Path(data).expanduser()
        return str(p if p.is_absolute() else base / p)
    return data


def parse_config(data: Any, source: str = "config", base_dir: Path | None = None,
                 check_secrets: bool = True, check_files: bool = True) -> Config:
    """Validate an already-loaded YAML document; raises :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [("", "the top level must be a mapping of sections")])
    if base_dir is not None:
        try:
            data = _absolutise(data, base_dir)
        except _Cycle as exc:
            raise ConfigError(source, [(key_path(exc.path), "contains itself (a YAML alias "
                                                        "inside its own anchor)")]) from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems: list[tuple[str, str]] = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling against config.example.yaml)"
            elif err["type"] in ("model_type", "dict_type") or _section_as_name(loc):
                loc = loc[:2] if _section_as_name(loc) else loc
                msg = _not_a_section(loc, err.get("input"))
            if (key_path(loc), msg) not in problems:
                problems.append((key_path(loc), msg))
        raise ConfigError(source, problems) from None
    problems = cross_references(cfg) + contradictions(cfg)
    if check_files:
        for path, file in named_files(cfg):
            if not file.is_file():
                problems.append((path, f"file {file} does not exist"))
    if check_secrets:
        problems += secret_problems(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


# The sections whose keys are names the user chose, and what each name stands for.
_NAMED: dict[str, tuple[str, type[Section]]] = {
    "users": ("user", User), "profiles": ("profile", Profile),
    "credentials": ("credential", Credential), "upstreams": ("upstream", Upstream)}


def _section_as_name(loc: tuple[Any, ...]) -> bool:
    """A section's name where a profile's (user's, ...) name goes (``profiles: routing:``):
    the section was indented one level too deep, whatever pydantic finds wrong inside."""
    return len(loc) >= 2 and str(loc[0]) in _NAMED and str(loc[1]) in Config.model_fields


def _not_a_section(loc: tuple[Any, ...], value: Any) -> str:
    """Settings were expected at ``loc`` and something else is there: most often a key
    indented one level too little or too much. The value itself is not shown: it may be
    a secret typed in the wrong place."""
    got = {str: "a text", int: "a number", float: "a number", bool: "true/false",
           list: "a list", type(None): "nothing"}.get(type(value), "something else")
    key = str(loc[-1])
    if len(loc) == 2 and str(loc[0]) in _NAMED:
        section = str(loc[0])
        kind, model = _NAMED[section]
        if key in model.model_fields:
            return (f"{key} is a setting of a {kind}, but here it stands where a {kind}'s name "
                    f"goes: indent it under the {kind} it belongs to "
                    f"({section}.<name>.{key})")
        if key in Config.model_fields:
            return (f"{key} is a section of its own, not a {kind}: move it to the start of "
                    "the line (no indentation)")
        return (f"expected the settings of {kind} {key!r} indented under it, got {got}")
    return f"expected settings indented under {key}, got {got}"


def load_config(path: Path | str, *, check_secrets: bool = True) -> Config:
    """Read and validate the YAML file at ``path``; raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), [("", "file not found (pass --config PATH)")]) from None
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        # PyYAML builds nested collections recursively: "[[[[..." a few thousand deep.
        raise ConfigError(str(p), [("", "invalid YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), [("", f"invalid YAML: {_yaml_problem(exc)}")]) from None
    if data is None:
        raise ConfigError(str(p), [("", "the file is empty (or holds only comments): start "
                                        "from config.example.yaml, which shows every setting")])
    return parse_config(data, str(p), p.resolve().parent, check_secrets=check_secrets)


# What PyYAML's problems mean in a hand-edited file, nearly always its indentation.
_YAML_PLAIN = {
    "but found '<block mapping start>'":
        "this line does not line up with the keys above it: the keys of one section start "
        "in the same column, and a key is indented deeper only under a key that ends with ':'",
    "but found '<block sequence start>'":
        "this list item ('- ') does not line up with the items above it, or is indented "
        "less than the key it belongs to",
    "but found '-'":
        "this list item ('- ') does not line up with the items above it, or is indented "
        "less than the key it belongs to",
    "mapping values are not allowed here":
        "a ':' the file cannot have here: this line is indented deeper than the line above, "
        "which already has its value, or the line above misses its ':' (a value holding "
        "': ' needs quotes)",
    "could not find expected ':'":
        "a line without its ':' (every setting is 'key: value'), or a line indented under a "
        "value",
    "that cannot start any token":
        "a character that cannot begin a value (quote the value)",
    "found unexpected end of stream":
        "a quote or bracket opened above is never closed",
}


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where, what it means in plain words, and PyYAML's own words (to search for)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    # One line: a ReaderError (a control character in the file) says where on a second.
    problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
    if "'\\t'" in problem:  # PyYAML shows the character as its repr
        return f"{where}a tab: YAML indents with spaces only (YAML parser: {problem})"
    plain = next((text for key, text in _YAML_PLAIN.items() if key in problem), None)
    if plain is None:
        return f"{where}{problem}"
    context = getattr(exc, "context_mark", None)
    if context is not None and "block" in str(getattr(exc, "context", "")):
        problem = f"the section begins on line {context.line + 1}; YAML parser: {problem}"
    else:
        problem = f"YAML parser: {problem}"
    return f"{where}{plain} ({problem})"
