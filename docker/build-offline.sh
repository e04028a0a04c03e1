#!/usr/bin/env bash
# Builds the ferroclaw images without a registry, from binaries cargo built on this machine:
# FROM scratch + the binaries + the shared libraries `ldd` lists + a passwd entry for the
# non-root agent user. Same image names as the Dockerfiles here (which need a registry).
#
#   docker/build-offline.sh [--profile debug|release] [--tag TAG] [--no-build]
#                           [--agent-binary NAME --agent-image IMAGE]
#
# --agent-binary builds the agent image from another binary (the isolation test's hostile
# agent) under another name.
#
# Builds the binaries first (cargo build --workspace --bins) unless --no-build.
set -euo pipefail
profile=debug
tag=latest
build=yes
agent_binary=ferroclaw-agent
agent_image=ferroclaw-agent
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --no-build) build=no; shift ;;
    --agent-binary) agent_binary=$2; shift 2 ;;
    --agent-image) agent_image=$2; shift 2 ;;
    *) echo "usage: $0 [--profile debug|release] [--tag TAG] [--no-build]" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
cargo_flags=()
if [ "$profile" = release ]; then cargo_flags+=(--release); fi
if [ "$build" = yes ]; then
  (cd "$root" && cargo build "${cargo_flags[@]}" --workspace --bins)
fi
bin=$root/target/$profile
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# rootfs DIR BINARY...: the binaries at /, their libraries at their own paths.
rootfs() {
  local dir=$1; shift
  mkdir -p "$dir/etc" "$dir/tmp"
  for b in "$@"; do cp "$bin/$b" "$dir/$b"; done
  for b in "$@"; do ldd "$bin/$b"; done \
    | awk '/=>/ && $3 ~ /^\// {print $3} /^[ \t]*\// {print $1}' | sort -u \
    | while read -r lib; do
        mkdir -p "$dir$(dirname "$lib")"
        cp -L "$lib" "$dir$lib"
      done
  printf 'root:x:0:0::/:/nonexistent\nagent:x:10001:10001::/nonexistent:/nonexistent\n' > "$dir/etc/passwd"
  printf 'root:x:0:\nagent:x:10001:\n' > "$dir/etc/group"
}

mkdir -p "$ctx/agent"
rootfs "$ctx/agent/rootfs" "$agent_binary"
cat > "$ctx/agent/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
USER 10001:10001
ENTRYPOINT ["/$agent_binary"]
DOCKERFILE
docker build -q -t "$agent_image:$tag" "$ctx/agent" >/dev/null
echo "built $agent_image:$tag"
if [ "$agent_binary" != ferroclaw-agent ]; then exit 0; fi

mkdir -p "$ctx/services"
rootfs "$ctx/services/rootfs" ferroclaw-gateway ferroclaw-runner ferroclaw-delivery ferroclaw-scheduler ferroclaw
cat > "$ctx/services/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
CMD ["/ferroclaw", "--help"]
DOCKERFILE
docker build -q -t "ferroclaw:$tag" "$ctx/services" >/dev/null
echo "built ferroclaw:$tag"
