"""The package layout as data: which part of the tree each module belongs to, which parts may
import which, and what the code actually imports. ``tests/test_layout.py`` fails on an
import that points the wrong way or reaches into another module's private names, and the
docs generator draws docs/architecture.md's diagram from the same imports.

Rules it states:

* ``core`` (the runtime) imports only itself; ``core/verify`` (the verification kit) imports
  the runtime, which never imports it back.
* ``models`` imports only the core's vocabulary.
* ``adapters/server`` and its ``transports`` import the core, the models and each other (the
  service starts the websockets listener; the transports run the server's sessions);
  neither imports the client side or the tools.
* ``adapters/client`` imports the core and the models only: a client library does not carry
  the server.
* ``adapters/tools`` and ``testing`` may import everything above; nothing above imports
  them.
* No module imports a name starting with ``_`` from another wirestate module, nor reads one
  as an attribute of an imported wirestate module.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["ALLOWED", "PARTS", "Import", "edges", "imports", "mermaid", "modules", "part_of"]

#: The parts of the tree, longest prefix first.
PARTS: Final = (
    ("wirestate.core.verify", "core/verify"),
    ("wirestate.core", "core"),
    ("wirestate.models", "models"),
    ("wirestate.adapters.server.transports", "adapters/server/transports"),
    ("wirestate.adapters.server", "adapters/server"),
    ("wirestate.adapters.client", "adapters/client"),
    ("wirestate.adapters.tools", "adapters/tools"),
    ("wirestate.adapters", "adapters"),  # the folder's own (empty) package
    ("wirestate.testing", "testing"),
)

_EVERYTHING: Final = frozenset(part for _, part in PARTS)

#: part -> the parts it may import (itself always).
ALLOWED: Final[dict[str, frozenset[str]]] = {
    "core": frozenset({"core"}),
    "core/verify": frozenset({"core", "core/verify"}),
    "models": frozenset({"core", "models"}),
    "adapters/server": frozenset(
        {"core", "models", "adapters/server", "adapters/server/transports"}
    ),
    "adapters/server/transports": frozenset(
        {"core", "models", "adapters/server", "adapters/server/transports"}
    ),
    "adapters/client": frozenset({"core", "models", "adapters/client"}),
    "adapters/tools": _EVERYTHING - {"testing"},
    "testing": _EVERYTHING - {"adapters/tools"},
    "adapters": frozenset({"adapters"}),
}

_ROOTS: Final = ("wirestate.core", "wirestate.models", "wirestate.adapters", "wirestate.testing")


def part_of(module: str) -> str | None:
    """The part of the tree ``module`` belongs to, or None outside wirestate."""
    for prefix, part in PARTS:
        if module == prefix or module.startswith(prefix + "."):
            return part
    return None


def modules() -> Iterator[tuple[str, Path]]:
    """Every module of the installed wirestate packages, with its source file."""
    for root in _ROOTS:
        spec = importlib.util.find_spec(root)
        assert spec is not None, root
        assert spec.submodule_search_locations is not None, root
        init = spec.origin
        if init is not None:
            yield root, Path(init)
        for info in pkgutil.walk_packages(spec.submodule_search_locations, root + "."):
            found = importlib.util.find_spec(info.name)
            if found is not None and found.origin is not None:
                yield info.name, Path(found.origin)


@dataclass(frozen=True)
class Import:
    """One import of a wirestate module by another: ``name`` is the imported module, and
    ``private`` the private names taken from it (by ``from``, or read as attributes)."""

    importer: str
    name: str
    line: int
    private: tuple[str, ...] = ()
    lazy: bool = False  # inside a function: loaded only when that code runs


def _resolve(importer: str, node: ast.ImportFrom, package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(module: str, path: Path) -> Iterator[Import]:
    """The wirestate imports of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.name == "__init__.py"
    aliases: dict[str, str] = {}
    top_level = {id(n) for n in tree.body}
    typing_only: set[int] = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            typing_only.update(id(n) for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        lazy = id(node) not in top_level
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("wirestate."):
                    aliases[alias.asname or alias.name] = alias.name
                    yield Import(module, alias.name, node.lineno, lazy=lazy)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, package)
            if not target.startswith("wirestate."):
                continue
            private = tuple(a.name for a in node.names if a.name.startswith("_"))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if importlib.util.find_spec(target) is not None and _is_module(sub):
                    aliases[alias.asname or alias.name] = sub
                    yield Import(module, sub, node.lineno, lazy=lazy)
            yield Import(module, target, node.lineno, private, lazy)
    for attr in ast.walk(tree):
        if (
            isinstance(attr, ast.Attribute)
            and isinstance(attr.value, ast.Name)
            and attr.value.id in aliases
            and attr.attr.startswith("_")
            and not attr.attr.startswith("__")
        ):
            yield Import(module, aliases[attr.value.id], attr.lineno, (attr.attr,))


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def edges() -> dict[tuple[str, str], list[Import]]:
    """(importing part, imported part) -> the imports behind that arrow, between parts."""
    out: dict[tuple[str, str], list[Import]] = {}
    for module, path in modules():
        src = part_of(module)
        for imp in imports(module, path):
            dst = part_of(imp.name)
            if src is None or dst is None or src == dst:
                continue
            out.setdefault((src, dst), []).append(imp)
    return out


def mermaid() -> str:
    """The parts and the arrows between them, as a mermaid flowchart (dotted: only imports
    made lazily, inside a function)."""
    lines = ["```mermaid", "flowchart TD"]
    ids = {part: part.replace("/", "_") for _, part in PARTS}
    arrows = edges()
    drawn = {part for pair in arrows for part in pair}
    for _, part in PARTS:
        if part in drawn:
            lines.append(f'    {ids[part]}["{part}/"]')
    for (src, dst), found in sorted(arrows.items()):
        arrow = "-.->" if all(i.lazy for i in found) else "-->"
        lines.append(f"    {ids[src]} {arrow} {ids[dst]}")
    lines.append("```")
    return "\n".join(lines) + "\n"
