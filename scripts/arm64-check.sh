#!/usr/bin/env bash
# Proof on arm64, run by CI: an arm64 Debian 13 root under qemu-user, one emulated core per board.
# For each board: `edgekit pack` -> install.sh in a fresh copy of the root with no network ->
# `edgekit doctor` (golden checks: the GGUF sample's greedy ids must equal those recorded on x86) ->
# `edgekit serve` answering the host's openai client on the namespace's loopback (the chat answer must
# equal x86's) -> SIGTERM, exit 0. The Cortex-A76 pack must be refused on a Cortex-A72, by install.sh
# and by doctor, naming the missing feature. Prints a table; writes bench-results/arm64-check.json.
#
# Usage (as root): scripts/arm64-check.sh [--smoke] [--board ID]...
#   --smoke     only the harness: a hand-made aarch64 wheelhouse imports onnxruntime on every core
#   --board ID  only this board (repeatable); default: every board of BOARDS below
# Caches (root file system, sample bundles, packs, llama.cpp builds) live in ${EDGEKIT_HOME:-~/.cache/edgekit}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/scripts/arm64"
HOME_DIR="${EDGEKIT_HOME:-$HOME/.cache/edgekit}"
CACHE="$HOME_DIR/arm64"
RUN="$CACHE/run"                       # fresh roots and every step's output of this run (the last: run.previous)
RESULTS="$ROOT/bench-results/arm64-check.json"
MIRROR="${EDGEKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie                           # Debian 13: Python 3.13, as Raspberry Pi OS on it
# The slower cores first (a board starts as soon as its pack is made): the Cortex-A76 runs the same work
# in about two thirds of the time and also runs the refusal, so the three end about together.
BOARDS=(rpi-zero-2w rpi-4-4gb rpi-5-8gb)
REFUSE_BOARD=rpi-5-8gb                 # its pack (Armv8.2 dot product) must be refused on ...
REFUSE_CORE=cortex-a72                 # ... a core without it,
REFUSE_FEATURE=asimddp                 # naming this feature
# Sample bundles packed for every board, as RECIPE:TARGET; the names are the bundles they export to.
SAMPLES=(recipes/smollm2-135m-instruct.yaml:q4-k-m recipes/all-minilm-l6-v2.yaml:int8-dynamic)
# Serve settings a board needs beyond the defaults, given to `edgekit pack` (which sizes the unit with
# them and refuses bundles that do not fit) and to `edgekit serve` in the root. The Zero 2 W offers
# 262 MiB to models: the default 4096-token context and encoder batch do not fit it.
declare -A SERVE_FLAGS=([rpi-zero-2w]="--n-ctx 1024 --batch-max-tokens 1024")
CHAT_BUNDLE=smollm2-135m-instruct-q4-k-m
EMBED_BUNDLE=all-minilm-l6-v2-int8-dynamic
# Small requests: decode under TCG emulation is slow.
PROMPT="Name one use of a Raspberry Pi in a sentence."
MAX_TOKENS=16
TEXTS=("The parcel arrived on time." "The package was delivered on time.")
# Golden checks only: a speed measured under TCG emulation says nothing about a board.
DOCTOR_FLAGS=(--no-speed)
# Emulation runs a board's work 10-50x slower, and the boards share 2 host cores: loading a model (its
# golden checks run before it is served) and a request may take minutes. The chat model is preloaded;
# the encoder loads on its request (on the Zero 2 W the two take turns in its memory budget anyway).
EMULATED_TIMEOUT=900                   # seconds a model load or a request may take in the emulated daemon
# One thread per model worker: three emulated boards already keep both host cores busy.
# Debug logging: serve.log then shows every request the daemon got (its access log).
EMULATED_SERVE_FLAGS=(--load-timeout-s "$EMULATED_TIMEOUT" --request-timeout-s "$EMULATED_TIMEOUT" --omp-spin-count 0
                      --threads 1 --log-level debug)
