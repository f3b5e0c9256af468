#!/usr/bin/env bash
# The Dagster orchestration test (tests/test_orchestrator.py, marker `orchestrator`) in a venv
# of its own: kedro-dagster/dagster stay out of the project's main environment.
#
#   scripts/orchestrator_test.sh                 # venv in $ORCH_VENV (default /tmp/anomaly-ae-dagster-venv)
#   ORCH_VENV=.venv-dagster scripts/orchestrator_test.sh -x -v
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" scripts/orchestrator_test.sh  # CPU torch in CI
#
# Extra arguments go to pytest. An existing venv is reused (only the project is reinstalled).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ORCH_VENV:-/tmp/anomaly-ae-dagster-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first, from the index you choose (the CPU build is enough here)
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -q ${TORCH_PIP_ARGS:-} "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -q -e "$ROOT[test,dagster]"
installed=$(date +%s)
echo "orchestrator_test: venv ready in $((installed - start)) s ($VENV)"

cd "$ROOT"
export KEDRO_DISABLE_TELEMETRY=true
status=0
"$VENV/bin/python" -m pytest -m orchestrator tests/test_orchestrator.py -p no:cacheprovider "$@" || status=$?
echo "orchestrator_test: install $((installed - start)) s, test $(($(date +%s) - installed)) s, exit $status"
exit $status
