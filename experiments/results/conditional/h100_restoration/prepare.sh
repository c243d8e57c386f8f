#!/usr/bin/env bash
# Builds, on the CPU machine, the two folders that run.sh needs on a device machine, which can fetch
# nothing: .whl/ (the wheels of the packages its image lacks, for its Python 3.12 on x86-64) and
# .device_data/utkface64 (a copy of ../shared/data/utkface64, which does not travel). Both are kept out
# of git by .git/info/exclude and travel as `carry`: [".whl", ".device_data"]. Run from the repo root:
#   bash experiments/results/conditional/h100_restoration/prepare.sh
# It fails if what would travel is over the device tool's 64 MiB.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for path in /.whl/ /.device_data/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done

# The image has jax, flax, optax, orbax, chex, absl, etils, cloudpickle, protobuf, psutil, PyYAML and
# scikit-image; these five (grain's array_record and portpicker among them) it lacks. Versions: as
# requirements.txt and the installed grain's needs.
version() { python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
rm -rf .whl && mkdir .whl
for package in grain array_record portpicker ml_collections dm_pix; do
  pinned=$(version "$package")
  [ -n "$pinned" ] || { echo "prepare.sh: $package is not installed here; install requirements.txt first" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$package==$pinned"
done

rm -rf .device_data && mkdir .device_data
cp -r ../shared/data/utkface64 .device_data/

# What travels: tracked files, untracked files git does not ignore, and the carried folders.
travels=$( { git ls-files -z --cached --others --exclude-standard; find .whl .device_data -type f -print0; } \
          | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
echo "prepare.sh: $(ls .whl | wc -l) wheels, $(find .device_data -type f | wc -l) images; $((travels / 1048576)) MiB travel (limit 64)"
[ "$travels" -lt $((64 * 1048576)) ] || { echo 'prepare.sh: over the 64 MiB the device tool sends' >&2; exit 1; }
