#!/usr/bin/env bash
# The production stack on this machine, for a person to look at: PostgreSQL, an S3-compatible
# store, MLflow (basic auth), Prefect server + worker, a two-node Ray cluster (token auth), all on
# loopback (infra/rehearsal.py). Prints the URLs and writes the clients' exports to
# rehearsal.env (mode 0600); Ctrl-C stops every service it started.
#
#   infra/rehearse.sh [--ray-nodes N] [--env-file PATH]
#
# Needs PostgreSQL from the system's package manager (apt-get install postgresql) and the
# project's dev dependencies (pip install -e ".[dev]"), in .venv if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
# Its own Ray temp dir, so that it never touches another Ray on this machine.
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray-rehearsal}"
exec python -m infra.rehearsal up "$@"
