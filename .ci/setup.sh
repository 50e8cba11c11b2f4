#!/usr/bin/env bash
# Everything felix-lite's demo and tests need, on a fresh Debian 12 machine, as root.
# Idempotent. The Python side goes into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

apt_pkgs=(iptables ipset iproute2 conntrack kmod bird2 frr gobgpd iperf3 tcpdump socat
          containernetworking-plugins procps ca-certificates python3-venv)
echo "setup: apt-get update && apt-get install ${apt_pkgs[*]}" >&2
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
echo "setup: ok ($(.venv/bin/felix-lite --version))" >&2
