#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: the Debian tools the
# integration tests drive (curl as a real client, h2load as a multiplexing HTTP/2 one, iproute2/iptables for network namespaces,
# nginx/haproxy/wrk for benchmark smoke runs, promtool to check the Prometheus rules and
# dashboard queries, kubectl to render deploy/, redis and PostgreSQL servers and clients as
# real non-HTTP traffic through the sidecars in tests/integration/test_transparent.py,
# debootstrap for the base system tests/integration/test_image_recipe.py builds the
# Dockerfile's recipe in, gcc to compile the request path with mypyc) and the package with its
# test extras, compiled, into the virtual environment .venv (scripts/venv.sh): it fails when
# the compiled build is not the one in force. Then `.venv/bin/python -m pytest` runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
declare -A provides=([curl]=curl [nginx]=nginx [haproxy]=haproxy [wrk]=wrk [ip]=iproute2
                     [iptables]=iptables [ps]=procps [promtool]=prometheus [kubectl]=kubectl
                     [redis-server]=redis-server [redis-cli]=redis-tools
                     [psql]=postgresql-client [pg_isready]=postgresql-client
                     [debootstrap]=debootstrap [gcc]=gcc [h2load]=nghttp2-client)
missing=()
for cmd in "${!provides[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${provides[$cmd]}")
done
# Debian keeps the PostgreSQL server (and initdb) off PATH, under /usr/lib/postgresql/VERSION/bin.
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
# Python's headers, for the compiled modules (a pyenv or python.org build has its own).
python3 -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' \
  2>/dev/null || missing+=(python3-dev)
# Debian's python3 makes virtual environments (scripts/venv.sh) only with python3-venv.
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # (sort -u: one package can provide two of the commands)
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The package and its test extras, in .venv: pip may not install into Debian's own python3
# (PEP 668).
bash scripts/venv.sh test
# The suite runs against the compiled build: fail here, with the reason, if it is not in force
# (mypy refused a compiled module, no C compiler, ...; MESHPROXY_NO_COMPILE=1 skips the check).
if [ "${MESHPROXY_NO_COMPILE:-0}" = "0" ]; then
  "${MESHPROXY_VENV:-.venv}/bin/python" -m meshproxy.build_info --require-compiled
fi
