"""core/ is pure: importing it loads no event loop, socket, thread or diagram machinery."""

import subprocess
import sys

# `threading` is not listed: the standard `logging` module (which transitions uses) imports it.
# The core starts no thread; the hook in shared/hooks greps for that.
FORBIDDEN = ("asyncio", "socket", "ssl", "selectors", "transitions.extensions", "websockets")


def test_importing_the_core_loads_no_io_modules() -> None:
    code = (
        "import sys\n"
        "import wirestate.core, wirestate.core.hub, wirestate.core.lifecycle\n"
        "import wirestate.core.verify.explore, wirestate.core.verify.checks\n"
        "import wirestate.core.verify.mutants\n"
        "import wirestate.core.breaker\n"
        f"print([m for m in {FORBIDDEN!r} if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
