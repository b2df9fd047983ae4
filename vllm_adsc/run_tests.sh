#!/usr/bin/env bash
# The vLLM plugin's tests: builds vllm_adsc/.venv (make_env.sh) if it is missing, then runs them there.
# HF's side of every comparison runs in the project's environment (.venv, or $ADSC_PROJECT_PYTHON).
# Usage: bash vllm_adsc/run_tests.sh [pytest args]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ -x "$here/.venv/bin/python" ] || bash "$here/make_env.sh" "$here/.venv"
cd "$here"
# vLLM on the CPU with 1 GiB of KV cache, its engine core in the test process (so tests can reach the model), offline.
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1
# Inductor compiles the engines' graphs in this process: no pool of compile workers taking the cores that CI's
# other tests run on.
export TORCHINDUCTOR_COMPILE_THREADS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
