#!/usr/bin/env bash
# Installs the Debian packages wshost needs to build, test and benchmark, if missing.
# Run as root on Debian 12. The CUDA toolkit is optional: when present (nvcc under
# /usr/local/cuda), the CUDA backend is built; the binary still runs without a GPU.
set -euo pipefail

packages=(cmake ninja-build gcc make pkg-config liblua5.4-dev lua5.4 lua-busted python3-dev
          libopenmpi-dev openmpi-bin python3-torch gnuplot-nox cppcheck libcjson-dev
          clang libclang-rt-14-dev)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "wshost: missing Debian packages: ${missing[*]}" >&2
    echo "wshost: run as root, or: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "wshost: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
