#!/usr/bin/env bash
# Regenerates pgo/combd.profdata.gz, the profile `make release` optimises combd with
# (profile-guided optimisation; docs/benchmarks.md has what it buys). Run as root, after a
# change that moves the proxy's hot paths: a stale profile still builds (functions whose code
# changed are optimised as if there were no profile) but gains less.
#
# Steps: an instrumented combd counts what runs while the training load goes through it in the
# lab (`comb bench l7`, `bench mtls`, `bench upgrade`: HTTP/1.1, HTTP/2, gRPC, WebSocket, opaque
# TCP, the splice, HBONE, restarts), then llvm-profdata (rustup's llvm-tools) merges the counts.
# Code the load never runs is optimised for size. `bench kube` is not in the load: the profile
# measured in docs/benchmarks.md was made without it, and what it would change was not measured.
#
# The profile names functions by their symbols, which differ with `--target` and with the set
# of packages built together: the Makefile's COMBD_PGO_BUILD builds combd both ways alike.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "pgo: run as root (the training load runs in the lab)" >&2
  exit 1
fi
rustup component add llvm-tools >/dev/null
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"

work=$(mktemp -d /tmp/comb-pgo.XXXXXX)
cleanup() {
  "$work/bin/comb" lab down --all >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Only combd is instrumented; the release CLI drives the load. The Makefile holds how combd is
# built (`--target` keeps the instrumentation off build scripts and proc macros), and the
# instrumented one goes to its own target directory, leaving target/release alone.
make release-cli
make pgo-instrumented PGO_RAW="$work/raw"
mkdir "$work/bin"
cp target/release/comb "$work/bin/"
cp "target/pgo-generate/$host/release/combd" "$work/bin/"

# comb starts the combd that sits beside it. Each combd writes its counts when it exits.
"$work/bin/comb" bench l7 --pairs 1 --latency-secs 5 --secs 5
"$work/bin/comb" bench mtls --pairs 1 --latency-secs 3 --secs 3 --identities 3
"$work/bin/comb" bench upgrade --pairs 1 --restarts 2

"$profdata" merge -o "$work/combd.profdata" "$work/raw"
mkdir -p pgo
gzip -9 -n -c "$work/combd.profdata" > pgo/combd.profdata.gz
echo "pgo: wrote pgo/combd.profdata.gz ($(du -h pgo/combd.profdata.gz | cut -f1)); run make release"
