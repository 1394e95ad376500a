"""The tree reads as the architecture: every import points the way docs/architecture.md says,
none reaches into another module's private names, and the service loads no verification or
plotting machinery."""

from __future__ import annotations

import subprocess
import sys

from wirestate.adapters.tools import layout


def test_every_module_belongs_to_a_part_and_every_part_has_modules() -> None:
    found = {name: layout.part_of(name) for name, _ in layout.modules()}
    assert [name for name, part in found.items() if part is None] == []
    assert set(found.values()) == {part for _, part in layout.PARTS}


def test_no_import_points_the_wrong_way() -> None:
    wrong = [
        f"{imp.importer}:{imp.line} imports {imp.name} ({src} may not import {dst})"
        for (src, dst), found in layout.edges().items()
        if dst not in layout.ALLOWED[src]
        for imp in found
    ]
    assert wrong == []


def test_the_rules_forbid_what_the_architecture_forbids() -> None:
    # The runtime never imports the verification kit, the models never the adapters, the
    # server and the client never each other or the tools.
    assert layout.ALLOWED["core"] == {"core"}
    assert "adapters/tools" not in layout.ALLOWED["adapters/server"]
    assert "adapters/client" not in layout.ALLOWED["adapters/server"]
    assert "adapters/server" not in layout.ALLOWED["adapters/client"]
    assert not {p for p in layout.ALLOWED["models"] if p.startswith("adapters")}
    assert all(
        "core/verify" not in allowed
        for part, allowed in layout.ALLOWED.items()
        if part not in ("core/verify", "adapters/tools", "testing")
    )


def test_no_module_imports_another_modules_private_names() -> None:
    private = [
        f"{imp.importer}:{imp.line} takes {', '.join(imp.private)} from {imp.name}"
        for name, path in layout.modules()
        for imp in layout.imports(name, path)
        if imp.private and imp.name != name
    ]
    assert private == []


def test_the_layout_check_sees_a_wrong_arrow_and_a_private_import(tmp_path: object) -> None:
    """The checker itself bites: a module that imports the tools and a private name."""
    import ast
    from pathlib import Path

    path = Path(str(tmp_path)) / "bad.py"
    path.write_text(
        "from wirestate.adapters.tools.cli import main\n"
        "from wirestate.core.hub import _private\n"
        "import wirestate.core.frames as frames\n"
        "frames._secret\n"
    )
    found = list(layout.imports("wirestate.adapters.server.bad", path))
    assert any(i.name == "wirestate.adapters.tools.cli" for i in found)
    assert ("_private",) in [i.private for i in found]
    assert ("_secret",) in [i.private for i in found]
    assert layout.part_of("wirestate.adapters.tools.cli") not in layout.ALLOWED["adapters/server"]
    assert ast  # the module parses what it is given, it does not import it


def test_the_service_loads_no_hypothesis_and_no_matplotlib() -> None:
    code = (
        "import sys\n"
        "import wirestate.adapters.server, wirestate.adapters.server.transports.websockets\n"
        "import wirestate.adapters.client\n"
        "print(sorted(m for m in ('hypothesis', 'matplotlib', 'wirestate.core.verify')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
