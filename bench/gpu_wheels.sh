#!/usr/bin/env bash
# Fills what bench/gpu.sh carries to the GPU machine, which reaches no network (run it here, once):
#   .whl/  the wheels of bench/gpu_wheels.txt, for CPython 3.12 manylinux x86-64 (the machine's python3)
#   .gpu/  the two models' tokenizers (xz) and a slice of the default corpus (xz), by bench/gpu_models.py prepare
# Both folders are git-ignored; name them in the device call's carry: [".whl", ".gpu"]. They, with the tracked
# files, must stay under the 64 MiB a call may carry: the sizes and the total are printed last.
#
#   bench/gpu_wheels.sh                # both
#   PYVER=3.11 DEST=/tmp/whl311 bench/gpu_wheels.sh --wheels-only   # the same wheels for another Python (checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$DEST"
mapfile -t reqs < <(grep -v '^[[:space:]]*#' bench/gpu_wheels.txt | awk 'NF >= 2 {print $2}' | sort -u)
wheel_of() {  # the file in $DEST holding NAME==VERSION (wheel names use _ for - and may differ in case)
  local stem version
  stem=$(echo "${1%%==*}" | tr 'A-Z.-' 'a-z__'); version=${1#*==}
  ls "$DEST" | awk -v s="${stem}-${version}-" 'index(tolower($0), s) == 1 {print; exit}'
}
missing=0
for req in "${reqs[@]}"; do  # one at a time: two versions of one name (nnsight) cannot share a resolve
  [ -n "$(wheel_of "$req")" ] && continue
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "$req" 2>&1 | grep -v "^WARNING: Location" || true
  [ -n "$(wheel_of "$req")" ] || { echo "MISSING wheel: $req" >&2; missing=1; }
done
[ "$missing" = 0 ] || exit 1
if [ "${1:-}" != "--wheels-only" ]; then
  OMP_NUM_THREADS=1 PYTHONPATH=src "$PY" bench/gpu_models.py prepare --out .gpu
fi
echo "wheels in $DEST (bytes):"
wheels=0
for req in "${reqs[@]}"; do
  f=$(wheel_of "$req"); size=$(stat -c %s "$DEST/$f"); wheels=$((wheels + size))
  printf '%10d  %s\n' "$size" "$f"
done | sort -rn
wheels=0; for req in "${reqs[@]}"; do wheels=$((wheels + $(stat -c %s "$DEST/$(wheel_of "$req")"))); done
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
gpu=$( [ -d .gpu ] && du -sb .gpu | cut -f1 || echo 0)
echo "total: wheels $wheels, .gpu $gpu, tracked files $tracked; all $((wheels + gpu + tracked)) of $((64 * 1024 * 1024)) bytes"
