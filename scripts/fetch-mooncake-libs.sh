#!/usr/bin/env bash
# Mooncake's transfer-engine wheel links the system's libibverbs (and libnl), which a machine without RDMA
# packages lacks. For benchmarks/transfer.py's Mooncake variant, fetch those Debian packages into DEST
# without installing anything system-wide (apt-get download needs no root); benchmarks/mooncake_tcp.py
# preloads them from there. Not fatal: without them the benchmark reports Mooncake as unavailable.
set -euo pipefail
dest=${1:?usage: fetch-mooncake-libs.sh DEST}
if /sbin/ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 '; then
  echo "libibverbs is installed system-wide; nothing to fetch"; exit 0
fi
command -v apt-get >/dev/null || { echo "no apt-get: install libibverbs1 (rdma-core) to benchmark Mooncake"; exit 0; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q libibverbs1 libnl-3-200 libnl-route-3-200 >/dev/null 2>&1) \
  || { echo "apt-get download libibverbs1 failed: Mooncake will be reported unavailable"; exit 0; }
mkdir -p "$dest"
for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$dest"; done
echo "Mooncake's system libraries are in $dest"
