#!/usr/bin/env bash
# The board image of deploy/kustomize (entrypoint `edgekit`, with edgekit[runtime] from the board installer plus the
# fleet extras oras and cryptography), for amd64 and arm64, built with Debian's buildah: no Docker daemon, no base
# image from any registry. Per architecture:
#   1. a Debian 13 root made by mmdebstrap (arm64: the root scripts/arm64-check.sh caches, reused as it is);
#   2. `edgekit pack` for the architecture's baseline board (the installer: a venv from wheels built for that
#      instruction set), installed into a copy of the root by its own install.sh (arm64 under qemu-user);
#   3. the fleet extras from PyPI wheels for the board's platform, installed offline into the same venv;
#   4. `buildah from scratch` + the root + entrypoint/env/user, committed as edgekit-board:TAG-ARCH;
# then one manifest list edgekit-board:TAG with both, written as an OCI layout to OUT and, with --push, to a registry
# (`--push docker://registry.lan:5000/edgekit/board:TAG`; --insecure for a plain-HTTP registry on a closed network).
# --check then runs `edgekit --version` and imports the fleet extras from each committed image's file system (buildah
# mount + chroot, arm64 under qemu-user: no container runtime needed), and serves a sample bundle until /health answers
# from the image of the host's architecture.
#
# Usage (as root, under the heavy lock: flock /tmp/edgekit-heavy.lock scripts/build-image.sh ...):
#   scripts/build-image.sh [--arch amd64|arm64]... [--tag TAG] [--out DIR] [--push DEST [--insecure]] [--check]
# Caches live in ${EDGEKIT_HOME:-~/.cache/edgekit}/image (the amd64 root; packs and llama.cpp builds as `edgekit pack`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOME_DIR="${EDGEKIT_HOME:-$HOME/.cache/edgekit}"
CACHE="$HOME_DIR/image"
MIRROR="${EDGEKIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie                                     # Debian 13: Python 3.13, the pack's default
PYTHON=3.13
PACKAGES_FILE="$ROOT/scripts/arm64/root-packages.txt"  # the same Debian packages as the arm64 lane's root
MMDEBSTRAP_OPTS=(--variant=apt --dpkgopt=path-exclude=/usr/share/doc/* --dpkgopt=path-exclude=/usr/share/man/*
                 --dpkgopt=path-exclude=/usr/share/locale/*)
# The baseline board per architecture: its build runs on every board of the architecture in the catalog
# (Armv8-A: Cortex-A53 and up; x86-64-v3: AVX2). A faster build for one class is `--device` of `edgekit pack` on its own.
declare -A BASE_DEVICE=([arm64]=rpi-4-4gb [amd64]=intel-n100-16gb)
declare -A PIP_PLATFORMS=([arm64]="manylinux_2_17_aarch64 manylinux_2_28_aarch64 manylinux2014_aarch64 linux_aarch64"
                          [amd64]="manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux2014_x86_64 linux_x86_64")
FLEET_EXTRAS=(oras cryptography)
PREFIX=/opt/edgekit
IMAGE_USER=10001                                 # the DaemonSet's runAsUser
HOST_PY="${HOST_PY:-$ROOT/.venv/bin/python}"
[ -x "$HOST_PY" ] || HOST_PY=/work/main/.venv/bin/python
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"   # no overlay mounts needed (works inside a container too)

log() { printf '[build-image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit "${2:-1}"; }

ARCHES=() TAG="$("$HOST_PY" -c 'import edgekit; print(edgekit.__version__)')" OUT="$CACHE/out" CHECK=no PUSH="" TLS=true
while [ $# -gt 0 ]; do
  case $1 in
    --arch) ARCHES+=("$2"); shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --check) CHECK=yes; shift ;;
    --push) PUSH=$2; shift 2 ;;
    --insecure) TLS=false; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument $1" 2 ;;
  esac
done
[ ${#ARCHES[@]} -gt 0 ] || ARCHES=(amd64 arm64)
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap, chroot, buildah's storage)" 2
for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || die "$tool is missing: apt-get install -y $tool" 2
done
HOST_ARCH=$(dpkg --print-architecture)

# A Debian root tarball for ARCH: arm64 reuses the arm64 lane's cached root; others are built once and cached.
root_tar() {
  local arch=$1 packages key tar
  if [ "$arch" = arm64 ]; then
    tar=$(ls -t "$HOME_DIR"/arm64/root-*.tar 2>/dev/null | head -1 || true)
    [ -n "$tar" ] && { echo "$tar"; return; }
  fi
  packages=$(grep -v '^#' "$PACKAGES_FILE" | paste -sd, -)
  key=$({ echo "$SUITE $arch ${MMDEBSTRAP_OPTS[*]}"; grep -v '^#' "$PACKAGES_FILE"; } | sha256sum | cut -c1-16)
  tar="$CACHE/root-$arch-$key.tar"
  if [ ! -s "$tar" ]; then
    mkdir -p "$CACHE"
    log "$arch: building the Debian $SUITE root (mmdebstrap, log $CACHE/mmdebstrap-$arch.log)"
    # mmdebstrap picks the output format by the file name: keep .tar at the end
    mmdebstrap --arch="$arch" "${MMDEBSTRAP_OPTS[@]}" --include="$packages" "$SUITE" "${tar%.tar}.partial.tar" "$MIRROR" \
      > "$CACHE/mmdebstrap-$arch.log" 2>&1 || { tail -20 "$CACHE/mmdebstrap-$arch.log" >&2; die "mmdebstrap $arch"; }
    mv "${tar%.tar}.partial.tar" "$tar"
  fi
  echo "$tar"
}

# The smallest sample bundle: `edgekit pack` needs one; the image ships none (the init container pulls them).
pack_bundle() {
  local b
  for b in all-minilm-l6-v2-int8-dynamic smollm2-135m-instruct-q4-k-m; do
    [ -f "$HOME_DIR/bundles/$b/manifest.json" ] && { echo "$HOME_DIR/bundles/$b"; return; }
  done
  die "no sample bundle in $HOME_DIR/bundles: run scripts/quickstart.sh --no-serve first" 2
}

# Run COMMAND... inside the root DIR in a private mount namespace (proc, dev), as the board would. The command is
# unshare itself (`in_root ... &` then `$!` is unshare), and --kill-child takes the chrooted process down with it.
IN_ROOT='dir=$1; shift
  mount -t proc proc "$dir/proc"
  mount --rbind /dev "$dir/dev"
  mount -t tmpfs tmpfs "$dir/tmp"
  exec chroot "$dir" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin "$@"'
in_root() {
  unshare --mount --fork --kill-child -- sh -ec "$IN_ROOT" sh "$@"
}

build_arch() {
  local arch=$1 device=${BASE_DEVICE[$1]} work="$OUT/work-$1" tar root plat args=()
  [ -n "$device" ] || die "no baseline board for architecture $arch" 2
  if [ "$arch" != "$HOST_ARCH" ]; then
    grep -qx enabled "/proc/sys/fs/binfmt_misc/qemu-aarch64" 2>/dev/null \
      || die "$arch binaries need qemu-user with binfmt_misc (scripts/arm64-check.sh sets it up)"
  fi
  tar=$(root_tar "$arch")
  rm -rf "$work" && mkdir -p "$work"
  log "$arch: edgekit pack --device $device (llama.cpp built for its instruction set; cached)"
  "$HOST_PY" -m edgekit pack --device "$device" "$(pack_bundle)" --out "$work/pack" --python "$PYTHON" \
    > "$work/pack.log" 2>&1 || { tail -20 "$work/pack.log" >&2; die "$arch: edgekit pack"; }
  log "$arch: fleet extras (${FLEET_EXTRAS[*]}) as wheels for the board"
  for plat in ${PIP_PLATFORMS[$arch]}; do args+=(--platform "$plat"); done
  "$HOST_PY" -m pip download --quiet --only-binary=:all: --implementation cp --python-version "$PYTHON" "${args[@]}" \
    -c "$ROOT/constraints.txt" --dest "$work/fleet-wheels" "${FLEET_EXTRAS[@]}" > "$work/pip.log" 2>&1 \
    || { tail -20 "$work/pip.log" >&2; die "$arch: pip download of the fleet extras"; }
  root="$work/root"
  mkdir -p "$root" && tar -xf "$tar" -C "$root"
  cp -r "$work/pack" "$root/root/pack" && cp -r "$work/fleet-wheels" "$root/root/fleet-wheels"
  log "$arch: install.sh in the root (--no-service; the CPU check is the board's, at its own doctor)"
  in_root "$root" /root/pack/install.sh --prefix "$PREFIX" --no-service --force-cpu > "$work/install.log" 2>&1 \
    || { tail -20 "$work/install.log" >&2; die "$arch: install.sh"; }
  in_root "$root" "$PREFIX/current/venv/bin/python" -m pip install --quiet --no-index --find-links /root/fleet-wheels \
    --no-cache-dir --disable-pip-version-check "${FLEET_EXTRAS[@]}" >> "$work/install.log" 2>&1 \
    || { tail -20 "$work/install.log" >&2; die "$arch: fleet extras"; }
  # The image carries the software only: bundles come from the registry into the node's /var/lib/edgekit.
  rm -rf "$root/root/pack" "$root/root/fleet-wheels" "$root/root/.cache" "$root$PREFIX"/releases/*/bundles/*
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
  mkdir -p "$root/var/lib/edgekit"
  chown "$IMAGE_USER:$IMAGE_USER" "$root/var/lib/edgekit"
  log "$arch: buildah commit edgekit-board:$TAG-$arch"
  local ctr
  ctr=$(buildah from --arch "$arch" scratch)
  tar -C "$root" -cf "$work/rootfs.tar" .
  buildah add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
  buildah config --arch "$arch" --os linux --user "$IMAGE_USER:$IMAGE_USER" --workingdir /var/lib/edgekit \
    --entrypoint "[\"$PREFIX/current/venv/bin/edgekit\"]" --cmd '["serve", "--models", "/var/lib/edgekit/bundles"]' \
    --env "PATH=$PREFIX/current/venv/bin:/usr/local/bin:/usr/bin:/bin" --env EDGEKIT_HOME=/var/lib/edgekit/cache \
    --label "org.opencontainers.image.title=edgekit board" --label "org.opencontainers.image.version=$TAG" \
    --label "dev.edgekit.build-device=$device" "$ctr"
  buildah commit --quiet --rm "$ctr" "edgekit-board:$TAG-$arch" >/dev/null
  rm -rf "$work/rootfs.tar" "$root" "$work/pack" "$work/pack.tar.gz" "$work/fleet-wheels"  # the logs stay
}

# edgekit --version and the fleet imports from each image's file system (arm64 under qemu-user); the daemon's
# /health only on the host's own architecture (an emulated daemon start takes minutes).
check_image() {
  local arch=$1 ctr mnt port=18080 code=1 bundle
  log "check $arch: edgekit --version, the fleet extras$([ "$arch" = "$HOST_ARCH" ] && echo ", /health") from the image's file system"
  ctr=$(buildah from "edgekit-board:$TAG-$arch")
  mnt=$(buildah mount "$ctr")
  in_root "$mnt" "$PREFIX/current/venv/bin/edgekit" --version
  in_root "$mnt" "$PREFIX/current/venv/bin/python" -c 'import platform, oras, cryptography, edgekit.fleet.board; print("fleet ok on", platform.machine())'
  if [ "$arch" != "$HOST_ARCH" ]; then
    buildah umount "$ctr" >/dev/null
    buildah rm "$ctr" >/dev/null
    return
  fi
  bundle=$(pack_bundle)
  mkdir -p "$mnt/var/lib/edgekit/bundles"
  cp -r "$bundle" "$mnt/var/lib/edgekit/bundles/"
  unshare --mount --fork --kill-child -- sh -ec "$IN_ROOT" sh "$mnt" "$PREFIX/current/venv/bin/edgekit" serve \
    --models /var/lib/edgekit/bundles --port "$port" > "$OUT/check-serve.log" 2>&1 &
  local pid=$! i
  for i in $(seq 600); do  # bounded: 5 minutes (verification and load)
    if curl -sf "http://127.0.0.1:$port/health" > "$OUT/check-health.json" 2>/dev/null; then code=0; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  # unshare --fork ignores SIGTERM while it waits: stop the daemon (its child) and unshare follows
  kill -TERM $(pgrep -P "$pid") 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  buildah umount "$ctr" >/dev/null
  buildah rm "$ctr" >/dev/null
  [ "$code" = 0 ] || { tail -20 "$OUT/check-serve.log" >&2; die "the daemon in the image did not answer /health"; }
  log "check $arch: /health $(cat "$OUT/check-health.json")"
}

mkdir -p "$OUT"
for arch in "${ARCHES[@]}"; do
  started=$(date +%s)
  build_arch "$arch"
  log "$arch: done in $(( $(date +%s) - started )) s"
done
buildah manifest rm "edgekit-board:$TAG" >/dev/null 2>&1 || true
buildah manifest create "edgekit-board:$TAG" >/dev/null
for arch in "${ARCHES[@]}"; do
  buildah manifest add --arch "$arch" "edgekit-board:$TAG" "containers-storage:localhost/edgekit-board:$TAG-$arch" >/dev/null
done
rm -rf "$OUT/oci"
buildah manifest push --quiet --all "edgekit-board:$TAG" "oci:$OUT/oci:$TAG"
log "wrote $OUT/oci (OCI layout, tag $TAG: ${ARCHES[*]})"
if [ -n "$PUSH" ]; then
  buildah manifest push --quiet --all --tls-verify="$TLS" "edgekit-board:$TAG" "$PUSH"
  log "pushed $PUSH"
fi
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep edgekit-board >&2 || true
if [ "$CHECK" = yes ]; then
  for arch in "${ARCHES[@]}"; do check_image "$arch"; done
fi
