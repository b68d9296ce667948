#!/usr/bin/env bash
# Install Debian's PostgreSQL and start a throwaway server on 127.0.0.1; writes the URL to .ci/.pg_url.
set -euo pipefail
cd "$(dirname "$0")"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || exit 1
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
PORT="${SBORA_REG_PG_PORT:-55432}"
URL="postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then  # already started (e.g. a second run)
    echo "$URL" > .pg_url
    echo "PostgreSQL already on 127.0.0.1:$PORT"
    exit 0
fi
DATA="$(mktemp -d /tmp/sbora-pg.XXXXXX)"
chown postgres "$DATA"
runuser -u postgres -- "$BIN/initdb" -D "$DATA" -U postgres -A trust >/dev/null
runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA" -o "-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200" -w -l "$DATA/log" start >/dev/null
echo "$URL" > .pg_url
echo "PostgreSQL on 127.0.0.1:$PORT"
