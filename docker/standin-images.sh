#!/usr/bin/env bash
# Makes the local base images docker/ needs where no image registry is reachable (an
# air-gapped site, or this project's build machines). They are STAND-INS, not the official
# images:
#   s2vec-standin/python:3.11-bookworm  Debian bookworm (debootstrap --variant=minbase from a
#                                       Debian mirror, docker import) with Debian's python3
#                                       (3.11), python3-venv and osmium-tool
#   s2vec-standin/postgres:15-bookworm  that base with Debian's postgresql-15 and an entrypoint
#                                       honouring POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB
# An image already present is kept. Root file systems are made under docker/.scratch/ (git
# ignores it). Needs root, debootstrap, and a Debian mirror (DEBIAN_MIRROR) reachable from the
# host and from build containers.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
python_image=${S2VEC_BASE_IMAGE:-s2vec-standin/python:3.11-bookworm}
postgres_image=${S2VEC_POSTGRES_IMAGE:-s2vec-standin/postgres:15-bookworm}
scratch=$here/.scratch

if ! docker image inspect "$python_image" >/dev/null 2>&1; then
  rootfs=$scratch/rootfs-python
  if [ ! -x "$rootfs/usr/bin/osmium" ]; then
    rm -rf "$rootfs"
    mkdir -p "$scratch"
    debootstrap --variant=minbase --include=python3,python3-venv,osmium-tool,ca-certificates \
      bookworm "$rootfs" "$mirror" > "$scratch/debootstrap.log" 2>&1 \
      || { tail -5 "$scratch/debootstrap.log"; exit 1; }
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  printf 'deb %s bookworm main\n' "$mirror" > "$rootfs/etc/apt/sources.list"
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    --message "stand-in: Debian bookworm minbase + python3, python3-venv, osmium-tool" \
    - "$python_image" >/dev/null
  echo "made stand-in $python_image (debootstrap bookworm, docker import)"
fi
if ! docker image inspect "$postgres_image" >/dev/null 2>&1; then
  docker build -q -f "$here/standin/postgres.Dockerfile" --build-arg "BASE_IMAGE=$python_image" \
    -t "$postgres_image" "$here/standin" >/dev/null
  echo "made stand-in $postgres_image (Debian postgresql-15)"
fi
