#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager and kubectl 1.20.2 from Debian's `kubernetes`
# source package with Debian's Go 1.19, and cache them outside the repository, keyed by
# version. The Kubernetes tests run a real API server from that cache; nothing is downloaded
# but Debian packages. Idempotent: does nothing when the cached binaries are there.
#
#   scripts/kube-build.sh          build if missing, print the bin dir
#   COMB_KUBE_CACHE=/dir           cache root (default /var/cache/comb)
set -euo pipefail

version=1.20.2
cache_root=${COMB_KUBE_CACHE:-/var/cache/comb}
dest="$cache_root/kubernetes-$version"
bins=(kube-apiserver kube-controller-manager kubectl)

have_all() {
  command -v etcd >/dev/null 2>&1 || return 1
  for b in "${bins[@]}"; do [ -x "$dest/bin/$b" ] || return 1; done
}
if have_all; then echo "$dest/bin"; exit 0; fi

if [ "$(id -u)" -ne 0 ]; then
  echo "kube-build: run as root (installs Debian packages, writes $cache_root)" >&2
  exit 1
fi
mkdir -p "$cache_root"
# One build at a time: tests may call this lazily from several processes.
exec 9>"$cache_root/.kubernetes-$version.lock"
flock 9
if have_all; then echo "$dest/bin"; exit 0; fi

export DEBIAN_FRONTEND=noninteractive
# Only etcd missing (the binaries are cached): install it and stop there.
cached() { for b in "${bins[@]}"; do [ -x "$dest/bin/$b" ] || return 1; done; }
if cached; then
  apt-get install -y -qq --no-install-recommends etcd-server >/dev/null || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends etcd-server >/dev/null; }
  echo "$dest/bin"
  exit 0
fi
src_list=/etc/apt/sources.list.d/comb-deb-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src ' /etc/apt/sources.list; then
  echo "kube-build: adding a bookworm deb-src entry ($src_list)" >&2
  cat >"$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq
fi
pkgs=(golang-1.19-go golang-github-modern-go-reflect2-dev rsync dpkg-dev etcd-server)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "kube-build: installing ${missing[*]}" >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# etcd-server starts a system etcd on 2379; the tests run their own on free ports.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q etcd 2>/dev/null; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi

work=$(mktemp -d "$cache_root/.kubernetes-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
echo "kube-build: fetching the kubernetes source package into $work" >&2
apt-get source -qq kubernetes >/dev/null
srcdir=$(find . -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -1)
[ -n "$srcdir" ] || { echo "kube-build: apt-get source produced no kubernetes-* directory" >&2; exit 1; }
cd "$srcdir"
grep -q "^# github.com/modern-go/reflect2 " vendor/modules.txt

# The vendored reflect2 1.0.1 reads runtime internals that changed in Go 1.18: the API server
# faults at the first custom-resource write. Debian's 1.0.2 is API-compatible.
rm -rf vendor/github.com/modern-go/reflect2
mkdir -p vendor/github.com/modern-go/reflect2
cp -a /usr/share/gocode/src/github.com/modern-go/reflect2/. vendor/github.com/modern-go/reflect2/
find vendor/github.com/modern-go/reflect2 -name '*_test.go' -delete
sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#g' go.mod vendor/modules.txt

export PATH=/usr/lib/go-1.19/bin:$PATH
export GOCACHE="$work/gocache" GOPATH="$work/gopath" GOFLAGS=-mod=vendor GOPROXY=off
export KUBE_GIT_VERSION=v$version KUBE_GIT_TREE_STATE=clean KUBE_BUILD_PLATFORMS=linux/amd64
echo "kube-build: building ${bins[*]} with $(go version) (about 10 minutes on 2 cores)" >&2
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kubectl" >&2

out=_output/local/bin/linux/amd64
[ -d "$out" ] || out=_output/bin
mkdir -p "$work/bin"
for b in "${bins[@]}"; do install -m 0755 "$out/$b" "$work/bin/$b"; done
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
mv "$work/bin" "$dest.tmp/bin"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "kube-build: cached in $dest/bin" >&2
echo "$dest/bin"
