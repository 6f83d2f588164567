"""The package's shape: the library never imports the research harness, and no module grows past a page count
a reader can hold."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import ppn

ROOT = Path(ppn.__file__).parent
MAX_LINES = 420


def _modules(harness: bool) -> list[str]:
    names = [m.name for m in pkgutil.walk_packages([str(ROOT)], "ppn.")]
    return sorted(n for n in names if n.startswith("ppn.harness") == harness)


def test_the_library_never_imports_the_harness():
    core = [m for m in _modules(harness=False) if m != "ppn.cli"]  # the CLI is a front end to both
    code = ("import sys\n" + "".join(f"import {m}\n" for m in core)
            + "print(sorted(m for m in sys.modules if m.startswith('ppn.harness')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent).stdout.strip()
    assert out == "[]"
    assert len(core) > 15 and len(_modules(harness=True)) > 5


def test_no_module_is_longer_than_a_reader_can_hold():
    lengths = {p.relative_to(ROOT.parent).as_posix(): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert {p: n for p, n in lengths.items() if n > MAX_LINES} == {}


def test_the_readme_is_a_guide_not_a_notebook():
    """At most 12,000 bytes (UTF-8), and every local link in it resolves."""
    import re

    readme = (ROOT.parent / "README.md").read_text()
    assert len(readme.encode()) <= 12_000
    links = [t for t in re.findall(r"\]\(([^)#]+)\)", readme) if "://" not in t]
    assert links and [t for t in links if not (ROOT.parent / t).exists()] == []
