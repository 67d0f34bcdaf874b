"""The one atomic writer and the one JSON/JSONL reader of the package.

Every file the package writes (session checkpoints, key-statistics caches, traces, results, weights)
goes through :func:`atomic_write`: a temporary file in the same folder, flushed and fsynced, renamed
over the target, then the folder fsynced, so a kill at any moment leaves either the old file or the
new one, never a mix. Appending a line to a trace is done by rewriting it the same way (traces are
small); :func:`read_jsonl` drops a torn last line, with one warning, for files written by others.

Every JSON file the package writes is strict JSON (RFC 8259): a NaN or ±Inf float (a score not
computed, κ of a singular matrix) is written as ``null`` by :func:`json_text`, the one encoder, so
``jq``, browsers and ``json.loads(..., parse_constant=...)`` read every file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "append_jsonl", "atomic_write", "atomic_write_text", "atomic_write_with", "json_text", "read_json", "read_jsonl",
    "strict_json", "write_json",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory fds: the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Write the file under the yielded name (any writer that takes a path: ``safetensors``,
    ``torch.save``, ``open``). On an exception the temporary file is removed and ``path`` is left
    as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # whatever wrote it, make it durable before the rename
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets ordinary permissions
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically through ``write(file_object)``."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±Inf) replaced by ``None``, recursively through dicts,
    lists and tuples (tuples become lists); other values unchanged."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def json_text(obj: Any, *, indent: int | None = None) -> str:
    """``obj`` as strict JSON text: NaN and ±Inf become ``null`` (see the module docstring)."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """``obj`` as indented strict JSON (NaN, ±Inf → ``null``), atomically."""
    return atomic_write_text(path, json_text(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """One JSON document; a malformed file raises ``ValueError`` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def read_jsonl(path: str | os.PathLike[str], *, warn_torn: bool = True) -> list[Any]:
    """The records of a JSON-lines file. A last line that does not parse (a write cut short) is
    dropped with one warning; a malformed line elsewhere raises ``ValueError`` naming its number."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1 or all(not rest.strip() for rest in lines[i + 1 :]):
                if warn_torn:
                    warnings.warn(f"{path}: dropped a torn last line (an interrupted write)", stacklevel=2)
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({exc})") from exc
    return out


def append_jsonl(path: str | os.PathLike[str], record: Any) -> None:
    """Add one record (strict JSON, as :func:`json_text`) to a JSON-lines file, atomically (the whole
    file is rewritten: traces are small, and a kill mid-write must not leave a torn line)."""
    target = Path(path)
    old = target.read_text(encoding="utf-8") if target.exists() else ""
    if old and not old.endswith("\n"):  # a torn line from an older writer
        old = "".join(line + "\n" for line in old.splitlines()[:-1])
    atomic_write_text(target, old + json_text(record) + "\n")
