#!/usr/bin/env bash
# Everything a fresh Debian machine needs to run twistvpn, its tests and its lab.
# build-essential and python3-dev: the compiled build (setup.py, docs/performance.md).
# Run as root. Idempotent: a second run only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
apt_packages=(iproute2 iptables iputils-ping iperf3 wireguard-go wireguard-tools python3-venv systemd dnsutils
              chromium chromium-driver nftables miniupnpd-nftables qrencode postgresql
              build-essential python3-dev)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
python=${PYTHON:-python3}
if [ ! -x "$here/.venv/bin/python" ]; then
    "$python" -m venv "$here/.venv"
fi
"$here/.venv/bin/pip" install -q --upgrade pip
"$here/.venv/bin/pip" install -q -e "$here[dev]"
