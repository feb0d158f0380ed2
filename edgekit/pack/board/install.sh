#!/bin/sh
# Install this edgekit pack on the board, offline: ./install.sh [--prefix @DEFAULT_PREFIX@] [--force-cpu] [--no-service]
#
# 1. Checks before anything is written: every file against pack.json (sha256), this board's Python,
#    glibc, CPU features (the pack's llama.cpp build needs them; without them it dies with SIGILL)
#    and free space. Any failure: a line naming it, exit non-zero, nothing written.
# 2. Builds a new release in PREFIX/releases/PACK_ID: a fresh venv (pip from the pack's own wheel,
#    --no-index: no network), the bundles, the device profile, the systemd unit; then marks it complete.
# 3. Points PREFIX/current at it in one rename. Until then the previous release keeps working, so an
#    interrupted or failed install changes nothing; re-running with the same pack only re-checks and
#    re-points (a no-op). The two newest releases are kept, so a switch back is `ln -sfn`.
# 4. Installs /etc/systemd/system/edgekit.service when systemd runs (unless --no-service) and restarts it.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=@DEFAULT_PREFIX@
FORCE_CPU=
SERVICE=auto
PY=${EDGEKIT_PYTHON:-python3}

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { code=$1; shift; say "$*"; exit "$code"; }
usage() { sed -n '2p' "$0" | sed 's/^# //'; }

while [ $# -gt 0 ]; do
  case $1 in
    --prefix) [ $# -ge 2 ] || die 2 "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#--prefix=}; shift ;;
    --force-cpu) FORCE_CPU=--force-cpu; shift ;;
    --no-service) SERVICE=no; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die 2 "unknown argument: $1" ;;
  esac
done
case $PREFIX in /*) ;; *) die 2 "--prefix must be an absolute path (got $PREFIX)" ;; esac
case $PREFIX in
  *[!A-Za-z0-9/._-]*) die 2 "--prefix may hold only letters, digits and / . _ - (it goes into the systemd unit)" ;;
esac
PREFIX=${PREFIX%/}
command -v "$PY" >/dev/null 2>&1 || die 2 "$PY not found: install the board's python3 (Debian: apt install python3)"

# Step 1: nothing is written before this passes.
facts=$("$PY" "$HERE/pack_check.py" check "$HERE" --prefix "$PREFIX" $FORCE_CPU) || exit $?
eval "$facts"
say "pack $PACK_ID verified: edgekit for $PACK_DEVICE ($PACK_TARGET), Python $PACK_PYTHON"

umask 022
mkdir -p "$PREFIX/releases"
# One install at a time per prefix.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$PREFIX/.install.lock"
  flock -n 9 || die 2 "another install.sh is running on $PREFIX"
fi

REL="$PREFIX/releases/$PACK_ID"
previous=$(readlink "$PREFIX/current" 2>/dev/null || true)
building=
# A release this run started but did not complete is removed on any exit; `current` never points to one.
trap '[ -z "$building" ] || rm -rf "$REL"' EXIT
trap 'exit 130' INT TERM

if [ -f "$REL/.complete" ] && cmp -s "$REL/pack.json" "$HERE/pack.json"; then
  say "release $PACK_ID is already installed"
else
  # Step 2 (a release left incomplete by a killed run is rebuilt from scratch).
  building=1
  rm -rf "$REL"
  mkdir -p "$REL"
  say "creating $REL/venv"
  "$PY" -m venv --without-pip "$REL/venv"
  say "installing $PACK_REQUIREMENT from the pack's wheels (no network)"
  # pip runs from its own wheel (no ensurepip needed); --isolated + PIP_CONFIG_FILE: no pip.conf, no PIP_* settings.
  # --no-compile: pip would byte-compile every module of every wheel; precompile below does what the board imports.
  PIP_CONFIG_FILE=/dev/null "$REL/venv/bin/python" "$HERE/$PACK_PIP_WHEEL/pip" install --isolated --quiet \
    --no-index --find-links "$HERE/wheels" --only-binary=:all: --no-cache-dir --disable-pip-version-check --no-compile \
    "$PACK_REQUIREMENT" pip \
    || die 3 "pip could not install the pack's wheels; $PREFIX/current is unchanged"
  # -I: the venv's own packages only (no PYTHON* variables, and no folder in the current directory
  # named like a package shadows it).
  "$REL/venv/bin/python" -I -c 'import llama_cpp, onnxruntime, tokenizers' \
    || die 3 "the installed runtime does not load on this board; $PREFIX/current is unchanged"
  "$REL/venv/bin/python" -I -m edgekit.pack.board.precompile \
    || die 3 "byte-compiling what the board imports failed; $PREFIX/current is unchanged"
  cp -R "$HERE/bundles" "$REL/bundles"
  cp "$HERE/$PACK_DEVICE.yaml" "$HERE/pack.json" "$REL/"
  "$REL/venv/bin/edgekit" bundles "$REL/bundles" >/dev/null \
    || die 1 "the copied bundles do not verify; $PREFIX/current is unchanged"
  # The pack's unit (sized for the board when it was made) serves whatever `current` points to.
  sed "s|@PREFIX@|$PREFIX|g" "$HERE/$PACK_UNIT" > "$REL/$PACK_UNIT"
  chmod -R a+rX "$REL"  # the service runs as a transient user (DynamicUser) that must read the release
  sync
  touch "$REL/.complete"
  building=
fi

# Step 3: switch in one rename (a symlink replaced atomically).
ln -sfn "releases/$PACK_ID" "$PREFIX/.current.new"
mv -Tf "$PREFIX/.current.new" "$PREFIX/current"
say "$PREFIX/current -> releases/$PACK_ID"

if [ "releases/$PACK_ID" != "$previous" ]; then
  # Keep the new release and the one it replaced (to switch back: ln -sfn + mv -T, as above); remove older ones.
  for old in "$PREFIX"/releases/*; do
    [ -d "$old" ] || continue
    name=${old##*/}
    [ "$name" = "$PACK_ID" ] || [ "releases/$name" = "$previous" ] || rm -rf "$old"
  done
fi

# Step 4: the service, when systemd is running.
if [ "$SERVICE" = auto ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  cp "$REL/$PACK_UNIT" /etc/systemd/system/edgekit.service.new
  mv -f /etc/systemd/system/edgekit.service.new /etc/systemd/system/edgekit.service
  systemctl daemon-reload
  systemctl enable --quiet edgekit.service
  if [ "releases/$PACK_ID" != "$previous" ] || ! systemctl is-active --quiet edgekit.service; then
    systemctl restart edgekit.service || die 3 "installed, but edgekit.service did not start: journalctl -u edgekit"
  fi
  say "edgekit.service enabled and running (systemctl status edgekit)"
elif [ "$SERVICE" = auto ]; then
  say "no systemd here: start the server with $PREFIX/current/venv/bin/edgekit serve --models $PREFIX/current/bundles"
fi
say "done: $PREFIX/current/venv/bin/edgekit"
