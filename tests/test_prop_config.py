"""Properties of config loading: whatever the YAML, a Config or a ConfigError naming keys.

Documents are arbitrary YAML text (loaded through ``load_config``, as ``check`` and a
reload do), arbitrary YAML values, and mutations of config.example.yaml: a value replaced
by anything YAML can hold, a key deleted, an unknown key added. The outcome is a Config,
or a ConfigError in which every problem is a key path into the document (the key itself
or, for a missing setting, the place where it belongs) or names the whole document -
never another exception.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from relay.config import ConfigError, load_config, parse_config

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = yaml.safe_load((ROOT / "config.example.yaml").read_text())
SECTIONS = ["server", "users", "profiles", "routing", "spool", "delivery", "credentials",
            "upstreams", "logging", "http"]
# Problems about the document as a whole, which have no key path.
WHOLE = ("the top level must be a mapping", "invalid YAML", "cannot read", "file not found")
KEYS = st.one_of(st.sampled_from([*SECTIONS, "listeners", "address", "port", "tls",
                                  "mailbox", "credential", "sender_policy", "env", "file",
                                  "value", "profile", "rules"]),
                 st.text(max_size=8), st.integers(-2, 2))

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.text(max_size=12),
    st.sampled_from(["30s", "0", "-1", "5m", "1e400", "35MiB", "10 GB", "::1", "0.0.0.0",
                     "127.0.0.0/8", "a@b.c", "https://x", "starttls", "implicit", "reject",
                     "*", "..", "/nonexistent/file", "\x00", "$scrypt$x"]),
    st.dates(),
)
yaml_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(KEYS, children, max_size=3)),
    max_leaves=12)


def split_path(path: str) -> list[str]:
    """A problem's key path as its parts; a part may be a JSON string (relay.config.errors._key)."""
    parts: list[str] = []
    pos = 0
    decoder = json.JSONDecoder()
    while True:
        if path.startswith('"', pos):
            part, pos = decoder.raw_decode(path, pos)
        else:
            end = path.find(".", pos)
            end = len(path) if end < 0 else end
            part, pos = path[pos:end], end
        parts.append(part)
        if pos >= len(path):
            return parts
        assert path[pos] == ".", path
        pos += 1


def check_problems(error: ConfigError, data: Any) -> None:
    """Every problem names a key path into ``data``, or the document as a whole."""
    assert error.problems
    for path, message in error.problems:
        assert isinstance(path, str) and isinstance(message, str) and message
        assert path.isprintable() and message.isprintable(), (path, message)
        if not path:
            assert not isinstance(data, dict) or message.startswith(WHOLE), (path, message)
            continue
        if not isinstance(data, dict):
            continue                      # loaded from text; its tree is not at hand
        walk(data, split_path(path), path)


def walk(node: Any, parts: list[str], path: str) -> None:
    """Follow ``parts`` into ``node``; only the last may be missing (a required setting)."""
    i = 0
    while i < len(parts):
        if isinstance(node, dict):
            keys = {str(k): k for k in node}
            # A key may hold dots (profile names do): the longest match wins.
            for j in range(len(parts), i, -1):
                joined = ".".join(parts[i:j])
                if joined in keys:
                    node, i = node[keys[joined]], j
                    break
            else:
                assert i == len(parts) - 1, f"{path}: {parts[i]!r} is not in the document"
                return
        elif isinstance(node, list) and parts[i].isdigit() and int(parts[i]) < len(node):
            node, i = node[int(parts[i])], i + 1
        else:
            # pydantic's marker for a bad mapping key, or a value it took apart (a
            # network, a duration): the path ends there.
            assert parts[i] == "[key]" or i == len(parts) - 1 or not isinstance(
                node, dict | list), (path, parts[i])
            return


def parse(data: Any) -> None:
    try:
        config = parse_config(data, check_secrets=False, check_files=True)
    except ConfigError as exc:
        check_problems(exc, data)
        return
    assert config.server.listeners


@st.composite
def mutated_examples(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(EXAMPLE)
    for _ in range(draw(st.integers(1, 3))):
        # Walk down to some node, then change it.
        node: Any = data
        while True:
            if isinstance(node, dict) and node:
                key = draw(st.sampled_from(sorted(node, key=str)))
            elif isinstance(node, list) and node:
                key = draw(st.integers(0, len(node) - 1))
            else:
                break
            child = node[key]
            if not isinstance(child, dict | list) or draw(st.integers(0, 2)) == 0:
                action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
                if action == "replace":
                    node[key] = draw(yaml_values)
                elif action == "delete":
                    del node[key]
                elif isinstance(node, dict):
                    node[draw(KEYS)] = draw(yaml_values)
                else:
                    node.append(draw(yaml_values))
                break
            node = child
    return data


@given(mutated_examples())
@example({"server": {"listeners": [{"port": math.inf}]}})
@example({"users": {"bad name": {"password_hash": "x"}}})
@example({"server": {"relay_networks": [{"a": 1}]}})
@example({"": None, ".": None, "a b": {"\x1b[2J": 1}})     # keys a plain path cannot show
def test_mutated_example_config(data: dict[str, Any]) -> None:
    parse(data)


@given(st.one_of(yaml_values, st.dictionaries(st.sampled_from(SECTIONS), yaml_values)))
def test_arbitrary_yaml_values(data: Any) -> None:
    parse(data)


yaml_texts = st.one_of(
    st.text(alphabet="{}[]:,-&*!|>'\"#%@` \n\tabc01.?~=", max_size=60),
    yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True)),
    st.text(max_size=40),
)


@given(yaml_texts)
@example("server: &a {tls: *a}\n")                       # a mapping that contains itself
@example("profiles: &a [*a]\n")
@example("[" * 2000)                                      # deeper than the parser's stack
@example("server:\n  listeners: !!python/object:os.system {}\n")
@example("\x1f")                                         # a ReaderError, said on two lines
def test_arbitrary_yaml_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            config = load_config(path, check_secrets=False)
        except ConfigError as exc:
            check_problems(exc, text)
            return
    assert config.server.listeners
