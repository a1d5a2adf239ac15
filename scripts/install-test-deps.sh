#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: the Debian tools the
# integration tests drive (curl as a real client, iproute2/iptables for network namespaces,
# nginx/haproxy/wrk for benchmark smoke runs, promtool to check the Prometheus rules and
# dashboard queries, kubectl to render deploy/) and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
declare -A provides=([curl]=curl [nginx]=nginx [haproxy]=haproxy [wrk]=wrk [ip]=iproute2
                     [iptables]=iptables [ps]=procps [promtool]=prometheus [kubectl]=kubectl)
missing=()
for cmd in "${!provides[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${provides[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install -q -e '.[test]'
