"""The package boundary: what ``import diffusers_block`` pulls in, the extras, the diffusers range, one version."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffusers_block
from diffusers_block import _compat, _extras

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Packages of the extras: the core must never import them itself.
EXTRA_PACKAGES = {
    "gradio",
    "matplotlib",
    "accelerate",
    "sklearn",
    "metaworld",
    "gymnasium",
    "mujoco",
    "transformers",
    "peft",
    "cache_dit",
    "tqdm",
    "PIL",
    "playwright",
}
# Third-party packages the core may add to what diffusers and torch load themselves.
CORE_PACKAGES = {"diffusers_block", "triton", "safetensors", "numpy"}

_LIST_MODULES = "import json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"


def _top_level_modules(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\n{_LIST_MODULES}"], capture_output=True, text=True, env=env, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_core_import_pulls_in_no_extra():
    # diffusers imports transformers, accelerate, peft, tqdm... itself where they are installed: the baseline is what
    # torch and diffusers load with the diffusers objects the core uses, and the core may add only its own packages.
    baseline = _top_level_modules(
        "import torch, diffusers, diffusers.hooks\nfrom diffusers import DiffusionPipeline, ModelMixin"
    )
    core = _top_level_modules("import diffusers_block")
    added = core - baseline - set(sys.stdlib_module_names)
    added = {name for name in added if not name.startswith("_")}  # C extension helpers of stdlib or numpy
    assert not added & EXTRA_PACKAGES, f"import diffusers_block imports extras: {sorted(added & EXTRA_PACKAGES)}"
    assert added <= CORE_PACKAGES, f"import diffusers_block imports packages outside the core: {sorted(added)}"


def test_core_dependencies_are_the_library_only():
    names = {
        dep.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip()
        for dep in PYPROJECT["project"]["dependencies"]
    }
    assert names == {"torch", "diffusers", "safetensors", "numpy", "triton"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras) == set(_extras.EXTRAS)  # every extra the errors can name exists, and is described
    assert any(dep.startswith("scikit-learn") for dep in extras["train"])


def test_diffusers_pin_is_the_range_checked_at_import():
    pinned = [dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("diffusers")]
    assert pinned == [f"diffusers{_compat.DIFFUSERS_SPEC}"]
    import diffusers

    _compat.check_diffusers(diffusers.__version__)  # the installed (tested) one passes


@pytest.mark.parametrize("version", ["0.41.2", "0.43.0", "0.43.0.dev0", "1.0.0", "unknown"])
def test_untested_diffusers_is_refused_with_the_fix(version):
    with pytest.raises(ImportError) as error:
        _compat.check_diffusers(version, environ={})
    message = str(error.value)
    assert f"diffusers {version} is installed" in message
    assert f'pip install "diffusers{_compat.DIFFUSERS_SPEC}"' in message
    _compat.check_diffusers(version, environ={"DIFFUSERS_BLOCK_SKIP_VERSION_CHECK": "1"})


def test_import_refuses_an_untested_diffusers():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DIFFUSERS_BLOCK_SKIP_VERSION_CHECK", None)
    code = "import diffusers\ndiffusers.__version__ = '0.43.0'\nimport diffusers_block"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "ImportError: diffusers-block supports diffusers >=0.42,<0.43" in out.stderr


@pytest.mark.parametrize("version", ["0.42.0", "0.42.1", "0.42.0.dev0"])
def test_tested_diffusers_imports(version):
    _compat.check_diffusers(version, environ={})


def test_a_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import fails as if scikit-learn were absent
    from diffusers_block.data import digits

    with pytest.raises(_extras.MissingExtraError, match=r'pip install "diffusers-block\[train\]"'):
        digits._raw_digits.__wrapped__()
    with pytest.raises(ValueError, match="unknown extra"):
        _extras.require("nonsense", "json")
    assert _extras.require("demo", "json") is json


def test_a_broken_extra_package_keeps_its_own_error(tmp_path, monkeypatch):
    # The package is there but one of its own imports fails: that error, not "install the extra", is the useful one.
    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import a_dependency_nobody_has\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_nobody_has") as error:
        _extras.require("demo", "half_installed")
    assert not isinstance(error.value, _extras.MissingExtraError)
    (tmp_path / "installed").mkdir()
    (tmp_path / "installed" / "__init__.py").write_text("")
    with pytest.raises(_extras.MissingExtraError, match="installed.absent is not installed"):
        _extras.require("demo", "installed.absent")  # a submodule missing from an installed package: still ours


def test_the_demo_without_gradio_names_its_extra():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys\nsys.modules['gradio'] = None\nimport diffusers_block.demo"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "MissingExtraError: gradio is not installed" in out.stderr
    assert 'pip install "diffusers-block[demo]"' in out.stderr


def test_one_version():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "diffusers_block.__version__"}
    assert diffusers_block.__version__.count(".") == 2
