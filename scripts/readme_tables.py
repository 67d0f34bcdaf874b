"""Put report tables into README.md and the docs pages: in README.md and every docs/**/*.md, each block
between ``<!-- table:PATH -->`` and ``<!-- /table -->`` is replaced by the table of the ``summary.md`` (or
other report markdown) at PATH, relative to the repository root, so the result tables are always
generated from run outputs, never typed.

    python scripts/readme_tables.py            # rewrite the pages in place
    python scripts/readme_tables.py --check    # exit 1 (naming the pages) if any is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from prune_ext.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- table:(?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every markdown page under docs/, in a stable order."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def table_of(summary: Path, root: Path = ROOT) -> str:
    """The markdown table lines of a report's summary.md (its first table)."""
    if not summary.is_file():
        raise SystemExit(f"readme_tables: {summary.relative_to(root)} does not exist (run the report that makes it)")
    lines = summary.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None:
        raise SystemExit(f"readme_tables: {summary.relative_to(root)} holds no table")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every table block regenerated from its source."""
    return BLOCK.sub(lambda m: m.group(1) + table_of(root / m.group("path"), root) + m.group(4), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    args = ap.parse_args()
    stale = []
    for page in pages():
        old = page.read_text(encoding="utf-8")
        new = render(old)
        if new == old:
            continue
        stale.append(page.relative_to(ROOT))
        if not args.check:
            atomic_write_text(page, new)
    if args.check and stale:
        print("readme_tables: out of date: " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
