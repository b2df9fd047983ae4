"""The `reference` fixture (HF's side of every comparison, from the project's environment) and the settings for vLLM
on the CPU, in this process, offline.

A pytest plugin (`-p vllm_reference` in vllm_adsc/pyproject.toml), not a conftest.py: `.ci/run` collects
`test_stages.py` from this folder beside the project's own tests, whose conftest module a second one would shadow."""

import json
import os
import subprocess
from pathlib import Path

import pytest

# Before vLLM is imported: the CPU platform, 1 GiB of KV cache, the engine core in this process (so tests can reach
# the model), no hub.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
# The project's own environment (transformers 5.24 and adsc_llava), which writes the checkpoints and HF's answers.
PROJECT_PYTHON = Path(os.environ.get("ADSC_PROJECT_PYTHON", REPO / ".venv" / "bin" / "python"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict:
    """`hf_reference.py`'s checkpoints and greedy answers (see there)."""
    if not PROJECT_PYTHON.is_file():
        pytest.fail(f"The project's environment is missing ({PROJECT_PYTHON}): run README's set-up first.")
    out = tmp_path_factory.mktemp("hf_reference")
    subprocess.run(
        [str(PROJECT_PYTHON), str(Path(__file__).with_name("hf_reference.py")), str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return json.loads((out / "reference.json").read_text())
