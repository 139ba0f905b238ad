#!/usr/bin/env bash
# One entry point: sets itself up (.venv, installs), then runs stages, the whole chain, or the tests.
#   ./run.sh full [CONFIG] [--set section.key=value ...]   every stage, ends with "submission: <path>"
#   ./run.sh test [pytest args]                             the test suite
#   ./run.sh <stage> [CONFIG] [--set ...]                   one stage: eda preprocess folds train infer ensemble submit
#   ./run.sh search [CONFIG] [--set ...]                    preprocess, then the model/hyperparameter search
#   ./run.sh help
set -euo pipefail
cd "$(dirname "$0")"

STAGES="eda preprocess folds train infer ensemble submit"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  echo "stages: $STAGES (also: bench, augment --preview, data.demo)"
}

setup() {
  if [ ! -x "$PY" ]; then
    echo "setting up $VENV (first run: installs torch, timm, albumentations, ...)" >&2
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.installed"
  if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
    "$PY" -m pip install --quiet --upgrade pip >&2
    "$PY" -m pip install --quiet -e '.[dev]' >&2
    touch "$stamp"
  fi
}

# split "[CONFIG] [--set k=v ...]" into python -m arguments
stage_args() {
  ARGS=()
  if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then ARGS+=(--config "$1"); shift; fi
  ARGS+=("$@")
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  help|-h|--help) usage ;;
  test)
    setup
    exec "$PY" -m pytest "$@" ;;
  full)
    setup
    stage_args "$@"
    [ -d data/demo ] || "$PY" -m pipeline.data.demo --out data/demo   # the embedded default competition
    for stage in $STAGES; do
      echo "== $stage" >&2
      "$PY" -m "pipeline.$stage" "${ARGS[@]}" || { echo "stage '$stage' failed" >&2; exit 1; }
    done ;;
  search)
    setup
    stage_args "$@"
    "$PY" -m pipeline.preprocess "${ARGS[@]}"
    exec "$PY" -m pipeline.search "${ARGS[@]}" ;;
  eda|preprocess|folds|train|infer|ensemble|submit|bench|augment)
    setup
    stage_args "$@"
    exec "$PY" -m "pipeline.$cmd" "${ARGS[@]}" ;;
  *) echo "unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
