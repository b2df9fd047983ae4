#!/usr/bin/env bash
# The vLLM plugin's tests: builds vllm_adsc/.venv (make_env.sh) if it is missing, then runs them there.
# HF's side of every comparison runs in the project's environment (.venv, or $ADSC_PROJECT_PYTHON).
# Usage: bash vllm_adsc/run_tests.sh [pytest args]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ -x "$here/.venv/bin/python" ] || bash "$here/make_env.sh" "$here/.venv"
cd "$here"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
