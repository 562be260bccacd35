#!/usr/bin/env bash
# Build the images the docker and docker-swarm pools run, cached: a step whose image tag exists
# is skipped (docker's layer cache makes the rest quick). Run from anywhere; needs dockerd.
#
#   docker/build-images.sh                 # base from debootstrap (no registry needed)
#   BASE_IMAGE=python:3.12-slim docker/build-images.sh   # where a registry is reachable
#
# Images:
#   poolgate/debian-base:<release>  a minimal Debian (debootstrap --variant=minbase, imported)
#   poolgate/kernel:latest           python3 + ipykernel + cryptography + poolgate.kernel_launcher
#   poolgate/poolgate:latest         gateway and workers (only with the argument "all"; for
#                                    docker/compose.yaml and docker/kubernetes/): poolgate from a wheelhouse made here
#   poolgate/rabbitmq:latest         Debian's rabbitmq-server (only with "all"; for
#                                    docker/compose.rabbitmq.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

. /etc/os-release
RELEASE=${RELEASE:-${VERSION_CODENAME:-bookworm}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCAL_BASE=${LOCAL_BASE:-poolgate/debian-base:$RELEASE}
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}
KERNEL_IMAGE=${KERNEL_IMAGE:-poolgate/kernel:latest}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if [ "$BASE_IMAGE" = "$LOCAL_BASE" ] && ! have_image "$LOCAL_BASE"; then
  command -v debootstrap >/dev/null || { echo "build-images: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
  root=$(mktemp -d /var/tmp/poolgate-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "build-images: debootstrap $RELEASE into $root (a few minutes, once)"
  debootstrap --variant=minbase "$RELEASE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; exit 1; }
  # apt sources inside the image: the same mirror, with updates and security
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$MIRROR" "$RELEASE" "$MIRROR" "$RELEASE" "$RELEASE" >"$root/etc/apt/sources.list"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - "$LOCAL_BASE" >/dev/null
  rm -f "$root.log"
  echo "build-images: imported $LOCAL_BASE"
fi

echo "build-images: building $KERNEL_IMAGE from $BASE_IMAGE"
log=$(mktemp)
# the legacy builder (docker.io has no buildx) warns on every build: show its output on failure
docker build --force-rm -f docker/kernel.Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  -t "$KERNEL_IMAGE" . >"$log" 2>&1 || { tail -30 "$log" >&2; rm -f "$log"; exit 1; }
rm -f "$log"
echo "build-images: $KERNEL_IMAGE is $(docker image inspect -f '{{.Id}}' "$KERNEL_IMAGE")"

[ "${1:-}" = all ] || exit 0
echo "build-images: wheelhouse docker/wheels (the host's pip and indexes; no index in the build)"
rm -rf docker/wheels && mkdir -p docker/wheels
rm -rf build  # pip builds in place: a stale build/ (an older layout) would go into the wheel
log=$(mktemp)
# async-timeout: redis needs it below Python 3.11.3 (Debian 12 has 3.11.2), the host may not
python3 -m pip wheel -q -w docker/wheels/deps '.[docker,kubernetes,flower]' 'async-timeout>=4.0.3' >"$log" 2>&1 \
  || { grep -v "^WARNING: Location" "$log" | tail -30 >&2; rm -f "$log"; exit 1; }
# poolgate's own wheel apart: the image installs it last, so a change to poolgate leaves the
# dependencies' layer cached
mkdir -p docker/wheels/app && mv docker/wheels/deps/poolgate-*.whl docker/wheels/app/
docker build --force-rm -f docker/poolgate.Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  -t "${POOLGATE_IMAGE:-poolgate/poolgate:latest}" . >"$log" 2>&1 \
  || { tail -30 "$log" >&2; rm -f "$log"; exit 1; }
rm -f "$log"
echo "build-images: ${POOLGATE_IMAGE:-poolgate/poolgate:latest} built"

echo "build-images: building ${RABBITMQ_IMAGE:-poolgate/rabbitmq:latest} from $BASE_IMAGE"
log=$(mktemp)
docker build --force-rm -f docker/rabbitmq.Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  -t "${RABBITMQ_IMAGE:-poolgate/rabbitmq:latest}" . >"$log" 2>&1 \
  || { tail -30 "$log" >&2; rm -f "$log"; exit 1; }
rm -f "$log"
echo "build-images: ${RABBITMQ_IMAGE:-poolgate/rabbitmq:latest} built"
