"""Second moments C = E[k kᵀ] of the keys (inputs) of the edited MLP matrices, cached on disk.

Keys come from a local corpus — a ``.txt``, ``.jsonl`` or ``.json`` file, or a folder of them —
or, when no corpus is given, from text the model samples itself (nothing is downloaded).
Token streams are packed into sequences of ``seq_len`` tokens and processed ``batch_tokens`` at a
time, so memory is bounded whatever the model's context length; the forward pass stops after the
deepest module that is needed. Per-batch products are float32, running sums float64 (d² per
module: 19 MB for SmolLM2's d = 1536, 0.97 GB for Llama-2-7B's 11008); results are stored in float32 as
safetensors under the cache folder (argument, else ``$PRUNE_EXT_CACHE``, else
``~/.cache/prune_ext``), keyed by model (name and fingerprint), module, sample count, sequence
length and corpus content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from prune_ext.io import atomic_write

from .hooks import capture, stop_after
from .sampling import sample_tokens
from .models import editing_mode, get_module, model_fingerprint, model_id

__all__ = [
    "CORPUS_SUFFIXES",
    "KeyStatistics",
    "corpus_digest",
    "corpus_files",
    "default_cache_dir",
    "iter_corpus_texts",
    "key_statistics",
    "with_ridge",
]

log = logging.getLogger(__name__)

CORPUS_SUFFIXES = (".txt", ".jsonl", ".json")
_VERSION = 3  # 3: model samples drawn in batches sized by the KV cache (another token stream than 2's)
_TXT_PIECE_CHARS = 20_000
_SAMPLE_TOP_K = 50
_SAMPLE_KV_BUDGET = 1 << 30  # bytes of KV cache the sampler may hold
_SAMPLE_MAX_ROWS = 64


@dataclass
class KeyStatistics:
    """``mom2`` = E[k kᵀ] (float32, d × d) of the inputs of ``module`` over ``count`` tokens."""

    module: str
    mom2: torch.Tensor
    count: int
    cached: bool
    path: Path | None = None


def default_cache_dir() -> Path:
    """``$PRUNE_EXT_CACHE`` or ``~/.cache/prune_ext``."""
    env = os.environ.get("PRUNE_EXT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prune_ext"


# ---------------------------------------------------------------------------------------------
# corpus


def corpus_files(corpus: str | os.PathLike[str]) -> list[Path]:
    """The corpus files: the file itself, or the sorted .txt/.jsonl/.json files under a folder."""
    path = Path(corpus)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"corpus {path} does not exist")
    if not files:
        raise ValueError(f"corpus folder {path} holds no {'/'.join(CORPUS_SUFFIXES)} files")
    return files


def corpus_digest(corpus: str | os.PathLike[str] | None, seed: int = 0) -> str:
    """Hash of the corpus files' names and contents (or of the sampling recipe when ``None``)."""
    digest = hashlib.sha256()
    if corpus is None:
        digest.update(f"model-samples:v{_VERSION}:seed={seed}:top_k={_SAMPLE_TOP_K}".encode())
        return digest.hexdigest()[:16]
    root = Path(corpus)
    for file in corpus_files(corpus):
        digest.update(str(file.relative_to(root) if root.is_dir() else file.name).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _record_text(obj: Any) -> str:
    """The text of a JSON record: its ``text`` field, else all its strings joined by newlines."""
    if isinstance(obj, str):
        return obj
    if isinstance(obj, Mapping):
        if isinstance(obj.get("text"), str):
            return obj["text"]
        return "\n".join(t for t in (_record_text(v) for v in obj.values()) if t)
    if isinstance(obj, list):
        return "\n".join(t for t in (_record_text(v) for v in obj) if t)
    return ""


def _iter_txt(path: Path) -> Iterator[str]:
    """Paragraphs (blank-line separated) of a text file, cut at ~20k characters."""
    piece: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip() and piece:
                yield "".join(piece)
                piece, size = [], 0
                continue
            piece.append(line)
            size += len(line)
            if size >= _TXT_PIECE_CHARS:
                yield "".join(piece)
                piece, size = [], 0
    if piece:
        yield "".join(piece)


def iter_corpus_texts(corpus: str | os.PathLike[str]) -> Iterator[str]:
    """Stream the documents of a corpus (a .json list is read whole; the other formats stream)."""
    for file in corpus_files(corpus):
        if file.suffix == ".txt":
            yield from _iter_txt(file)
        elif file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield _record_text(json.loads(line))
        else:
            data = json.loads(file.read_text(encoding="utf-8"))
            yield from (_record_text(obj) for obj in (data if isinstance(data, list) else [data]))


# ---------------------------------------------------------------------------------------------
# token streams


def _pack(token_lists: Iterable[list[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate token lists and cut them into chunks of exactly ``seq_len`` (last one shorter)."""
    buffer: list[int] = []
    for ids in token_lists:
        buffer.extend(ids)
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]
    if buffer:
        yield buffer


def _corpus_token_lists(tokenizer: Any, corpus: str | os.PathLike[str]) -> Iterator[list[int]]:
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in iter_corpus_texts(corpus):
        if text.strip():
            ids = list(tokenizer(text, verbose=False)["input_ids"])
            yield ids + ([eos] if isinstance(eos, int) else [])


def _kv_bytes_per_token(model: nn.Module) -> int | None:
    """Bytes of KV cache one token takes in ``model`` (None if its config does not say)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str) -> int | None:
        return next((v for v in (getattr(config, n, None) for n in names) if isinstance(v, int) and v > 0), None)

    layers, heads = first("num_hidden_layers", "n_layer"), first("num_attention_heads", "n_head")
    hidden = first("hidden_size", "n_embd")
    if layers is None or heads is None or hidden is None:
        return None
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim") or hidden // heads
    return layers * 2 * kv_heads * head_dim * next(model.parameters()).element_size()


def sample_rows(model: nn.Module, seq_len: int, rows: int) -> int:
    """Sequences the sampler draws at once: as many as a 1 GiB KV cache holds, at most 64, and at
    least ``rows``. Each step costs a pass over the weights whatever the number of rows, so more rows
    are nearly free per token on a CPU (SmolLM2-135M at 256 tokens: 64 rows, 0.75 GB of cache)."""
    per_token = _kv_bytes_per_token(model)
    if per_token is None:
        return rows
    return max(rows, min(_SAMPLE_MAX_ROWS, _SAMPLE_KV_BUDGET // (per_token * seq_len)))


def _sampled_token_lists(
    model: nn.Module, tokenizer: Any, seq_len: int, rows: int, seed: int, n_tokens: int | None = None
) -> Iterator[list[int]]:
    """Sequences of ``seq_len`` tokens sampled from the model (top-k 50, temperature 1), ``rows`` at
    a time with a KV cache, each starting with BOS (or EOS); EOS is never drawn inside a sequence.
    Endless, or, with ``n_tokens``, just enough sequences for that many tokens (no batch sampled in
    vain). Deterministic for ``seed`` (and ``rows``, ``n_tokens``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = eos if isinstance(eos, int) else None
    start = bos if isinstance(bos, int) else eos if eos is not None else 0
    batch = 0
    left = None if n_tokens is None else -(-n_tokens // seq_len)  # sequences still needed
    while left is None or left > 0:
        seed_b = seed * 1_000_003 + batch
        n = rows if left is None else min(rows, left)
        out = sample_tokens(model, [start], n, seq_len - 1, top_k=_SAMPLE_TOP_K, seed=seed_b, banned=eos)
        yield from out.tolist()
        batch += 1
        if left is not None:
            left -= n


def _batches(chunks: Iterable[list[int]], rows: int) -> Iterator[list[list[int]]]:
    """Group chunks of equal length into lists of at most ``rows``."""
    group: list[list[int]] = []
    for chunk in chunks:
        if group and len(chunk) != len(group[0]):
            yield group
            group = []
        group.append(chunk)
        if len(group) == rows:
            yield group
            group = []
    if group:
        yield group


# ---------------------------------------------------------------------------------------------
# accumulation


def _ordered(model: nn.Module, names: Sequence[str]) -> list[str]:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    missing = [n for n in names if n not in order]
    if missing:
        raise ValueError(f"{type(model).__name__} has no module(s) {missing}")
    return sorted(set(names), key=order.__getitem__)


@torch.no_grad()
def _accumulate(
    model: nn.Module, names: Sequence[str], groups: Iterable[list[list[int]]], n_tokens: int, progress: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum k kᵀ over the first ``n_tokens`` tokens of ``groups`` for each module.

    Each batch's product is taken in float32 and the running sums are kept in float64.
    """
    sums: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    count = 0
    keys: dict[str, torch.Tensor] = {}
    modules = {name: get_module(model, name) for name in names}
    bar = tqdm(total=n_tokens, unit="tok", desc=f"key statistics ({len(names)} module(s))", disable=not progress)
    with editing_mode(model):
        for group in groups:
            take = min(sum(len(c) for c in group), n_tokens - count)
            input_ids = torch.tensor(group, dtype=torch.long, device=device)
            keys.clear()
            with ExitStack() as stack:
                for name in names:
                    stack.enter_context(capture(modules[name], lambda t, n=name: keys.__setitem__(n, t)))
                stack.enter_context(stop_after(modules[names[-1]]))
                model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
            for name in names:
                k = keys[name].reshape(-1, keys[name].shape[-1])[:take].to(torch.float32)
                sums[name] = sums.get(name, 0) + (k.T @ k).to(torch.float64)
            count += take
            bar.update(take)
            if count >= n_tokens:
                break
    bar.close()
    return sums, count


# ---------------------------------------------------------------------------------------------
# cache


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "model"


def _cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (
        cache_dir
        / "stats"
        / f"{_slug(key['model'])}__{_slug(key['module'])}__n{key['n_samples']}__{digest}.safetensors"
    )


def _load_cached(path: Path, key: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if json.loads(meta.get("key", "null")) != key:
                return None
            return handle.get_tensor("mom2"), int(meta["count"])
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable statistics cache %s (%s)", path, exc)
        return None


def _save(path: Path, key: dict[str, Any], mom2: torch.Tensor, count: int) -> None:
    with atomic_write(path) as tmp:
        save_file(
            {"mom2": mom2.contiguous().cpu()},
            str(tmp),
            metadata={"key": json.dumps(key, sort_keys=True), "count": str(count)},
        )


def key_statistics(
    model: nn.Module,
    tokenizer: Any,
    modules: str | Sequence[str],
    *,
    n_samples: int = 50_000,
    corpus: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    seq_len: int = 256,
    batch_tokens: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, KeyStatistics]:
    """E[k kᵀ] of the inputs of each named module, from the cache or from one shared pass.

    Args:
        modules: module name(s) whose inputs are the keys (e.g. ``model.layers.4.mlp.down_proj``).
        n_samples: number of key vectors (tokens).
        corpus: a .txt/.jsonl/.json file or a folder of them; ``None`` samples text from the model.
        cache_dir: cache folder (default :func:`default_cache_dir`).
        seq_len: tokens per sequence (capped by the model's maximum positions).
        batch_tokens: tokens per forward pass; bounds memory.
    """
    names = _ordered(model, [modules] if isinstance(modules, str) else list(modules))
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    seq_len = max(2, min(seq_len, max_pos or seq_len))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = {
        "version": _VERSION,
        "model": model_id(model),
        "fingerprint": model_fingerprint(model),
        "n_samples": int(n_samples),
        "seq_len": seq_len,
        "corpus": corpus_digest(corpus, seed),
    }
    result: dict[str, KeyStatistics] = {}
    for name in names:
        key = {**base, "module": name}
        path = _cache_path(root, key)
        hit = _load_cached(path, key)
        if hit is not None:
            result[name] = KeyStatistics(name, hit[0], hit[1], cached=True, path=path)
    todo = [n for n in names if n not in result]
    if not todo:
        return result
    rows = max(1, batch_tokens // seq_len)
    if corpus is None:
        chunks: Iterable[list[int]] = _sampled_token_lists(
            model, tokenizer, seq_len, sample_rows(model, seq_len, rows), seed, int(n_samples)
        )
    else:
        chunks = _pack(_corpus_token_lists(tokenizer, corpus), seq_len)
    sums, count = _accumulate(model, todo, _batches(chunks, rows), int(n_samples), progress)
    if count == 0:
        raise ValueError(f"corpus {corpus} yielded no tokens")
    if count < n_samples:
        log.warning("corpus %s holds only %d of the %d requested tokens", corpus, count, n_samples)
    for name in todo:
        key = {**base, "module": name}
        path = _cache_path(root, key)
        mom2 = (sums[name] / count).to(torch.float32)
        _save(path, key, mom2, count)
        result[name] = KeyStatistics(name, mom2, count, cached=False, path=path)
    return {name: result[name] for name in names}


def with_ridge(mom2: torch.Tensor, ridge: float) -> torch.Tensor:
    """``mom2 + ridge · mean(diag mom2) · I``: keeps solves well posed when few tokens were seen."""
    if ridge <= 0:
        return mom2
    scale = ridge * mom2.diagonal().mean().clamp_min(torch.finfo(mom2.dtype).tiny)
    return mom2 + scale * torch.eye(mom2.shape[0], dtype=mom2.dtype, device=mom2.device)