# OpenMP threads that wait for work sleep instead of spinning: with three emulated boards on two host
# cores a spinning thread only takes time from the others (results do not depend on it). Python 3.13
# reports one CPU, so what sizes itself by os.cpu_count() runs one thread too, like the daemon's workers:
# doctor's golden checks (llama-cpp-python's default threads) and onnxruntime's intra-op pool.
BOARD_ENV=(OMP_WAIT_POLICY=PASSIVE PYTHON_CPU_COUNT=1)
PORT=8080                              # on the namespace's own loopback
PREFIX=/opt/edgekit                    # install.sh's default prefix
# arch-test: mmdebstrap needs it for a foreign architecture, and --no-install-recommends leaves it out.
HOST_APT=(qemu-user-static binfmt-support mmdebstrap arch-test gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake
          ninja-build iproute2)
MMDEBSTRAP_OPTS=(--variant=apt --dpkgopt=path-exclude=/usr/share/doc/* --dpkgopt=path-exclude=/usr/share/man/*
                 --dpkgopt=path-exclude=/usr/share/locale/*)
NAMESPACE_TIMEOUT=1800                 # seconds one board's emulated lane may take (then all of it is killed)
STOP_TIMEOUT=120                       # seconds from SIGTERM to the daemon's exit
BOARD_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[arm64-check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit "${2:-1}"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
# cpu_now PID: user + system CPU seconds of the waited-for children of shell PID (and theirs): cutime +
# cstime of /proc/PID/stat. PID is the caller's $BASHPID, taken before a $(...) subshell.
CLK_TCK=$(getconf CLK_TCK)
cpu_now() { awk -v tck="$CLK_TCK" '{sub(/^.*\) /, ""); printf "%.1f", ($14 + $15) / tck}' "/proc/$1/stat"; }
cpu_since() { awk -v a="$2" -v b="$(cpu_now "$1")" 'BEGIN {printf "%.1f", b - a}'; }  # PID START

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
    PATH="$BOARD_PATH" "${BOARD_ENV[@]}" "$@"
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

# The auxiliary-vector hwcaps qemu gives this core (what edgekit's CPU checks read), by kernel name.
HWCAP_PROBE='
import ctypes
names = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp".split()
hwcap = ctypes.CDLL(None).getauxval(16)  # AT_HWCAP
print(" ".join(n for i, n in enumerate(names) if hwcap >> i & 1))'

# step NAME CMD...: run CMD, append "NAME seconds exit cpu-seconds" to steps.tsv in the current folder.
step() {
  local name=$1 start cpu rc=0 me=$BASHPID
  shift
  start=$(now) cpu=$(cpu_now "$me")
  "$@" || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$(since "$start")" "$rc" "$(cpu_since "$me" "$cpu")" >> steps.tsv
  log "${PWD##*/} $name: exit $rc after $(since "$start") s, $(cpu_since "$me" "$cpu") CPU s" 2>&3  # fd 3: the terminal, whatever the step's output goes to
  return $rc
}

