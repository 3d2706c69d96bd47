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

from relay.config.checks import contradictions, cross_references, named_files, secret_refs
from relay.config.errors import ConfigError, key_path
from relay.config.sections import Config
from relay.core import secrets as secrets

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
        problems = []
        for err in exc.errors():
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting (check the spelling against config.example.yaml)"
            problems.append((key_path(err["loc"]), msg))
        raise ConfigError(source, problems) from None
    problems = cross_references(cfg) + contradictions(cfg)
    if check_files:
        for path, file in named_files(cfg):
            if not file.is_file():
                problems.append((path, f"file {file} does not exist"))
    if check_secrets:
        for path, ref in secret_refs(cfg):
            try:
                ref.resolve()
            except secrets.SecretSourceError as exc:
                problems.append((path, str(exc)))
    if problems:
        raise ConfigError(source, problems)
    return cfg


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
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        # One line: a ReaderError (a control character in the file) says where on a second.
        problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
        raise ConfigError(str(p), [("", f"invalid YAML: {where}{problem}")]) from None
    return parse_config(data, str(p), p.resolve().parent, check_secrets=check_secrets)
