#!/usr/bin/env bash
# Installs meshproxy (editable, with the extras named as arguments: `bash scripts/venv.sh test`)
# into the virtual environment .venv of this checkout, making it first when it is not there.
# Then .venv/bin/meshproxy and .venv/bin/python run it, with no need to activate anything.
#
# Why a virtual environment: Debian 12 and Ubuntu 24.04 mark their python3 as externally
# managed (PEP 668), so `python3 -m pip install` stops there with
# `error: externally-managed-environment`. Their python3 makes virtual environments only with
# the python3-venv package (it brings ensurepip), which this script installs when missing.
# MESHPROXY_VENV names another folder than .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MESHPROXY_VENV:-.venv}"

if ! python3 -c 'import ensurepip' 2>/dev/null; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "meshproxy: python3 cannot make a virtual environment (it has no ensurepip): install" \
         "the package of your system that adds it, then run this again" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "meshproxy: installing python3-venv (Debian/Ubuntu: python3 -m venv needs it)" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
# A folder left by an earlier `python3 -m venv` that failed (no ensurepip then) has a python
# but no pip: made again from scratch.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  python3 -m venv --clear "$venv"
fi
extras=""
[ $# -eq 0 ] || extras="[$(IFS=,; echo "$*")]"
# The editable install compiles the modules in setup.py's COMPILED_MODULES with mypyc, beside
# their sources (each pip install rebuilds them and removes the previous build's extensions).
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".$extras"
