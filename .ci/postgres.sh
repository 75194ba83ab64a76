#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on a free port under a temporary folder.
# Prints `export TIDYLLM_TEST_POSTGRES_URL=...` and `export TIDYLLM_PG_DIR=...` for eval.
# Stop it with: .ci/postgres.sh stop "$TIDYLLM_PG_DIR"
set -euo pipefail

if [ "${1:-}" = "stop" ]; then
  dir="$2"
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  su postgres -s /bin/sh -c "$bin/pg_ctl -D '$dir/data' -m fast stop" >/dev/null 2>&1 || true
  rm -rf "$dir"
  exit 0
fi

if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  echo "installing PostgreSQL (Debian package)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
dir=$(mktemp -d /tmp/tidyllm-pg.XXXXXX)
chown postgres:postgres "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
su postgres -s /bin/sh -c "$bin/initdb -D '$dir/data' -A trust -U postgres --no-sync" >/dev/null
su postgres -s /bin/sh -c "$bin/pg_ctl -D '$dir/data' -l '$dir/log' -w -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300\" start" >/dev/null
su postgres -s /bin/sh -c "$bin/createdb -h 127.0.0.1 -p $port -U postgres tidyllm_test" >/dev/null
echo "export TIDYLLM_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$port/tidyllm_test"
echo "export TIDYLLM_PG_DIR=$dir"
