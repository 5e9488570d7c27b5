#!/usr/bin/env bash
# Install (Debian) and start a throwaway PostgreSQL server on loopback for the distributed-search tests.
# Prints the SQLAlchemy URL to export as MEMCONTROL_TEST_POSTGRES_URL.
set -euo pipefail
PORT=${MEMCONTROL_PG_PORT:-54329}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null
fi
PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
PGDATA=$(mktemp -d /tmp/memcontrol-pg.XXXXXX)
chown postgres "$PGDATA"
su postgres -c "$PGBIN/initdb -D $PGDATA -A trust -U postgres" >/dev/null
su postgres -c "$PGBIN/pg_ctl -D $PGDATA -o '-c listen_addresses=127.0.0.1 -p $PORT -k /tmp' -l $PGDATA/server.log -w start" >/dev/null
su postgres -c "psql -h 127.0.0.1 -p $PORT -U postgres -qc 'CREATE DATABASE memcontrol_test'" >/dev/null
echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT/memcontrol_test"
