#!/usr/bin/env bash
# A private PostgreSQL 15 instance for the second-server tests, from the PG15 binaries:
# its own data dir, port and Unix socket dir under DIR; never the machine's own cluster.
#   pg15-server.sh start DIR   initdb (first time) + start; prints the connection URI
#   pg15-server.sh stop DIR    fast shutdown and remove DIR
# initdb refuses root: as root, the server runs as the `postgres` system user.
set -euo pipefail
BIN=${PG15_BIN:-/usr/lib/postgresql/15/bin}
action=${1:?start|stop}; dir=${2:?data folder}
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "$action" in
start)
    mkdir -p "$dir/sock"
    [ "$(id -u)" = 0 ] && chown -R postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_owner "$BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 \
            --locale=C.UTF-8 >"$dir/initdb.log"
    fi
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    # Test-server settings: enough connections for two test processes' worker pools;
    # durability off (a scratch server: the tests never crash the machine).
    opts="-p $port -k $dir/sock -c listen_addresses='' -c max_connections=300"
    opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start -o "$opts" >/dev/null
    echo "postgresql://postgres@/postgres?host=$dir/sock&port=$port"
    ;;
stop)
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_owner "$BIN/pg_ctl" -D "$dir/data" -w -m fast stop >/dev/null || true
    fi
    rm -rf "$dir"
    ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
