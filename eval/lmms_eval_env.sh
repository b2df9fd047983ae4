#!/usr/bin/env bash
# Builds a virtual environment with lmms-eval 0.7.3 and adsc_llava (editable) that keeps the CPU torch pin.
# Usage: bash eval/lmms_eval_env.sh [VENV]   (default .venv-lmms-eval; run from anywhere)
# lmms-eval requires torchvision; PyPI's torchvision wheel is a CUDA build that fails to load next to CPU torch
# ("operator torchvision::nms does not exist"), so it is removed and transformers uses its PIL image processors.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$repo/.venv-lmms-eval}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q -c "$repo/constraints.txt" -e "$repo[eval]"
"$venv/bin/pip" uninstall -q -y torchvision
"$venv/bin/python" -c "import torch, lmms_eval.models; assert '+cpu' in torch.__version__ or not torch.version.cuda, torch.__version__"
