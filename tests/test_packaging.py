"""The project as users and CI meet it: versions, set-up commands, and what a wheel carries."""

import ast
import re
import subprocess
import sys
import zipfile
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


def test_wheel_carries_the_modeling_files(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("adsc_llava-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        "adsc_llava/configuration_adsc_llava.py",
        "adsc_llava/modeling_adsc_llava.py",
        "adsc_llava/model_card.md",
    }
    assert shipped <= names
    assert {"adsc_llava/configs/llava-1.5-7b.json", "adsc_llava/train/zero3.json", "adsc_llava/cli.py"} <= names
    assert {"adsc_llava/benchmarks/speed.py", "adsc_llava/shapes_demo/run.py", "adsc_llava/train/trainer.py"} <= names
    # One top-level package: nothing named `train` (or anything else) beside it.
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"adsc_llava"}