# Start the daemon in the root, ask it from the host, SIGTERM it; the daemon's exit code goes to serve-exit.
serve_and_ask() {
  local board_id=$1 bin=$PREFIX/current/venv/bin pid rc=0 watchdog
  QEMU_CPU=$CORE chroot "$ROOTFS" /usr/bin/env -i QEMU_CPU="$CORE" HOME=/root LANG=C.UTF-8 PATH="$BOARD_PATH" \
    "${BOARD_ENV[@]}" "$bin/edgekit" serve --models "$PREFIX/current/bundles" --port "$PORT" \
    --device "$PREFIX/current/$board_id.yaml" --preload "$CHAT_BUNDLE" "${EMULATED_SERVE_FLAGS[@]}" \
    ${SERVE_FLAGS[$board_id]:-} > serve.log 2>&1 &
  pid=$!
  "$HOST_PY" "$HERE/host_client.py" --port "$PORT" --daemon-pid "$pid" --ready-timeout "$EMULATED_TIMEOUT" \
    --request-timeout "$EMULATED_TIMEOUT" \
    --chat-model "$CHAT_BUNDLE" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" \
    --embed-model "$EMBED_BUNDLE" "${TEXTS[@]/#/--text=}" > client.json 2> client.log || rc=$?
  kill -TERM "$pid" 2>/dev/null || true
  ( sleep "$STOP_TIMEOUT"; kill -KILL "$pid" 2>/dev/null ) &
  watchdog=$!
  local code=0
  wait "$pid" || code=$?
  kill "$watchdog" 2>/dev/null || true
  echo "$code" > serve-exit
  [ "$rc" = 0 ] && [ "$code" = 0 ]
}

ns_lane() {  # ROOTFS CORE CPUINFO OUT BOARD: install.sh, doctor, serve; results in OUT
  enter_root "$1" "$2" "$3"
  cd "$4"
  local board_id=$5 bin=$PREFIX/current/venv/bin
  step offline assert_offline
  board python3 -c "$HWCAP_PROBE" > hwcaps.txt
  step install board /root/pack/install.sh --no-service > install.log 2>&1
  # Past the install every step runs even when one fails; the report judges each from steps.tsv.
  local failed=0
  step doctor board "$bin/edgekit" doctor "${DOCTOR_FLAGS[@]}" --json > doctor.json 2> doctor.log || failed=1
  step serve serve_and_ask "$board_id" || failed=1
  return $failed
}

ns_refuse_doctor() {  # ROOTFS CORE CPUINFO OUT: doctor of an installed pack on a core it was not built for
  enter_root "$1" "$2" "$3"
  cd "$4"
  board python3 -c "$HWCAP_PROBE" > refuse-hwcaps.txt
  step refuse-doctor board "$PREFIX/current/venv/bin/edgekit" doctor "${DOCTOR_FLAGS[@]}" --json > refuse-doctor.json 2> refuse-doctor.log \
    || true  # the report reads its exit code and message
}

ns_refuse_install() {  # ROOTFS CORE CPUINFO OUT: install.sh of a pack on a core it was not built for
  enter_root "$1" "$2" "$3"
  cd "$4"
  step refuse-install board /root/pack/install.sh --no-service > refuse-install.log 2>&1 || true
  if [ -e "$ROOTFS$PREFIX" ]; then echo present; else echo absent; fi > refuse-install-prefix
}

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
  exec 3>&2
  stage=$2
  HOST_PY=$3
  shift 3
  "ns_$stage" "$@"
  exit
fi

# ---------------------------------------------------------------------------------------------
# On the host.
# ---------------------------------------------------------------------------------------------

# Run STAGE in fresh mount + net + pid namespaces; on timeout everything in them is killed.
# --mount-proc: /proc shows the namespace's processes, so the client sees the daemon's real state.
in_namespace() {
  local stage=$1
  shift
  timeout --kill-after=30 "$NAMESPACE_TIMEOUT" \
    unshare --mount --net --pid --fork --kill-child --mount-proc -- "$0" --in-namespace "$stage" "$HOST_PY" "$@"
}

HOST_STEPS=""  # set in main: host-steps.tsv of this run
# timed NAME CMD...: run CMD on the host, record its wall and CPU time under NAME.
timed() {
  local name=$1 start cpu rc=0 me=$BASHPID
  shift
  start=$(now) cpu=$(cpu_now "$me")
  "$@" || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$(since "$start")" "$rc" "$(cpu_since "$me" "$cpu")" >> "$HOST_STEPS"
  log "$name: exit $rc after $(since "$start") s, $(cpu_since "$me" "$cpu") CPU s"
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
  log "building the arm64 $SUITE root (packages: $packages): about 10 minutes, log $CACHE/mmdebstrap.log"
  rm -f "$CACHE"/root-*.partial.tar
  mmdebstrap --arch=arm64 "${MMDEBSTRAP_OPTS[@]}" --include="$packages" \
    "$SUITE" "$CACHE/root-$ROOT_KEY.partial.tar" "$MIRROR" > "$CACHE/mmdebstrap.log" 2>&1 \
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

# The sample bundles, exported once per version of the code and recipes that make them.
BUNDLES_KEY=$(cd "$ROOT" && find edgekit/export edgekit/schema edgekit/runtime edgekit/bundle.py recipes/data \
  "${SAMPLES[@]%%:*}" -type f \( -name '*.py' -o -name '*.yaml' -o -name '*.txt' -o -name '*.jsonl' \) -print0 \
  | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
BUNDLES="$CACHE/bundles-$BUNDLES_KEY"

export_samples() {
  local spec recipe target
  for spec in "${SAMPLES[@]}"; do
    recipe=${spec%%:*} target=${spec#*:}
    ls -d "$BUNDLES"/*-"$target" > /dev/null 2>&1 && continue
    [ -n "${fetched:-}" ] || { (cd "$ROOT" && HF_HUB_OFFLINE=1 "$HOST_PY" -m edgekit samples fetch); fetched=1; }
    (cd "$ROOT" && HF_HUB_OFFLINE=1 "$HOST_PY" -m edgekit export "$recipe" --target "$target" --out "$BUNDLES")
  done
  for spec in "$CHAT_BUNDLE" "$EMBED_BUNDLE"; do
    [ -f "$BUNDLES/$spec/manifest.json" ] || die "export left no bundle $BUNDLES/$spec"
  done
  find "$CACHE" -maxdepth 1 -name 'bundles-*' ! -name "bundles-$BUNDLES_KEY" -exec rm -rf {} +  # stale keys
}

# What the same requests give on this x86 host (the daemon's greedy answer, int8 and fp32 embeddings).
x86_reference() {
  HF_HUB_OFFLINE=1 "$HOST_PY" "$HERE/x86_reference.py" --chat-bundle "$BUNDLES/$CHAT_BUNDLE" --prompt "$PROMPT" \
    --max-tokens "$MAX_TOKENS" --embed-bundle "$BUNDLES/$EMBED_BUNDLE" "${TEXTS[@]/#/--text=}" > "$RUN/x86.json"
}

EDGEKIT_WHEEL=""  # edgekit's wheel as the first pack of this run built it; the other packs ship the same file
pack_for() {  # BOARD: edgekit pack of the sample bundles for BOARD
  local board_id=$1 wheel_args=()
  [ -z "$EDGEKIT_WHEEL" ] || wheel_args=(--edgekit-wheel "$EDGEKIT_WHEEL")
  (cd "$ROOT" && "$HOST_PY" -m edgekit pack "$BUNDLES/$CHAT_BUNDLE" "$BUNDLES/$EMBED_BUNDLE" \
    --device "$board_id" --out "$CACHE/packs/$board_id" ${SERVE_FLAGS[$board_id]:-} "${wheel_args[@]}" --json) \
    > "$RUN/$board_id/pack.json" || return
  [ -n "$EDGEKIT_WHEEL" ] || EDGEKIT_WHEEL=$(ls "$CACHE/packs/$board_id/wheels"/edgekit-*.whl)
}

# A fresh root with the pack copied in.
root_with_pack() {  # DIR BOARD
  fresh_root "$1"
  cp -a "$CACHE/packs/$2" "$1/root/pack"
}

pack_board() {  # BOARD: its run folder and its pack
  local board_id=$1 core dir="$RUN/$1"
  core=$(core_of "$board_id")
  [ -f "$HERE/cpuinfo/$core" ] || die "no cpuinfo template for $core (board $board_id)" 2
  mkdir -p "$dir"
  echo "$core" > "$dir/core"
  timed "$board_id: pack" pack_for "$board_id"
}

emulate() {  # BOARD: everything on the board's emulated core, then the refusal on the other core
  local board_id=$1 dir="$RUN/$1" core rc=0
  core=$(cat "$dir/core")
  timed "$board_id: fresh root" root_with_pack "$dir/root" "$board_id" || return 1
  write_cpuinfo "$core" "$dir/cpuinfo"
  timed "$board_id: emulated lane on $core" in_namespace lane "$dir/root" "$core" "$dir/cpuinfo" "$dir" "$board_id" || rc=1
  if [ "$board_id" = "$REFUSE_BOARD" ] && [ -e "$dir/root$PREFIX/current" ]; then
    write_cpuinfo "$REFUSE_CORE" "$dir/cpuinfo-refuse"
    timed "$board_id: doctor on $REFUSE_CORE" in_namespace refuse_doctor "$dir/root" "$REFUSE_CORE" "$dir/cpuinfo-refuse" "$dir" || rc=1
    timed "$board_id: fresh root for the refusal" root_with_pack "$RUN/refuse-root" "$board_id" || return 1
    timed "$board_id: install.sh on $REFUSE_CORE" in_namespace refuse_install "$RUN/refuse-root" "$REFUSE_CORE" "$dir/cpuinfo-refuse" "$dir" || rc=1
    rm -rf "$RUN/refuse-root"
  fi
  [ $rc != 0 ] || rm -rf "$dir/root"  # about 1 GB per board (kept when a step failed, to look into)
  return $rc
}

smoke() {
  local wheels="$CACHE/smoke-wheels" core rootfs="$RUN/smoke/root"
  mkdir -p "$RUN/smoke"
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
  local smoke_only=0 boards=() started started_cpu root_pid root_cached=false bundles_cached=false board_id me=$BASHPID
  started=$(now) started_cpu=$(cpu_now "$me")
  while [ $# -gt 0 ]; do
    case $1 in
      --smoke) smoke_only=1 ;;
      --board) [ $# -ge 2 ] || die "--board needs a device id" 2; boards+=("$2"); shift ;;
      *) die "unknown argument $1 (usage: $0 [--smoke] [--board ID]...)" 2 ;;
    esac
    shift
  done
  [ ${#boards[@]} -gt 0 ] || boards=("${BOARDS[@]}")
  for board_id in "${boards[@]}"; do
    [ -f "$ROOT/devices/$board_id.yaml" ] || die "unknown board $board_id (devices/$board_id.yaml)" 2
  done
  [ "$(id -u)" = 0 ] || die "run as root: it mounts binfmt_misc, chroots and creates namespaces" 2
  HOST_PY="${EDGEKIT_PYTHON:-}"
  if [ -z "$HOST_PY" ]; then
    source "$ROOT/scripts/setup.sh"  # the host's venv: edgekit pack, the openai client
    HOST_PY=$(command -v python)
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's edgekit, also in a shared venv
  # The last run's outputs stay beside the new one (without its roots) to look into.
  rm -rf "$RUN.previous"
  if [ -d "$RUN" ]; then
    rm -rf "$RUN"/*/root "$RUN/refuse-root" "$RUN/smoke/root"
    mv "$RUN" "$RUN.previous"
  fi
  mkdir -p "$RUN" "$CACHE/packs" "$(dirname "$RESULTS")"
  HOST_STEPS="$RUN/host-steps.tsv"
  : > "$HOST_STEPS"
  timed host-tools install_host_tools
  [ -s "$ROOT_TAR" ] && root_cached=true
  if [ $smoke_only = 1 ]; then
    timed root build_root
    smoke
    return
  fi
  # The root builds (mostly emulated dpkg, one core) while the host exports and packs.
  timed root build_root &
  root_pid=$!
  [ -f "$BUNDLES/$CHAT_BUNDLE/manifest.json" ] && [ -f "$BUNDLES/$EMBED_BUNDLE/manifest.json" ] && bundles_cached=true
  timed "sample bundles" export_samples || die "exporting the sample bundles failed"
  # Only the report needs the x86 reference: it runs beside the first pack and board.
  timed "x86 reference" x86_reference &
  local reference_pid=$! started_boards=() pids=() i
  for board_id in "${boards[@]}"; do
    pack_board "$board_id" || { log "$board_id: edgekit pack failed"; continue; }
    [ -z "$root_pid" ] || { wait "$root_pid" || die "building the root failed"; root_pid=""; }
    # Each board starts as soon as its pack is made; the boards run side by side (much of an emulated
    # lane is one thread: pip, imports, hashing).
    emulate "$board_id" &
    pids+=($!)
    started_boards+=("$board_id")
  done
  [ -z "$root_pid" ] || wait "$root_pid" || die "building the root failed"
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || log "${started_boards[$i]}: a step failed (outputs in $RUN/${started_boards[$i]})"
  done
  wait "$reference_pid" || die "the x86 reference run failed"
  "$HOST_PY" "$HERE/report.py" --run "$RUN" --out "$RESULTS" --boards "${boards[@]}" --chat-bundle "$BUNDLES/$CHAT_BUNDLE" \
    --embed-bundle "$EMBED_BUNDLE" --refuse-board "$REFUSE_BOARD" \
    --refuse-core "$REFUSE_CORE" --refuse-feature "$REFUSE_FEATURE" --root-cached "$root_cached" \
    --bundles-cached "$bundles_cached" \
    --total-seconds "$(since "$started")" --cpu-seconds "$(cpu_since "$me" "$started_cpu")"
}

main "$@"
