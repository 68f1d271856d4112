#!/usr/bin/env bash
# Build and install pgvector for Debian 12's PostgreSQL 15 from Debian 13's (trixie) source
# package, without touching /etc/apt (Debian 12 has no pgvector package). Idempotent: does
# nothing when PG15 already has vector.so. Needs root (apt-get, install into /usr/lib/postgresql).
# Vendored from ../shared/scripts/pgvector-from-debian-source.sh (CI runs on a fresh clone).
set -euo pipefail
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
if [ -x "$PG_CONFIG" ] && [ -f "$("$PG_CONFIG" --pkglibdir)/vector.so" ] \
        && [ -f "$("$PG_CONFIG" --sharedir)/extension/vector.control" ]; then
    exit 0  # already installed
fi
export DEBIAN_FRONTEND=noninteractive
# The server headers too: a machine may have pgxs (from postgresql-15) but not postgres.h.
if [ ! -x "$PG_CONFIG" ] || [ ! -d "$("$PG_CONFIG" --pkglibdir)/pgxs" ] \
        || [ ! -f "$("$PG_CONFIG" --includedir-server)/postgres.h" ]; then
    apt-get update -qq && apt-get install -y -qq postgresql-15 postgresql-server-dev-15 >/dev/null
fi
W=${W:-$(mktemp -d /tmp/pgvector-build.XXXXXX)}; mkdir -p "$W/lists/partial" "$W/src"
URI=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)  # the configured mirror
echo "deb-src $URI trixie main" > "$W/sources.list"
O=(-o Dir::Etc::SourceList="$W/sources.list" -o Dir::Etc::SourceParts=/dev/null
   -o Dir::State::Lists="$W/lists")
apt-get "${O[@]}" update -qq
cd "$W/src" && apt-get "${O[@]}" source -qq pgvector
cd "$W/src"/pgvector-*/ && make -s PG_CONFIG="$PG_CONFIG" all install >/dev/null
cd / && rm -rf "$W"
echo "pgvector $(awk -F"'" '/default_version/{print $2}' "$("$PG_CONFIG" --sharedir)/extension/vector.control") installed for $("$PG_CONFIG" --version)"
