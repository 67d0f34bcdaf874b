"""Put report tables into README.md: every block between ``<!-- table:PATH -->`` and ``<!-- /table -->``
is replaced by the table of the ``summary.md`` at PATH (relative to the repository root), so README's
result tables are always generated from run outputs, never typed.

    python scripts/readme_tables.py            # rewrite README.md in place
    python scripts/readme_tables.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- table:(?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def table_of(summary: Path) -> str:
    """The markdown table lines of a report's summary.md (its first table)."""
    if not summary.is_file():
        raise SystemExit(f"readme_tables: {summary.relative_to(ROOT)} does not exist (run the report that makes it)")
    lines = summary.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + table_of(ROOT / m.group("path")) + m.group(4), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    old = readme.read_text(encoding="utf-8")
    new = render(old)
    if args.check:
        return int(new != old)
    readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
