#!/usr/bin/env bash
# Builds the ferroclaw images without a registry, from binaries cargo built on this machine:
# FROM scratch + one stripped binary + the shared libraries `ldd` lists + a passwd entry for
# the non-root agent user (docker/rootfs.sh, which the Dockerfiles' build stages run too).
# Same image names as the Dockerfiles here (which need a registry).
#
#   docker/build-offline.sh [--profile debug|release] [--tag TAG] [--no-build]
#                           [--agent-binary NAME --agent-image IMAGE]
#
#   ferroclaw-agent:TAG  /ferroclaw-agent
#   ferroclaw:TAG        /ferroclaw-services, which is the gateway, runner, delivery, scheduler
#                        or CLI by the name it runs under: /ferroclaw-gateway, /ferroclaw-runner,
#                        /ferroclaw-delivery, /ferroclaw-scheduler and /ferroclaw link to it.
#
# The binaries are stripped; their debug info stays in target/PROFILE/debuginfo/NAME.debug.
# --profile release makes the small images (debug binaries are larger even stripped).
# --agent-binary builds the agent image from another binary (the isolation test's hostile
# agent) under another name, and nothing else.
#
# Builds the binaries first (cargo build) unless --no-build.
set -euo pipefail
profile=debug
tag=latest
build=yes
agent_binary=ferroclaw-agent
agent_image=ferroclaw-agent
usage() {
  echo "usage: $0 [--profile debug|release] [--tag TAG] [--no-build]" \
    "[--agent-binary NAME --agent-image IMAGE]" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:-}; shift 2 || usage ;;
    --tag) tag=${2:-}; shift 2 || usage ;;
    --no-build) build=no; shift ;;
    --agent-binary) agent_binary=${2:-}; shift 2 || usage ;;
    --agent-image) agent_image=${2:-}; shift 2 || usage ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) usage ;;
  esac
done
case "$profile" in debug|release) ;; *) usage ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/$profile
debug_dir=$bin/debuginfo
services=no
if [ "$agent_binary" = ferroclaw-agent ]; then services=yes; fi

if [ "$build" = yes ]; then
  cargo_flags=(--workspace --bin "$agent_binary")
  if [ "$services" = yes ]; then cargo_flags+=(--bin ferroclaw-services); fi
  if [ "$profile" = release ]; then cargo_flags+=(--release); fi
  (cd "$root" && cargo build "${cargo_flags[@]}")
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

mkdir -p "$ctx/agent"
bash "$root/docker/rootfs.sh" "$ctx/agent/rootfs" "$debug_dir" "$bin/$agent_binary"
cat > "$ctx/agent/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
USER 10001:10001
ENTRYPOINT ["/$agent_binary"]
DOCKERFILE
docker build -q -t "$agent_image:$tag" "$ctx/agent" >/dev/null
echo "built $agent_image:$tag"
if [ "$services" = no ]; then exit 0; fi

mkdir -p "$ctx/services"
bash "$root/docker/rootfs.sh" "$ctx/services/rootfs" "$debug_dir" "$bin/ferroclaw-services" \
  ferroclaw-gateway ferroclaw-runner ferroclaw-delivery ferroclaw-scheduler ferroclaw
cat > "$ctx/services/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
CMD ["/ferroclaw", "--help"]
DOCKERFILE
docker build -q -t "ferroclaw:$tag" "$ctx/services" >/dev/null
echo "built ferroclaw:$tag"
echo "debug info: $debug_dir"
