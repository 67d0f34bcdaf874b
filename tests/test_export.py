"""A run's edits as artifacts: a PEFT LoRA adapter that reproduces the edited model, and a full HF folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import matrix_with_spectrum
from safetensors.torch import save_file
from tiny_models import gpt2_tokenizer, tiny_model

from prune_ext.cli import main
from prune_ext.editing import load_model
from prune_ext.export import EXPORT_INFO, RUN_WEIGHTS, ExportError, export_hf, export_lora, read_run

peft = pytest.importorskip("peft")

HPARAMS = {"mom2_n_samples": 3_000, "stats_seq_len": 32, "v_weight_decay": 1e-3, "v_num_grad_steps": 6}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def _model_dir(tok, arch: str, folder: Path) -> Path:
    tiny_model(arch, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write_run(folder: Path, model: str, weights: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True)
    settings = {"out": str(folder), "model": model, "restrain": "log", "unrestrained_out": None, **config}
    (folder / "config.json").write_text(json.dumps(settings))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / RUN_WEIGHTS))
    return folder


@pytest.fixture(scope="module")
def gpt2_run(tok, tmp_path_factory):
    """A real run on a tiny GPT-2 (Conv1D): three ROME edits through the session, restrained weights."""
    from prune_ext.editing import EditRequest
    from prune_ext.session import EditingSession

    root = tmp_path_factory.mktemp("gpt2-run")
    model_dir = _model_dir(tok, "gpt2", root / "model")
    model, _ = load_model(str(model_dir))
    session = EditingSession(model, tok, "rome", HPARAMS, cov_cache_dir=root / "stats", progress=False)
    for s, t in [("Alice Smith", "Paris"), ("Bob Jones", "Tokyo"), ("Carol White", "Berlin")]:
        session.edit(EditRequest(f"The home town of {s}", s, t))
    weights = {f"{k}.weight": v for k, v in session.weights(restrained=True).items()}
    ranks = {k: d.delta_rank for k, d in session.diagnostics().items()}
    return _write_run(root / "run", str(model_dir), weights), ranks


@pytest.fixture(scope="module")
def llama_run(tok, tmp_path_factory):
    """A Llama run with edits of different ranks in two layers (so PEFT needs a rank pattern)."""
    root = tmp_path_factory.mktemp("llama-run")
    model_dir = _model_dir(tok, "llama", root / "model")
    model, _ = load_model(str(model_dir))
    weights, ranks = {}, {}
    for layer, rank in ((1, 3), (2, 5)):
        name = f"model.layers.{layer}.mlp.down_proj"
        w = model.get_submodule(name).weight.detach()
        sigma = torch.linspace(2.0, 0.5, rank, dtype=torch.float64)
        weights[f"{name}.weight"] = w + matrix_with_spectrum(*w.shape, sigma, seed=layer)
        ranks[name] = rank
    return _write_run(root / "run", str(model_dir), weights), ranks


def _edited(run: Path):
    config = json.loads((run / "config.json").read_text())
    model, _ = load_model(config["model"])
    _, weights, _ = read_run(run)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_parameter(name).copy_(w)
    return model


def _logits(model, tok) -> torch.Tensor:
    ids = tok(["The home town of Alice Smith is", "Bob Jones lives in the city of"], return_tensors="pt",
              padding=True) if tok.pad_token else None
    if ids is None:
        tok.pad_token = tok.eos_token
        return _logits(model, tok)
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_lora_reproduces_the_edited_model(which, gpt2_run, llama_run, tok, tmp_path):
    from peft import PeftModel

    run, ranks = gpt2_run if which == "gpt2" else llama_run
    out = tmp_path / "lora"
    assert main(["export", str(run), "--lora", str(out), "--restrained"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] == (which == "gpt2") and cfg["peft_type"] == "LORA"
    # scaling 1 everywhere; the exported ranks are the ledger's (or the synthetic edits') ranks
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["ranks"] == ranks and info["restrained"]
    for name, r in ranks.items():
        assert cfg["rank_pattern"].get(name, cfg["r"]) == r
        assert cfg["alpha_pattern"].get(name, cfg["lora_alpha"]) == r
    if which == "llama":
        assert cfg["rank_pattern"]  # two ranks: a pattern is needed

    edited = _edited(run)
    want = _logits(edited, tok)
    base, _ = load_model(json.loads((run / "config.json").read_text())["model"])
    plain = _logits(base, tok)
    model = PeftModel.from_pretrained(base, out)
    got = _logits(model, tok)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale  # float32 rounding
    assert (plain - want).abs().max().item() > 1e-2 * scale  # the edit matters, so the test can fail
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, tok), plain, rtol=0, atol=0)
    merged = model.merge_and_unload()
    for name in ranks:
        w, ref = merged.get_parameter(f"{name}.weight"), edited.get_parameter(f"{name}.weight")
        assert (w - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


def test_hf_folder_loads_with_the_edited_weights(llama_run, tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = llama_run
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    AutoTokenizer.from_pretrained(out, local_files_only=True)
    edited = _edited(run)
    for name, p in edited.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert list(out.glob("*.safetensors")) and json.loads((out / EXPORT_INFO).read_text())["restrained"]


def test_restrained_flags_check_what_the_run_holds(llama_run, tmp_path):
    run, _ = llama_run
    _, weights, _ = read_run(run)
    with pytest.raises(ExportError, match="holds the restrained weights"):
        export_lora(run, tmp_path / "x", restrained=False)
    plain = _write_run(tmp_path / "plain", json.loads((run / "config.json").read_text())["model"], weights,
                       out=str(tmp_path / "prune"), unrestrained_out=str(tmp_path / "plain"))
    assert read_run(plain)[2] is False and read_run(plain, restrained=False)[2] is False
    with pytest.raises(ExportError, match="unrestrained_out"):
        export_hf(plain, tmp_path / "y", restrained=True)
    none = _write_run(tmp_path / "none", "m", weights, restrain="none")
    with pytest.raises(ExportError, match="restrain='none'"):
        read_run(none, restrained=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize(("case", "message"), [
    ("no-config", "not a prune-ext run folder"),
    ("no-weights", "no weights.safetensors"),
    ("out-exists", "already exists"),
    ("not-a-param", "is not a parameter"),
    ("unchanged", "no edit to export"),
    ("both-flags", None),
])
def test_bad_runs_one_line_and_nothing_written(case, message, llama_run, tmp_path, capsys):
    run, _ = llama_run
    out = tmp_path / "out"
    argv = ["export", str(run), "--lora", str(out)]
    model = json.loads((run / "config.json").read_text())["model"]
    if case == "no-config":
        argv[1] = str(tmp_path)
    elif case == "no-weights":
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "config.json").write_text(json.dumps({"model": model}))
        argv[1] = str(tmp_path / "r")
    elif case == "out-exists":
        out.mkdir()
    elif case == "not-a-param":
        argv[1] = str(_write_run(tmp_path / "r", model, {"model.layers.9.mlp.down_proj.weight": torch.zeros(2, 2)}))
    elif case == "unchanged":
        base, _ = load_model(model)
        name = "model.layers.1.mlp.down_proj.weight"
        argv[1] = str(_write_run(tmp_path / "r", model, {name: base.get_parameter(name).detach()}))
    elif case == "both-flags":
        argv += ["--restrained", "--unrestrained"]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    if message is None:  # argparse's own error
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        return
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (transformers may draw a loading bar first)
    assert err[-1].startswith("prune-ext: error:") and message in err[-1], err
    assert not any("Traceback" in line or "prune-ext" in line for line in err[:-1]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_smollm2_exports(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = load_model("smollm2-135m")
    name = "model.layers.4.mlp.down_proj"
    w = model.get_submodule(name).weight.detach().clone()
    edit = w + matrix_with_spectrum(*w.shape, torch.tensor([30.0, 10.0], dtype=torch.float64), seed=0)
    run = _write_run(tmp_path / "run", "smollm2-135m", {f"{name}.weight": edit})
    assert main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = tok("The capital of Japan is", return_tensors="pt")
    with torch.no_grad():
        model.get_parameter(f"{name}.weight").copy_(edit)
        want = model(**ids).logits
        torch.testing.assert_close(loaded(**ids).logits, want, rtol=0, atol=0)
        model.get_parameter(f"{name}.weight").copy_(w)
    assert main(["export", str(run), "--lora", str(tmp_path / "lora")]) == 0
    lora = PeftModel.from_pretrained(model, tmp_path / "lora")
    with torch.no_grad():
        got = lora(**ids).logits
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert json.loads((tmp_path / "lora" / EXPORT_INFO).read_text())["ranks"] == {name: 2}
