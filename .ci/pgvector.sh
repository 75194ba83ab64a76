#!/usr/bin/env bash
# Install the pgvector extension into the local PostgreSQL (tidyllm.apps.Index stores vectors in it).
# Uses the distribution's postgresql-NN-pgvector when there is one; Debian 12 (bookworm) has none, so
# there it builds Debian trixie's pgvector source package against the installed server (no server
# restart needed: CREATE EXTENSION loads the library). Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

ver=$(ls /usr/lib/postgresql | sort -V | tail -1)
if [ -f "/usr/share/postgresql/$ver/extension/vector.control" ]; then
  exit 0
fi
apt-get update -qq
if apt-get install -y -qq "postgresql-$ver-pgvector" >/dev/null 2>&1; then
  exit 0
fi
echo "building pgvector for PostgreSQL $ver from Debian's source package"
apt-get install -y -qq "postgresql-server-dev-$ver" build-essential dpkg-dev >/dev/null
src=/etc/apt/sources.list.d/tidyllm-pgvector-src.sources
cat >"$src" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
work=$(mktemp -d)
trap 'rm -rf "$work" "$src"; apt-get update -qq >/dev/null 2>&1 || true' EXIT
apt-get update -qq
(cd "$work" && apt-get source --download-only pgvector >/dev/null 2>&1 && tar xzf pgvector_*.orig.tar.gz)
cd "$work"/pgvector-*/
# OPTFLAGS="": no -march=native, so the build runs on any x86-64 machine
make -s OPTFLAGS="" PG_CONFIG="/usr/lib/postgresql/$ver/bin/pg_config" >/dev/null
make -s install PG_CONFIG="/usr/lib/postgresql/$ver/bin/pg_config" >/dev/null
test -f "/usr/share/postgresql/$ver/extension/vector.control"
