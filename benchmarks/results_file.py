"""One owner for ``benchmarks/RESULTS.md``: each benchmark replaces its own ``## <title>`` section."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section that ``text`` opens (its first line, ``## <title>``),
    leaving every other section alone."""
    header = text.splitlines()[0]
    if not header.startswith("## "):
        raise ValueError(f"a results section must open with '## <title>', not {header!r}")
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(header)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", old) if pattern.search(old) else \
        old.rstrip("\n") + "\n\n" + text
    path.write_text(new)
