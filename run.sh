#!/usr/bin/env bash
# One entry point: sets itself up (.venv, installs), then runs stages, the whole chain, or the tests.
#   ./run.sh full [CONFIG] [--set section.key=value ...]   every stage, ends with "submission: <path>"
#   ./run.sh full --set data.root=PATH [--budget 30m]       recipe: auto: members planned to fit the budget
#   ./run.sh full A.yaml B.yaml ... [--set ...]             every member's stages, then A's ensemble of all, one submission
#   ./run.sh full ENSEMBLE.yaml [--set ...]                 its ensemble.member_configs' stages, then its ensemble of them
#   ./run.sh test [pytest args]                             the test suite
#   ./run.sh <stage> [CONFIG] [--set ...]                   one stage: eda preprocess folds train infer ensemble results submit
#   ./run.sh search [CONFIG] [--set ...]                    preprocess, then the model/hyperparameter search
#   ./run.sh compare RUN RUN[,SEED_RUN...] [--plain]        is the CV gap real? paired bootstrap and McNemar on OOF rows
#   ./run.sh predict RUN_DIR DATA --out FILE [...]        a finished run (or export) predicts new images, offline
#   ./run.sh export RUN_DIR --out DIR                       the run's models as ONNX graphs, checked against PyTorch
#   ./run.sh help
set -euo pipefail
cd "$(dirname "$0")"

STAGES="eda preprocess folds train infer ensemble results submit"
VENV=${VENV:-.venv}   # another virtual environment: VENV=/path/to/venv ./run.sh ...
PY="$VENV/bin/python"

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
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

# split "[CONFIG ...] [--set k=v ...]" into CONFIGS and SETS; ARGS: python -m arguments for the first config
stage_args() {
  CONFIGS=()
  while [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; do CONFIGS+=("$1"); shift; done
  SETS=("$@")
  ARGS=()
  if [ ${#CONFIGS[@]} -gt 0 ]; then ARGS+=(--config "${CONFIGS[0]}"); fi
  ARGS+=("${SETS[@]}")
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
    # every stage in one process (python -m pipeline.full): the demo is built when the config reads it
    exec "$PY" -m pipeline.full "$@" ;;
  search)
    setup
    stage_args "$@"
    "$PY" -m pipeline.preprocess "${ARGS[@]}"
    exec "$PY" -m pipeline.search "${ARGS[@]}" ;;
  compare|predict|export)
    setup
    exec "$PY" -m "pipeline.$cmd" "$@" ;;
  eda|preprocess|folds|train|infer|ensemble|results|submit|bench|augment)
    setup
    stage_args "$@"
    [ ${#CONFIGS[@]} -le 1 ] || { echo "'$cmd' takes one config (several: ./run.sh full A.yaml B.yaml)" >&2; exit 2; }
    exec "$PY" -m "pipeline.$cmd" "${ARGS[@]}" ;;
  *) echo "unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
