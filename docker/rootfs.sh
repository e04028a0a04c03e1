#!/usr/bin/env bash
# Lays out a FROM-scratch image's root: one stripped binary at /, links to it under other
# names, the shared libraries `ldd` lists at their own paths, /etc/passwd and /etc/group
# (root and the non-root `agent` user, uid 10001) and /tmp. The binary's debug info goes to
# DEBUG_DIR/NAME.debug, which the stripped binary names (.gnu_debuglink), so gdb and
# backtraces find it when it is put beside the binary or under /usr/lib/debug.
#
#   docker/rootfs.sh ROOTFS DEBUG_DIR BINARY [LINK_NAME]...
#
# Used by build-offline.sh (no registry) and by the Dockerfiles' build stages, so both make
# the same images. Needs objcopy (binutils) and ldd.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 ROOTFS DEBUG_DIR BINARY [LINK_NAME]..." >&2
  exit 2
fi
rootfs=$1
debug_dir=$2
binary=$3
shift 3
name=$(basename "$binary")
if [ ! -f "$binary" ]; then
  echo "$binary not found (build it first: cargo build --workspace --bins)" >&2
  exit 1
fi
for tool in objcopy ldd; do
  if ! command -v "$tool" >/dev/null; then
    echo "$0 needs $tool (Debian: apt-get install binutils libc-bin)" >&2
    exit 1
  fi
done

mkdir -p "$rootfs/etc" "$rootfs/tmp" "$debug_dir"
chmod 1777 "$rootfs/tmp"
objcopy --only-keep-debug "$binary" "$debug_dir/$name.debug"
# --add-gnu-debuglink reads the debug file (for its CRC) by the path given, and records
# its file name only.
objcopy --strip-all --add-gnu-debuglink="$debug_dir/$name.debug" "$binary" "$rootfs/$name"
for link in "$@"; do
  ln -sfn "$name" "$rootfs/$link"
done

ldd "$binary" \
  | awk '/=>/ && $3 ~ /^\// {print $3} /^[ \t]*\// {print $1}' | sort -u \
  | while read -r lib; do
      mkdir -p "$rootfs$(dirname "$lib")"
      cp -L "$lib" "$rootfs$lib"
    done
printf 'root:x:0:0::/:/nonexistent\nagent:x:10001:10001::/nonexistent:/nonexistent\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nagent:x:10001:\n' > "$rootfs/etc/group"
