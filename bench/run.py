"""Run one bench script by name, or list them.

    python bench/run.py                                # every script, with what it measures
    python bench/run.py NAME --data D --out O [...]    # bench/NAME.py (or bench/archive/NAME.py)

Every script takes the shared options of ``bench/common.py``: ``--data`` (default
``$CAPSEDGE_DATA``) and ``--out`` (without it, nothing is written). ``python bench/NAME.py``
runs a script directly, with the same options.
"""

from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def scripts(folder: Path = BENCH) -> dict[str, Path]:
    """The scripts of ``folder`` by name: its modules that run as a program (not common, not run)."""
    return {path.stem: path for path in sorted(folder.glob("*.py"))
            if path.stem != "run" and 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")}


def summary(path: Path) -> str:
    """The first line of a script's docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def find(name: str) -> Path | None:
    """The script called ``name``: a current one, else an archived one."""
    return scripts().get(name) or scripts(BENCH / "archive").get(name.removeprefix("archive/"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), end="\n\n")
        for title, folder in (("scripts", BENCH), ("archive (finished investigations)", BENCH / "archive")):
            print(f"{title}:")
            for name, path in scripts(folder).items():
                print(f"  {name:24} {summary(path)}")
        return
    path = find(argv[0])
    if path is None:
        sys.exit(f"bench: no script {argv[0]!r} (python bench/run.py lists them)")
    sys.argv = [str(path), *argv[1:]]
    sys.path[:0] = [str(path.parent), str(BENCH)]
    runpy.run_path(str(path), run_name="__main__")


if __name__ == "__main__":
    main()
