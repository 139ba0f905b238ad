#!/usr/bin/env bash
# Two search workers on one Optuna study stored in a local PostgreSQL (Debian's package), the way workers on
# several machines would share it (they would point search.storage at the server's address instead).
#   scripts/search_postgres.sh [CONFIG] [--set section.key=value ...]
# e.g. scripts/search_postgres.sh configs/default.yaml --set search.n_trials=8 --set search.epochs=1
# Needs root (apt-get, the postgres system user). Env: PY (python, default .venv/bin/python), PG_DB, WORKERS, LOGS
# (worker logs), PGPASSWORD (the role's password, default "pipeline"). The password never enters the storage URL:
# libpq (psycopg2) reads PGPASSWORD from the environment, as every worker on another machine should
# (search.storage=postgresql+psycopg2://pipeline@HOST:5432/DB with PGPASSWORD exported).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DB=${PG_DB:-pipeline_search}
WORKERS=${WORKERS:-2}
LOGS=${LOGS:-runs/search-postgres-logs}
export PGPASSWORD=${PGPASSWORD:-pipeline}
ARGS=()
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then ARGS+=(--config "$1"); shift; fi
ARGS+=("$@")

if ! command -v pg_ctlcluster >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
"$PY" -c "import psycopg2" 2>/dev/null || "$PY" -m pip install --quiet psycopg2-binary

version=$(ls /etc/postgresql | sort -V | tail -1)
if ! pg_ctlcluster "$version" main status >/dev/null 2>&1; then  # started here: stopped again on exit
  pg_ctlcluster "$version" main start
  trap 'pg_ctlcluster "$version" main stop' EXIT
fi
psql_admin() { runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtAc "$1"; }
password=${PGPASSWORD//\'/\'\'}  # a SQL string literal
if [ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname='pipeline'")" = 1 ]; then
  psql_admin "ALTER ROLE pipeline PASSWORD '$password'"
else
  psql_admin "CREATE ROLE pipeline LOGIN PASSWORD '$password'"
fi
[ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname='$DB'")" = 1 ] ||
  psql_admin "CREATE DATABASE $DB OWNER pipeline"
URL="postgresql+psycopg2://pipeline@127.0.0.1:5432/$DB"  # the password: PGPASSWORD, read by libpq
echo "storage: $URL (PostgreSQL $version, password from PGPASSWORD)" >&2

[ -d data/demo ] || "$PY" -m pipeline.data.demo --out data/demo
"$PY" -m pipeline.preprocess "${ARGS[@]}"
mkdir -p "$LOGS"
pids=()
for w in $(seq "$WORKERS"); do
  "$PY" -m pipeline.search "${ARGS[@]}" --set "search.storage=$URL" --set "search.worker=$w" > "$LOGS/worker$w.log" 2>&1 &
  pids+=($!)
  echo "worker $w: pid ${pids[-1]}, log $LOGS/worker$w.log" >&2
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for w in $(seq "$WORKERS"); do echo "worker $w ran: $(grep -Eo 'trial [0-9]+ (complete|pruned|fail)' "$LOGS/worker$w.log" | awk '{print $2}' | sort -n | tr '\n' ' ')" >&2; done
exit $status
