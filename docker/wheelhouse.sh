#!/usr/bin/env bash
# Prepares the wheelhouse of an offline image build: every wheel that `pip install ".[deploy]"`
# and torch need inside the image (Linux x86_64, CPython 3.11, glibc 2.36 = Debian bookworm),
# downloaded on a host that reaches a package index. Copy the folder to the air-gapped site and
# build with it (docs/deploying.md, "Offline build"):
#
#   bash docker/wheelhouse.sh                      # -> docker/wheelhouse/ (CPU torch)
#   TORCH_INDEX=cu128 bash docker/wheelhouse.sh    # CUDA torch instead
#
# The build (docker/Dockerfile) installs from the folder named by its WHEELHOUSE argument
# (default docker/wheelhouse) with --no-index as soon as the folder holds wheels.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
dest=${1:-$here/wheelhouse}
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
torch_index=${TORCH_INDEX:-cpu}
mkdir -p "$dest"
# pip matches --platform tags literally: name every glibc up to bookworm's 2.36 and the aliases.
target=(--only-binary=:all: --implementation cp --python-version 3.11 --dest "$dest"
        --platform linux_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64
        --platform manylinux2014_x86_64)
for minor in $(seq 5 36); do target+=(--platform "manylinux_2_${minor}_x86_64"); done

# torch with its local version (2.13.0+cpu, +cu128): never PyPI's default CUDA build. The
# configured sources first (a site's mirror), then PyTorch's own index.
torch_req="torch==${torch_version}+${torch_index}"
if ! "$python" -m pip download -q --no-deps "${target[@]}" "$torch_req" >/dev/null 2>&1; then
  "$python" -m pip download -q --no-deps "${target[@]}" \
    --index-url "https://download.pytorch.org/whl/${torch_index}" "$torch_req"
fi

# The package's dependencies with its [deploy] extra, torch held to the wheel above, and the
# build backend, since the image builds the package itself from source without an index.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$torch_req" > "$constraints"
"$python" -m pip download -q "${target[@]}" --find-links "$dest" -c "$constraints" \
  "$repo[deploy]" "setuptools>=77" wheel
rm -f "$dest"/s2vec_pipeline-*   # the package itself is built from the context, not kept here
echo "wheelhouse: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
