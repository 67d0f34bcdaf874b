"""EasyEdit ROME / MEMIT / AlphaEdit YAML files → prune_ext hyper-parameter overrides."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from prune_ext.cli import main
from prune_ext.editing import AlphaEditHyperParams, MemitHyperParams, RomeHyperParams, make_editor
from prune_ext.editing.easyedit import (
    CHECKED,
    FIELD_MAP,
    IGNORED,
    PLACEMENT,
    HParamsError,
    easyedit_settings,
    read_easyedit_hparams,
)

# modelled on EasyEdit's hparams/ROME/llama-7b.yaml, hparams/MEMIT/gpt2-xl.yaml, hparams/AlphaEdit/llama3-8b.yaml,
# with the layers and depth of the tiny test models (4 layers)
ROME_LLAMA = """
alg_name: "ROME"
model_name: "./hugging_cache/llama-2-7b-chat"
stats_dir: "./data/stats"
device: 0
layers: [2]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 3
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
# fp16: true
"""

MEMIT_GPT2 = """
alg_name: "MEMIT"
model_name: "./hugging_cache/gpt2-xl"
stats_dir: "./data/stats"
device: 0
layers: [1, 2, 3]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 3
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 20000
rewrite_module_tmp: "transformer.h.{}.mlp.c_proj"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "transformer.wte"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
"""

ALPHAEDIT_LLAMA = """
alg_name: "AlphaEdit"
model_name: "./hugging_cache/llama-3-8b-instruct"
stats_dir: "./data/stats"
# the projection matrix P may have been downloaded beforehand
P_loc: "./null_space_project.pt"
device: 0
layers: [0, 1, 2]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 1e-1
v_loss_layer: 3
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
nullspace_threshold: 2e-2
L2: 1
"""


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_model("llama", tok)


def _yaml(tmp_path, text: str, name: str = "hp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_rome_file(tmp_path, tok, llama):
    method, hp = read_easyedit_hparams(_yaml(tmp_path, ROME_LLAMA), "rome")
    assert method == "rome"
    assert hp == {
        "layer": 2, "module_template": "model.layers.{}.mlp.down_proj", "v_num_grad_steps": 25, "v_lr": 0.5,
        "v_weight_decay": 1e-3, "clamp_norm_factor": 4.0, "kl_factor": 0.0625, "mom2_adjustment": False,
        "mom2_n_samples": 100000, "context_lengths": [[5, 10], [10, 10]],
    }
    assert json.loads(json.dumps(hp)) == hp  # survives a run's config.json unchanged
    with pytest.warns(UserWarning, match="device cuda:0 ignored: the model given is on cpu"):  # never silent
        editor = make_editor(llama, tok, "rome", _yaml(tmp_path, ROME_LLAMA), progress=False)  # a path as hparams=
    assert isinstance(editor.hparams, RomeHyperParams)
    assert editor.hparams.layer == 2 and editor.hparams.v_lr == 0.5 and not editor.hparams.mom2_adjustment
    assert editor.hparams.module_name == "model.layers.2.mlp.down_proj"


def test_memit_and_alphaedit_files(tmp_path, tok):
    model = tiny_model("gpt2", tok)
    with pytest.warns(UserWarning, match="device cuda:0 ignored"):
        method, hp = read_easyedit_hparams(_yaml(tmp_path, MEMIT_GPT2), model=model)
    assert method == "memit"
    assert hp["layers"] == [1, 2, 3] and hp["block_template"] == "transformer.h.{}"
    assert hp["mom2_update_weight"] == 20000.0 and hp["clamp_norm_factor"] == 0.75 and hp["v_weight_decay"] == 0.5
    editor = make_editor(model, tok, "memit", hp, progress=False)
    assert isinstance(editor.hparams, MemitHyperParams) and editor.hparams.z_block_name == "transformer.h.3"
    method, hp = read_easyedit_hparams(_yaml(tmp_path, ALPHAEDIT_LLAMA), "alphaedit")
    assert method == "alphaedit"
    assert hp["nullspace_threshold"] == 0.02 and hp["l2"] == 1.0 and hp["layers"] == [0, 1, 2]
    assert hp["v_lr"] == 0.1 and "P_loc" not in hp
    llama = tiny_model("llama", tok)
    editor = make_editor(llama, tok, "alphaedit", hp, progress=False)  # every mapped name is a field
    assert isinstance(editor.hparams, AlphaEditHyperParams) and editor.hparams.l2 == 1.0


def test_every_easyedit_field_is_mapped_checked_or_ignored():
    # the fields of EasyEdit's ROMEHyperParams, MEMITHyperParams and AlphaEditHyperParams dataclasses
    rome = {"layers", "fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "clamp_norm_factor",
            "kl_factor", "mom2_adjustment", "context_template_length_params", "rewrite_module_tmp",
            "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "mom2_dataset",
            "mom2_n_samples", "mom2_dtype", "alg_name", "device", "model_name", "stats_dir", "max_length",
            "model_parallel", "fp16"}
    memit = (rome - {"context_template_length_params", "fp16"}) | {"layer_selection", "mom2_update_weight"}
    alpha = memit | {"nullspace_threshold", "L2", "P_loc"}
    for method, fields in (("rome", rome), ("memit", memit), ("alphaedit", alpha)):
        known = set(FIELD_MAP[method]) | set(CHECKED) | set(IGNORED) | set(PLACEMENT)
        assert fields <= known, (method, fields - known)


@pytest.mark.parametrize(("change", "message"), [
    ({"alg_name": "MEND"}, "alg_name"),
    ({"alg_name": "MEMIT"}, "does not match the editor 'rome'"),
    ({"layers": [2, 3]}, "edits one layer"),
    ({"fact_token": "last"}, "fact_token"),
    ({"v_lr": "fast"}, "v_lr: expected a number"),
    ({"v_num_grad_steps": 2.5}, "whole number"),
    ({"mom2_adjustment": "yes"}, "mom2_adjustment"),
    ({"rewrite_module_tmp": "model.layers.mlp"}, "rewrite_module_tmp"),
    ({"mlp_module_tmp": "model.layers.{}.attn"}, "mlp_module_tmp"),
    ({"v_loss_layer": 1}, "below the edited layer"),
    ({"v_loss_layer": 31}, "model's last layer is 3"),
    ({"layers": [7]}, "do not exist"),
    ({"rewrite_module_tmp": "model.layers.{}.mlp.up"}, "no module model.layers.2.mlp.up"),
    ({"nullspace_threshold": 0.02}, "nullspace_threshold"),
    ({"some_new_knob": 1, "batch_size": 4}, "batch_size, some_new_knob"),
])
def test_unsupported_fields_and_values_are_named(tmp_path, llama, change, message):
    lines = [line for line in textwrap.dedent(ROME_LLAMA).splitlines() if line.split(":")[0] not in change]
    text = "\n".join(lines + [f"{k}: {json.dumps(v)}" for k, v in change.items()])
    with pytest.raises(HParamsError, match=message) as exc:
        read_easyedit_hparams(_yaml(tmp_path, text), "rome", model=llama)
    assert "\n" not in str(exc.value)


def test_run_reads_hparams_file(tmp_path, tok, llama, capsys, monkeypatch):
    """--hparams is parsed before the run starts: its errors are one line, its values reach config.json."""
    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "model"
    llama.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    bad = _yaml(tmp_path, ROME_LLAMA.replace("v_loss_layer: 3", "v_loss_layer: 31"), "bad.yaml")
    capsys.readouterr()
    assert main(["run", "--model", str(model_dir), "--hparams", str(bad), "--device", "cpu", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prune-ext: error:") and "v_loss_layer" in err and "\n" not in err
    memit = _yaml(tmp_path, MEMIT_GPT2, "memit.yaml")
    assert main(["run", "--model", "smollm2-135m", "--editor", "rome", "--hparams", str(memit), "--out", "x"]) == 2
    assert "does not match the editor 'rome'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a good file: the overrides reach the run's settings (the run itself is not started here)
    seen = {}

    def fake_run(config):
        seen["config"] = config
        return {"edits": 0}

    monkeypatch.setattr("prune_ext.experiment.run_experiment", fake_run)
    good = _yaml(tmp_path, ROME_LLAMA, "good.yaml")
    assert main(["run", "--model", str(model_dir), "--hparams", str(good), "--device", "cpu", "--out", "x"]) == 0
    hp = seen["config"].hparams
    assert hp["v_num_grad_steps"] == 25 and hp["layer"] == 2 and hp["context_lengths"] == [[5, 10], [10, 10]]


def _settings_yaml(tmp_path, text: str, **fields) -> Path:
    lines = [line for line in textwrap.dedent(text).splitlines() if line.split(":")[0] not in fields]
    return _yaml(tmp_path, "\n".join(lines + [f"{k}: {json.dumps(v)}" for k, v in fields.items()]), "settings.yaml")


def test_alg_name_picks_the_editor_and_device_fp16_are_honoured_or_refused(tmp_path, tok, llama, capsys,
                                                                         monkeypatch):
    """An EasyEdit file's alg_name selects the editor when --editor is not given; device and fp16 set the
    placement unless the command line does (it wins); a CUDA device without CUDA is one line, not ignored."""
    monkeypatch.chdir(tmp_path)
    model_dir = tmp_path / "model"
    llama.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    seen = []

    def fake_run(config):
        seen.append(config)
        return {"edits": 0}

    monkeypatch.setattr("prune_ext.experiment.run_experiment", fake_run)
    alpha = _settings_yaml(tmp_path, ALPHAEDIT_LLAMA, device="cpu", fp16=True)
    assert easyedit_settings(alpha).editor == "alphaedit"
    assert main(["run", "--model", str(model_dir), "--hparams", str(alpha), "--batch-size", "2", "--out", "x"]) == 0
    config = seen[-1]
    assert config.editor == "alphaedit" and config.hparams["l2"] == 1.0  # the file chose the editor
    assert config.device == "cpu" and config.dtype == "float16"  # and the placement
    assert "dtype float16 (from fp16" in capsys.readouterr().out
    # the command line wins over the file: its dtype, and its editor settings on top of the file's
    argv = ["run", "--model", str(model_dir), "--hparams", str(alpha), "--dtype", "bfloat16", "--batch-size", "2",
            "--norm-constraint", "3", "--mpes", "--out", "x"]
    assert main(argv) == 0
    config = seen[-1]
    assert config.dtype == "bfloat16" and config.hparams["norm_constraint"] == 3.0 and config.hparams["mpes"]
    assert config.hparams["nullspace_threshold"] == 0.02  # the file's values stay
    # device: 0 on a torch without CUDA: refused with one line naming the way out
    cuda = _settings_yaml(tmp_path, ROME_LLAMA, device=0)
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(["run", "--model", str(model_dir), "--hparams", str(cuda), "--out", "x"]) == 2
        err = capsys.readouterr().err.strip()
        assert "asks for cuda:0" in err and "--device cpu" in err and "\n" not in err
    assert main(["run", "--model", str(model_dir), "--hparams", str(cuda), "--device", "cpu", "--out", "x"]) == 0
    assert seen[-1].device == "cpu" and seen[-1].editor == "rome" and seen[-1].dtype == "float32"
    for bad, message in (({"device": [0]}, "device: expected"), ({"fp16": "yes"}, "fp16: expected true or false")):
        path = _settings_yaml(tmp_path, ROME_LLAMA, **bad)
        with pytest.raises(HParamsError, match=message):
            easyedit_settings(path)
    assert easyedit_settings(_yaml(tmp_path, "v_lr: 0.1\n", "ours.yaml")) is None  # our own field names
    assert not (tmp_path / "x").exists()
