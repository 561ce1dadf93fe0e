#!/usr/bin/env bash
# Make sure PostgreSQL's server binaries (initdb, pg_ctl) are here for tests/test_postgres.py.
#
# Installs Debian's `postgresql` package with apt-get when no /usr/lib/postgresql/*/bin/initdb
# exists and we may (root, or passwordless sudo). Installing it creates the unprivileged
# `postgres` user the test runs the server as; no cluster is started (the test makes its own
# throwaway one in a temp folder). Quiet, bounded in time, and it never fails the build: when
# PostgreSQL cannot be installed it prints a warning and exits 0, and the test skips with the reason.
#
#   POSTGRESQL_INSTALL_TIMEOUT=600    seconds allowed for each apt-get step
set -u

warn() { echo "ensure-postgresql: WARNING: $*; the PostgreSQL test will be skipped." >&2; exit 0; }
have() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1; }

if have; then exit 0; fi

command -v apt-get >/dev/null 2>&1 || warn "PostgreSQL is not installed and there is no apt-get to install it"
if [ "$(id -u)" = 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
  as_root=(sudo -n)
else
  warn "PostgreSQL is not installed and installing it needs root (run: apt-get install postgresql)"
fi

limit="${POSTGRESQL_INSTALL_TIMEOUT:-600}"
log="$(mktemp "${TMPDIR:-/tmp}/ensure-postgresql.XXXXXX")"
echo "ensure-postgresql: installing Debian's postgresql with apt-get (at most ${limit} s per step)..." >&2
if ! timeout "$limit" ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1; then
  tail -n 5 "$log" >&2
  rm -f "$log"
  warn "apt-get update failed or timed out"
fi

if ! timeout "$limit" ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends postgresql >"$log" 2>&1; then
  tail -n 5 "$log" >&2
  rm -f "$log"
  warn "apt-get install postgresql failed or timed out"
fi
rm -f "$log"
have || warn "apt-get ran but no initdb was installed"
echo "ensure-postgresql: $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n 1)" >&2
exit 0
