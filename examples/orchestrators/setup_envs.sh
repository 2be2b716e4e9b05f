#!/usr/bin/env bash
# Make the environments the orchestrator recipes are tested in (tests/orchestrators/), one per
# orchestrator, beside the checkout: .venv-dagster and .venv-airflow. Each holds audience-sync
# (editable), the orchestrator at the version the recipes are tested with, and pytest.
#
# Neither orchestrator is a dependency of audience-sync, and Airflow pins much of its world, so
# each is resolved against a constraints file frozen from the tested install (Airflow installs
# reproducibly this way: `pip install apache-airflow==X --constraint constraints-X.txt`).
#
#   examples/orchestrators/setup_envs.sh [dagster] [airflow]   # default: both, side by side
#   REFRESH=1 examples/orchestrators/setup_envs.sh airflow     # resolve afresh, rewrite the file
set -euo pipefail
cd "$(dirname "$0")/../.."
here=examples/orchestrators

declare -A PINS=(
  # 1.13: the release line the recipe is written and tested for (AssetSpec.skippable,
  # multi_asset check specs, dg.EnvVar resources).
  [dagster]="dagster==1.13.29"
  # 3.2 is the first Airflow that installs beside SQLAlchemy 2; 3.3.2 is the tested release.
  [airflow]="apache-airflow==3.3.2"
)
# What tests/conftest.py and the pytest settings in pyproject.toml need.
TEST_TOOLS=(pytest pytest-timeout pytest-xdist hypothesis)

make_env() {
  local name=$1 venv=".venv-$1" constraints="$here/constraints-$1.txt"
  python3 -m venv "$venv"
  if [ -n "${REFRESH:-}" ]; then
    "$venv/bin/python" -m pip install -q -e . "${PINS[$name]}" "${TEST_TOOLS[@]}"
    {
      echo "# ${PINS[$name]} with audience-sync and pytest, as tested; made by setup_envs.sh."
      echo "# Refresh: REFRESH=1 examples/orchestrators/setup_envs.sh $name"
      "$venv/bin/python" -m pip freeze --exclude-editable
    } >"$constraints"
  else
    "$venv/bin/python" -m pip install -q -e . "${PINS[$name]}" "${TEST_TOOLS[@]}" \
      --constraint "$constraints"
  fi
  echo "$venv: ${PINS[$name]} ready"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(dagster airflow)
pids=()
for name in "${names[@]}"; do
  [ -n "${PINS[$name]:-}" ] || { echo "unknown orchestrator: $name" >&2; exit 2; }
  make_env "$name" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
