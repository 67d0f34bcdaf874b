"""Key statistics from the model's own samples: batch size from the KV cache, no wasted batch, determinism."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import gpt2_tokenizer, tiny_model

from prune_ext.editing import key_statistics
from prune_ext.editing.covariance import _sampled_token_lists, sample_rows


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def test_rows_follow_the_kv_cache_budget(tok):
    torch.set_num_threads(1)
    model = tiny_model("llama", tok)  # 4 layers x 2 kv heads x 16 dims: tiny cache, so the cap of 64 rows
    assert sample_rows(model, 256, 16) == 64
    assert sample_rows(model, 256, 100) == 100  # never fewer than the statistics batch
    big = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096),
                          parameters=lambda: iter([torch.zeros(1)]))  # Llama-2-7B, float32: 1 MiB per token
    assert sample_rows(big, 256, 16) == 16
    assert sample_rows(big, 64, 1) == 16  # 1 GiB / (64 tokens x 1 MiB)


def test_sampling_is_deterministic_and_stops_when_enough(tok, tmp_path):
    torch.set_num_threads(1)
    model = tiny_model("gpt2", tok)
    seqs = list(_sampled_token_lists(model, tok, 16, 8, seed=3, n_tokens=16 * 11 - 5))
    assert len(seqs) == 11 and all(len(s) == 16 for s in seqs)  # batches of 8 and 3
    assert seqs == list(_sampled_token_lists(model, tok, 16, 8, seed=3, n_tokens=16 * 11 - 5))
    assert seqs != list(_sampled_token_lists(model, tok, 16, 8, seed=4, n_tokens=16 * 11 - 5))
    name = "transformer.h.1.mlp.c_proj"
    a = key_statistics(model, tok, name, n_samples=700, seq_len=16, cache_dir=tmp_path / "a", progress=False)[name]
    b = key_statistics(model, tok, name, n_samples=700, seq_len=16, cache_dir=tmp_path / "b", progress=False)[name]
    assert a.count == b.count == 700 and not b.cached and torch.equal(a.mom2, b.mom2)
