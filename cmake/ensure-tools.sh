#!/bin/sh
# Usage: sh cmake/ensure-tools.sh LABEL COMMAND=DEBIAN_PACKAGE...
# Exits 0 when every COMMAND is on PATH, installing the missing ones' packages with apt-get first
# (as root, non-interactive). Otherwise prints why LABEL is skipped and exits 1: `make cross-test`
# and `make clang-test` run only when this succeeds, so a machine without apt, root or network
# skips them with this message instead of failing.
label=$1
shift
missing=""
for pair in "$@"; do
  command -v "${pair%%=*}" >/dev/null 2>&1 || missing="$missing ${pair#*=}"
done
[ -z "$missing" ] && exit 0
skip() {
  echo "SKIPPED $label: needs the Debian package(s)$missing, which cannot be installed here: $1"
  exit 1
}
command -v apt-get >/dev/null 2>&1 || skip "no apt-get"
[ "$(id -u)" = 0 ] || skip "not root"
echo "$label: installing$missing with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt() { apt-get -o DPkg::Lock::Timeout=300 -qq "$@"; }
# shellcheck disable=SC2086  # one word per package
apt install -y --no-install-recommends $missing >/dev/null 2>&1 ||
  { apt update >/dev/null 2>&1 && apt install -y --no-install-recommends $missing >/dev/null; } ||
  skip "apt-get install failed (no network or no such package)"
for pair in "$@"; do
  command -v "${pair%%=*}" >/dev/null 2>&1 || skip "installed, but ${pair%%=*} is still not on PATH"
done
