#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: the Debian tools the
# integration tests drive (curl as a real client, iproute2/iptables for network namespaces,
# nginx/haproxy/wrk for benchmark smoke runs, promtool to check the Prometheus rules and
# dashboard queries, kubectl to render deploy/, redis and PostgreSQL servers and clients as
# real non-HTTP traffic through the sidecars in tests/integration/test_transparent.py,
# debootstrap for the base system tests/integration/test_image_recipe.py builds the
# Dockerfile's recipe in) and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
declare -A provides=([curl]=curl [nginx]=nginx [haproxy]=haproxy [wrk]=wrk [ip]=iproute2
                     [iptables]=iptables [ps]=procps [promtool]=prometheus [kubectl]=kubectl
                     [redis-server]=redis-server [redis-cli]=redis-tools
                     [psql]=postgresql-client [pg_isready]=postgresql-client
                     [debootstrap]=debootstrap)
missing=()
for cmd in "${!provides[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${provides[$cmd]}")
done
# Debian keeps the PostgreSQL server (and initdb) off PATH, under /usr/lib/postgresql/VERSION/bin.
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # (sort -u: one package can provide two of the commands)
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install -q -e '.[test]'
