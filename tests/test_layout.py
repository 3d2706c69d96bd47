"""The package layout's rules, checked on the source: dependencies point one way, no import
circles, every module says what it is, and none outgrows one job.

    core <- config <- stages (accept, spool, receive, oauth, deliver, queue) <- ops <- app <- cli

A stage may use the stages below it in the flow of a message and nothing above: receive
hands messages to the spool but knows nothing of the queue, the queue uses the deliverer
but not the receiving side, and no stage imports the app, the ops side or the command line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "relay"

STAGES = {"accept", "spool", "receive", "oauth", "deliver", "queue"}
# What each part of relay/ may import from the others ("relay" is the package itself,
# for __version__). Everything may import its own part.
ALLOWED: dict[str, set[str]] = {
    "relay": set(),
    "core": {"relay"},
    "config": {"relay", "core"},
    "accept": {"relay", "core", "config"},
    "spool": {"relay", "core", "config", "accept"},
    "receive": {"relay", "core", "config", "accept", "spool"},
    "oauth": {"relay", "core", "config"},
    "deliver": {"relay", "core", "config", "oauth"},
    "queue": {"relay", "core", "config", "accept", "spool", "deliver"},
    # The stand-ins for Entra ID and Exchange Online, beside the stages.
    "sandbox": {"relay", "core", "config", "oauth"},
    "ops": {"relay", "core", "config", "sandbox", *STAGES},
    "app": {"relay", "core", "config", "ops", *STAGES},
    "cli": {"relay", "core", "config", "ops", "app", "sandbox", *STAGES},
    # Entry points.
    "__main__": {"cli"},
    "healthcheck": {"ops"},
}


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "relay"


def imports(path: Path, module: str) -> Iterator[str]:
    """The relay modules ``path`` imports (at any depth of the file, TYPE_CHECKING too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "relay" or alias.name.startswith("relay."):
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base == "relay" or base.startswith("relay."):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    yield sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() \
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base


def test_dependencies_point_one_way() -> None:
    wrong = []
    for module, path in modules():
        part = part_of(module)
        assert part in ALLOWED, f"{module}: {part} is not in the layout (tests/test_layout.py)"
        for target in imports(path, module):
            other = part_of(target)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {}
    known = dict(modules())
    for module, path in known.items():
        graph[module] = {t for t in imports(path, module) if t in known and t != module}
    # A circle through a package's __init__ and its own modules is how packages work.
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in graph[node]:
            if state.get(target) == 1:
                circle = stack[stack.index(target):]
                if not all(m == target or m.startswith(target + ".") for m in circle):
                    circles.append([*circle, target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_every_module_says_what_it_is() -> None:
    """Every module opens with a docstring (its synopsis and the why)."""
    missing = [module for module, path in modules()
               if ast.get_docstring(ast.parse(path.read_text())) is None]
    assert not missing, f"modules without a docstring: {missing}"


# A module past this many lines is doing more than one job: split it by job, as the
# queue, the spool, the token providers and the upstream session were. The sandbox's
# stand-ins for Entra ID and Exchange Online are test equipment, not the relay.
MAX_LINES = 400
LONG_ALLOWED = ("relay.sandbox",)


def test_no_module_outgrows_one_job() -> None:
    long = {module: n for module, path in modules()
            if not module.startswith(LONG_ALLOWED)
            and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_a_relay_without_certificates_never_loads_cryptography() -> None:
    """cryptography is several MiB resident (a sixth of the relay at start): only a
    certificate credential or a TLS listener needs it, and they import it when used."""
    code = ("import sys, relay.cli, relay.app, relay.cli.run; "
            "print(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
