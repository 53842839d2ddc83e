#!/usr/bin/env bash
# Install what Comb needs to build, test, demo and benchmark on Debian/Ubuntu, then make sure
# bpffs is mounted and a cgroup v2 hierarchy exists. Idempotent: installs only what is missing.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "deps: run as root (the datapath and the lab need CAP_BPF/CAP_NET_ADMIN/CAP_SYS_ADMIN)" >&2
  exit 1
fi

# command or file -> Debian package
need=(
  "clang:clang" "llc:llvm" "pkg-config:pkg-config" "ip:iproute2" "bpftool:bpftool"
  "iperf3:iperf3" "sockperf:sockperf" "make:make" "cc:gcc" "curl:curl" "python3:python3"
  "ping:iputils-ping" "ss:iproute2"
  "iptables-restore:iptables"
  "haproxy:haproxy" "h2load:nghttp2-client" "wrk:wrk"
  "openssl:openssl" "tcpdump:tcpdump" "tshark:tshark"
  "/usr/lib/python3/dist-packages/h2/__init__.py:python3-h2"
  "/usr/lib/python3/dist-packages/grpc/__init__.py:python3-grpcio"
  "/usr/lib/python3/dist-packages/websockets/__init__.py:python3-websockets"
  "/usr/lib/cni/ptp:containernetworking-plugins" "/usr/lib/cni/host-local:containernetworking-plugins"
  "/usr/include/libelf.h:libelf-dev" "/usr/include/zlib.h:zlib1g-dev"
  "/usr/include/bpf/bpf_helpers.h:libbpf-dev" "/usr/include/linux/bpf.h:linux-libc-dev"
)
missing=()
for pair in "${need[@]}"; do
  what=${pair%%:*}; pkg=${pair##*:}
  if [[ $what == /* ]]; then [ -e "$what" ] && continue
  else command -v "$what" >/dev/null 2>&1 && continue; fi
  missing+=("$pkg")
done
missing=($(printf '%s\n' "${missing[@]}" | sort -u))
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo is missing; install the Rust toolchain (1.95 or newer) first" >&2
  exit 1
fi

# bpffs: pins of the datapath live there.
if ! awk '$3 == "bpf" && $2 == "/sys/fs/bpf" {found=1} END {exit !found}' /proc/mounts; then
  echo "deps: mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

cg2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
if [ -z "$cg2" ]; then
  echo "deps: no cgroup v2 hierarchy is mounted; Comb needs cgroup v2 (unified or hybrid)" >&2
  exit 1
fi
echo "deps: ok (cgroup v2 at $cg2, bpffs at /sys/fs/bpf)"
