#!/usr/bin/env bash
# Builds a virtual environment with lmms-eval 0.7.3 and adsc_llava (editable), with the project's pinned versions.
# Usage: bash eval/lmms_eval_env.sh [VENV]   (default .venv-lmms-eval; run from anywhere)
#
# torch is whatever `torch==2.13.0` resolves to where this runs: PyPI's Linux wheel is the CUDA build (then
# `--device cuda:0` works), a machine with a local CPU wheel gets that one. lmms-eval requires torchvision, and PyPI's
# torchvision is built against PyPI's torch: it is kept wherever it loads (OneVision's processor needs it), and only
# removed beside a CPU-only torch that it cannot load with ("operator torchvision::nms does not exist"); transformers
# then uses its PIL image processors. Each step says what failed, so a build that cannot work stops with the reason.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$repo/.venv-lmms-eval}"
step() { echo "lmms_eval_env.sh: $*" >&2; }

step "creating $venv"
python3 -m venv "$venv" || { step "FAILED: python3 -m venv (is the python3-venv package installed?)"; exit 1; }
step "installing lmms-eval 0.7.3 and adsc_llava[eval] (pip; needs PyPI)"
"$venv/bin/pip" install -q -c "$repo/constraints.txt" -e "$repo[eval]" \
  || { step "FAILED: pip install -c constraints.txt -e '.[eval]' (see pip's message above)"; exit 1; }
if ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
  if "$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)"; then
    step "torchvision does not load beside this CPU-only torch: removing it (PIL image processors are used)"
    "$venv/bin/pip" uninstall -q -y torchvision
  else
    step "FAILED: torchvision does not load beside torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
    "$venv/bin/python" -c "import torchvision" || true
    exit 1
  fi
fi
"$venv/bin/python" -c "import lmms_eval.models, adsc_llava.lmms_eval_plugin" \
  || { step "FAILED: lmms-eval or the adsc_llava plugin does not import (see above)"; exit 1; }
"$venv/bin/python" -c "import torch; print(f'lmms_eval_env.sh: ready: torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()}')"
