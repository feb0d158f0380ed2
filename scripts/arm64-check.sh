#!/usr/bin/env bash
# Proof on arm64, run by CI: an arm64 Debian 13 root under qemu-user, one emulated core per board.
# For each board: `edgekit pack` -> install.sh in a fresh copy of the root with no network ->
# `edgekit doctor` -> `edgekit serve` answering the host's openai client on the namespace's loopback
# -> SIGTERM, exit 0; greedy token ids compared with x86. The Cortex-A76 pack must be refused on a
# Cortex-A72, by install.sh and by doctor. Prints a table; writes bench-results/arm64-check.json.
#
# Usage (root): scripts/arm64-check.sh [--smoke] [--board ID]...
#   --smoke     only the harness: a hand-made aarch64 wheelhouse imports onnxruntime on every core
#   --board ID  only this board (repeatable); default: every board of BOARDS below
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/scripts/arm64"
CACHE="${EDGEKIT_HOME:-$HOME/.cache/edgekit}/arm64"
RUN="$CACHE/run"                       # fresh roots and per-step logs of the last run
RESULTS="$ROOT/bench-results"
MIRROR="${EDGEKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie                           # Debian 13: Python 3.13, as Raspberry Pi OS on it
BOARDS=(rpi-5-8gb rpi-4-4gb rpi-zero-2w)
REFUSE_BOARD=rpi-5-8gb                 # its pack (Armv8.2 dot product) must be refused on ...
REFUSE_CORE=cortex-a72                 # ... a core without it
REFUSE_FEATURE=asimddp                 # the missing feature the refusal must name
HOST_APT=(qemu-user-static binfmt-support mmdebstrap gcc-aarch64-linux-gnu g++-aarch64-linux-gnu iproute2)
MMDEBSTRAP_OPTS=(--variant=apt --dpkgopt=path-exclude=/usr/share/doc/* --dpkgopt=path-exclude=/usr/share/man/*
                 --dpkgopt=path-exclude=/usr/share/locale/*)
STEP_TIMEOUT=900                       # seconds; every emulated step is bounded
BOARD_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[arm64-check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit "${2:-1}"; }

# The qemu cpu model of a board: the device profile's cpu.core_type (qemu names cores the same way).
core_of() { awk '$1 == "core_type:" {print $2; exit}' "$ROOT/devices/$1.yaml"; }

# An ARM /proc/cpuinfo for CORE with one processor per host CPU the namespace can use (honest
# Features per core; onnxruntime's cpuinfo library segfaults on the host's x86 file under qemu).
write_cpuinfo() {
  local core=$1 out=$2 i
  : > "$out"
  for ((i = 0; i < $(nproc); i++)); do
    { printf 'processor\t: %d\n' "$i"; cat "$HERE/cpuinfo/$core"; echo; } >> "$out"
  done
}

# ---------------------------------------------------------------------------------------------
# Inside the namespaces (pid 1 of fresh mount + net + pid namespaces; only loopback exists).
# ---------------------------------------------------------------------------------------------

# Mount what the root needs: its own proc with an ARM cpuinfo, a minimal /dev, tmpfs /tmp. Never the
# host's /sys: with the host's x86 /sys and cpuinfo, onnxruntime's cpuinfo library segfaults under
# qemu. A tmpfs /sys holds only the CPU lists it reads first, matching the cpuinfo file, so it
# initialises as on a board (from the ARM cpuinfo and the emulated core's hwcaps) instead of failing.
enter_root() {
  local rootfs=$1 core=$2 cpuinfo=$3 node list
  ip link set lo up
  mount -t proc -o nosuid,nodev,noexec proc "$rootfs/proc"
  mount --bind "$cpuinfo" "$rootfs/proc/cpuinfo"
  mount -t tmpfs -o mode=0755,nosuid,nodev,noexec,size=1m tmpfs "$rootfs/sys"
  mkdir -p "$rootfs/sys/devices/system/cpu"
  list="0-$(($(grep -c '^processor' "$cpuinfo") - 1))"
  for node in possible present online; do echo "$list" > "$rootfs/sys/devices/system/cpu/$node"; done
  mount -t tmpfs -o mode=0755,nosuid,size=16m tmpfs "$rootfs/dev"
  for node in null zero full random urandom; do
    touch "$rootfs/dev/$node"
    mount --bind "/dev/$node" "$rootfs/dev/$node"
  done
  ln -s /proc/self/fd "$rootfs/dev/fd"
  ln -s /proc/self/fd/0 "$rootfs/dev/stdin"
  ln -s /proc/self/fd/1 "$rootfs/dev/stdout"
  ln -s /proc/self/fd/2 "$rootfs/dev/stderr"
  mkdir -m 1777 "$rootfs/dev/shm"  # multiprocessing semaphores
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$rootfs/dev/shm"
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$rootfs/tmp"
  ROOTFS=$rootfs CORE=$core
}

# Run a command inside the root on the emulated core. QEMU_CPU must be in the environment of every
# exec: qemu-user reads it per process (a child started with a scrubbed environment gets `max`).
board() {
  QEMU_CPU=$CORE chroot "$ROOTFS" /usr/bin/env -i QEMU_CPU="$CORE" HOME=/root LANG=C.UTF-8 \
    PATH="$BOARD_PATH" "$@"
}

# No network inside: only the loopback link, and a connection to a public address fails at once.
assert_offline() {
  local links
  links=$(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')
  [ "$links" = "lo " ] || die "the namespace has links besides loopback: $links"
  board python3 -c '
import errno, socket, sys
try:
    socket.create_connection(("151.101.2.132", 80), timeout=5)  # deb.debian.org
except OSError as exc:
    sys.exit(0 if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH) else f"unexpected: {exc}")
sys.exit("reached the network from inside the namespace")'
}

# The auxiliary-vector hwcaps qemu gives this core (what edgekit's CPU check reads), by kernel name.
HWCAP_PROBE='
import ctypes
names = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp".split()
hwcap = ctypes.CDLL(None).getauxval(16)  # AT_HWCAP
print(" ".join(n for i, n in enumerate(names) if hwcap >> i & 1))'

ns_smoke() {  # ROOTFS CORE CPUINFO OUT: import the smoke wheelhouse's packages on CORE
  enter_root "$1" "$2" "$3"
  local out=$4
  assert_offline
  board python3 -c "$HWCAP_PROBE" > "$out.hwcap"
  board /opt/smoke/bin/python -c '
import json, sys
import numpy, onnxruntime, tokenizers
print(json.dumps({"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                  "tokenizers": tokenizers.__version__, "providers": onnxruntime.get_available_providers(),
                  "python": sys.version.split()[0]}))' > "$out"
}

ns_smoke_install() {  # ROOTFS CORE CPUINFO: a venv from the offline wheelhouse copied into /root/wheels
  enter_root "$1" "$2" "$3"
  assert_offline
  board python3 -m venv /opt/smoke
  board /opt/smoke/bin/pip install --quiet --no-index --no-compile --find-links /root/wheels \
    onnxruntime numpy tokenizers
}

if [ "${1:-}" = --in-namespace ]; then
  stage=$2; shift 2
  "ns_$stage" "$@"
  exit
fi

# ---------------------------------------------------------------------------------------------
# On the host.
# ---------------------------------------------------------------------------------------------

# Run STAGE in fresh mount + net + pid namespaces (killed with everything in them on timeout).
in_namespace() {
  timeout --kill-after=30 "$STEP_TIMEOUT" \
    unshare --mount --net --pid --fork --kill-child -- "$0" --in-namespace "$@"
}

declare -A STEP_SECONDS=()
STEP_ORDER=()
# timed NAME CMD...: run CMD, record its wall time under NAME (for the table and the JSON).
timed() {
  local name=$1 start rc=0
  shift
  start=$(date +%s.%N)
  "$@" || rc=$?
  STEP_SECONDS[$name]=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  STEP_ORDER+=("$name")
  log "$name: ${STEP_SECONDS[$name]%.*} s (exit $rc)"
  return $rc
}

install_host_tools() {
  local missing=() pkg
  for pkg in "${HOST_APT[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  local binfmt=/proc/sys/fs/binfmt_misc
  [ -e "$binfmt/status" ] || mount -t binfmt_misc binfmt_misc "$binfmt"
  update-binfmts --enable qemu-aarch64 2>/dev/null || true  # exits 1 when it is already enabled
  grep -qx enabled "$binfmt/qemu-aarch64" || die "binfmt_misc: qemu-aarch64 is not enabled"
  # F: the kernel opened the interpreter at registration, so it works inside a chroot without it.
  grep -q '^flags: .*F' "$binfmt/qemu-aarch64" || die "binfmt_misc: qemu-aarch64 lacks the F (fix-binary) flag"
}

# The cached root: keyed by the package list and the build options, so a change rebuilds it.
ROOT_KEY=$({ echo "$SUITE ${MMDEBSTRAP_OPTS[*]}"; grep -v '^#' "$HERE/root-packages.txt"; } | sha256sum | cut -c1-16)
ROOT_TAR="$CACHE/root-$ROOT_KEY.tar"

build_root() {
  [ -s "$ROOT_TAR" ] && { log "cached root $ROOT_TAR"; return; }
  local packages
  packages=$(grep -v '^#' "$HERE/root-packages.txt" | paste -sd, -)
  mkdir -p "$CACHE"
  log "building the arm64 $SUITE root (packages: $packages); about 8 minutes"
  rm -f "$CACHE"/root-*.partial.tar
  mmdebstrap --arch=arm64 "${MMDEBSTRAP_OPTS[@]}" --include="$packages" \
    "$SUITE" "$CACHE/root-$ROOT_KEY.partial.tar" "$MIRROR" 2> "$CACHE/mmdebstrap.log" \
    || { tail -20 "$CACHE/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $CACHE/mmdebstrap.log)"; }
  mv "$CACHE/root-$ROOT_KEY.partial.tar" "$ROOT_TAR"
  find "$CACHE" -maxdepth 1 -name 'root-*.tar' ! -name "root-$ROOT_KEY.tar" -delete  # stale keys
}

# A fresh copy of the cached root at DIR.
fresh_root() {
  rm -rf "$1"
  mkdir -p "$1"
  tar -xf "$ROOT_TAR" -C "$1"
}

smoke() {
  local wheels="$CACHE/smoke-wheels" core rootfs="$RUN/smoke/root"
  if [ ! -d "$wheels" ]; then
    # pip does not widen an explicit manylinux_2_28 to the older tags of abi3 wheels (tokenizers): name both.
    "$HOST_PY" -m pip download --quiet --only-binary=:all: --platform manylinux_2_28_aarch64 \
      --platform manylinux2014_aarch64 --python-version 3.13 --implementation cp --abi cp313 -c "$ROOT/constraints.txt" \
      -d "$wheels.partial" onnxruntime numpy tokenizers
    mv "$wheels.partial" "$wheels"
  fi
  timed smoke-root fresh_root "$rootfs"
  cp -r "$wheels" "$rootfs/root/wheels"
  write_cpuinfo cortex-a53 "$RUN/smoke/cpuinfo-cortex-a53"
  timed smoke-install in_namespace smoke_install "$rootfs" cortex-a53 "$RUN/smoke/cpuinfo-cortex-a53"
  for core in cortex-a76 cortex-a72 cortex-a53; do
    write_cpuinfo "$core" "$RUN/smoke/cpuinfo-$core"
    timed "smoke-import-$core" in_namespace smoke "$rootfs" "$core" "$RUN/smoke/cpuinfo-$core" "$RUN/smoke/$core.json"
    log "$core: hwcaps $(cat "$RUN/smoke/$core.json.hwcap")"
    log "$core: $(cat "$RUN/smoke/$core.json")"
  done
}

main() {
  local smoke_only=0 boards=()
  while [ $# -gt 0 ]; do
    case $1 in
      --smoke) smoke_only=1 ;;
      --board) boards+=("$2"); shift ;;
      *) die "unknown argument $1 (usage: $0 [--smoke] [--board ID]...)" 2 ;;
    esac
    shift
  done
  [ ${#boards[@]} -gt 0 ] || boards=("${BOARDS[@]}")
  [ "$(id -u)" = 0 ] || die "run as root: it mounts binfmt_misc, chroots and creates namespaces" 2
  HOST_PY="${EDGEKIT_PYTHON:-}"
  if [ -z "$HOST_PY" ]; then
    source "$ROOT/scripts/setup.sh"  # the host's venv (openai client, edgekit pack)
    HOST_PY=$(command -v python)
  fi
  mkdir -p "$RUN" "$RESULTS"
  timed host-tools install_host_tools
  timed root build_root
  if [ $smoke_only = 1 ]; then
    smoke
    return
  fi
  die "the full lane needs edgekit pack and edgekit doctor (not merged yet); run --smoke" 2
}

main "$@"
