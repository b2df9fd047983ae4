"""The project as users and CI meet it: versions, set-up commands, and what a wheel carries."""

import ast
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def setup_constant(name: str) -> str:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in setup.py")


def test_tests_run_on_the_minimum_transformers_version():
    """setup.py's floor is the version constraints.txt pins, so this suite is the minimum-version test."""
    minimum = setup_constant("MIN_TRANSFORMERS")
    pinned = re.search(r"^transformers==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
    assert Version(pinned) == Version(minimum)
    assert Version(version("transformers")) >= Version(minimum)
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.endswith("-m pytest -q")
    assert f"```bash\n{ci_command}\n```" in readme


def test_readme_main_job_command_shares_the_set_up():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    set_up = ci_command.rsplit(" && ", 1)[0]
    assert f"```bash\n{set_up} && .venv/bin/adsc-llava demo\n```" in readme


MODELING_MODULES = tuple(
    f"modeling_adsc_{family}" for family in ("llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl")
)


def test_remote_code_refuses_an_older_transformers_by_name(tmp_path):
    """The modeling files check the version first: an old install gets the minimum named, not a stray ImportError.
    The configs load on it (serving engines such as vLLM read them with their own model code)."""
    from adsc_llava.configuration_adsc_llava import MIN_TRANSFORMERS_VERSION

    assert MIN_TRANSFORMERS_VERSION == setup_constant("MIN_TRANSFORMERS")
    package = tmp_path / "checkpoint_code"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for path in [*ROOT.glob("configuration_adsc_*.py"), *ROOT.glob("modeling_adsc_*.py")]:
        shutil.copy(path, package)
    for module, loads in (("configuration_adsc_llava", True), *((module, False) for module in MODELING_MODULES)):
        script = (
            "import importlib, transformers\n"
            "transformers.__version__ = '5.20.1'\n"
            f"importlib.import_module('checkpoint_code.{module}')\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert (completed.returncode == 0) == loads, (module, completed.stderr[-2000:])
        if not loads:
            assert "ImportError: ADSC-LLaVA's remote code needs transformers >= 5.24.0, but transformers 5.20.1" in (
                completed.stderr
            )
    card = (ROOT / "model_card.md").read_text()
    assert f"transformers >= {MIN_TRANSFORMERS_VERSION}" in card
