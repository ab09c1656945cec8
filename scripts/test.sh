#!/usr/bin/env bash
# Runs berth's whole test suite on a fresh Debian machine, as root.
# Installs what the tests need from Debian's packages first (only what is missing), then runs
# formatting and lint checks and every test. The kernel tests make their own network
# namespaces and never touch the machine's own network.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the tests create network namespaces; run as root" >&2
  exit 1
fi

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v nsenter >/dev/null || need+=(util-linux)
command -v unshare >/dev/null || need+=(util-linux)
command -v tc >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
[ -x /usr/lib/cni/portmap ] || need+=(containernetworking-plugins)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v containerd >/dev/null || need+=(containerd)
command -v busybox >/dev/null || need+=(busybox-static)
command -v dockerd >/dev/null || need+=(docker.io)
command -v curl >/dev/null || need+=(curl)
command -v nft >/dev/null || need+=(nftables)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v dig >/dev/null || need+=(dnsutils)
command -v dnsperf >/dev/null || need+=(dnsperf)
# Many hosts: the tests start their own etcd (and use etcdctl beside berth).
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
