#!/usr/bin/env bash
# The GPU benchmark (issue 24, point 6), one prepared script for one H100/H200, at most 8 minutes all told:
#   1. install: aimri from src/ (PYTHONPATH, no build), the missing packages from the carried .whl/ folder
#      (bench/gpu_wheels.txt: one --target folder per peer, so their pins never meet)
#   2. the cuda tests (pytest -m cuda)
#   3. the bf16 GEMM peak, measured now (the roofline's denominator)
#   4. per model (SmolLM2-135M, then Gemma-3-270M): harvest tok/s vs nnsight on the same batches; TopK SAE
#      training tok/s and held-out FVU vs eai-sparsify (Triton kernels) and sae-lens on the same activations;
#      attribution seconds vs circuit-tracer on the same prompt and transcoders
#   5. one JSON line, the last line printed (bench/gpu_models.py report says what each key means)
# Every section runs under `timeout` within what is left of the budget; one that fails, times out or has no
# time left is named under "skipped" with the reason, and the rest go on.
#
# Here, once:   bench/gpu_wheels.sh                      (fills .whl/ and .gpu/, both git-ignored)
# There:        device run, carry [".whl", ".gpu"], command "bash bench/gpu.sh"
# Smoke (CPU):  bench/gpu.sh --smoke                      (toy sizes, this machine's .venv and peer venvs, ~2 min)
# Install only: bench/gpu.sh --check-install              (steps 1 and the peers' import check, then stop)
#
# Environment: AIMRI_GPU_MODELS (real models: HF folders or .gguf files, see bench/gpu_models/README.md),
# AIMRI_GPU_BUDGET_S (default 470; smoke 110), AIMRI_GPU_WORK (default /tmp/aimri-gpu), AIMRI_GPU_WHEELS
# (default .whl), AIMRI_GPU_SECTIONS (default "tests,smollm2-135m-instruct,gemma3-270m"; smoke: the first
# model only), AIMRI_GPU_TRANSCODERS (a folder with <model>/layer-L transcoders; default: random ones),
# AIMRI_GPU_TRAIN_PEERS (default sparsify,sae_lens), PYTHON. Sizes:
# AIMRI_GPU_{HARVEST,TRAIN,TRACE}_ARGS replace each bench script's size options below.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=${AIMRI_GPU_SMOKE:-0}
[ "${1:-}" = "--smoke" ] && SMOKE=1
START=$(date +%s)
if [ "$SMOKE" = 1 ]; then BUDGET=${AIMRI_GPU_BUDGET_S:-110}; else BUDGET=${AIMRI_GPU_BUDGET_S:-470}; fi
RESERVE=6  # seconds kept for the report
WORK=${AIMRI_GPU_WORK:-/tmp/aimri-gpu}
WHEELS=${AIMRI_GPU_WHEELS:-$ROOT/.whl}
SITE=$WORK/site
case "$WORK" in /|/tmp|/tmp/|"$HOME"|"$ROOT") echo "gpu.sh: AIMRI_GPU_WORK=$WORK would be wiped; name a folder of its own" >&2; exit 2;; esac
rm -rf "$WORK"
mkdir -p "$WORK"/{out,logs,skipped,seconds,models}
if [ -z "${PYTHON:-}" ]; then
  if [ "$SMOKE" = 1 ] && [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_TELEMETRY=1 WANDB_MODE=disabled AIMRI_HOME=$WORK/home
[ "$SMOKE" = 1 ] && export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONPATH=$ROOT/src:$SITE/base${PYTHONPATH:+:$PYTHONPATH}
echo "gpu.sh: smoke=$SMOKE budget=${BUDGET}s python=$PYTHON work=$WORK" >&2

left() { echo $((START + BUDGET - RESERVE - $(date +%s))); }
skip() { echo "$2" > "$WORK/skipped/$1"; echo "gpu.sh: skipped $1: $2" >&2; }
# section NAME ALLOT MIN CMD...: run CMD under timeout (ALLOT s, or what is left), stdout to out/NAME.json
section() {
  local name=$1 allot=$2 min=$3; shift 3
  local t; t=$(left)
  [ "$t" -gt "$allot" ] && t=$allot
  if [ "$t" -lt "$min" ]; then skip "$name" "no time left: $(left) s of the ${BUDGET} s budget remain, this section needs >= $min s"; return 1; fi
  local t0 rc; t0=$(date +%s)
  echo "gpu.sh: $name (up to $t s)" >&2
  timeout -k 5 "$t" "$@" > "$WORK/out/$name.json" 2> "$WORK/logs/$name.log"; rc=$?
  echo $(($(date +%s) - t0)) > "$WORK/seconds/$name"
  if [ $rc = 124 ] || [ $rc = 137 ]; then skip "$name" "timed out after $t s (allotment $allot s)"; return 1; fi
  if [ $rc != 0 ]; then
    skip "$name" "failed (exit $rc): $(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 3 | tr '\n' ' ' | cut -c1-600)"
    return 1
  fi
  return 0
}
json() { "$PYTHON" -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {'d': d}))" "$@"; }

# -- 1. install --------------------------------------------------------------------------------------------------
t0=$(date +%s)
if [ "$SMOKE" = 1 ] && [ -z "${AIMRI_GPU_WHEELS:-}" ]; then
  export AIMRI_BENCH_NO_PEER_INSTALL=1  # .whl/ holds CPython 3.12 wheels: the smoke run uses the peers' venvs here
  echo "gpu.sh: smoke: peers from bench/.venvs where ready (AIMRI_GPU_WHEELS=DIR installs wheels instead)" >&2
elif ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  wheel_of() {  # NAME==VERSION -> its file in $WHEELS
    local stem version
    stem=$(echo "${1%%==*}" | tr 'A-Z.-' 'a-z__'); version=${1#*==}
    ls "$WHEELS" | awk -v s="${stem}-${version}-" 'index(tolower($0), s) == 1 {print; exit}'
  }
  for group in $(grep -v '^[[:space:]]*#' bench/gpu_wheels.txt | awk 'NF >= 2 {print $1}' | sort -u); do
    files=()
    missing=""
    for req in $(grep -v '^[[:space:]]*#' bench/gpu_wheels.txt | awk -v g="$group" '$1 == g {print $2}'); do
      f=$(wheel_of "$req")
      if [ -n "$f" ]; then files+=("$WHEELS/$f"); else missing="$missing $req"; fi
    done
    if [ -n "$missing" ]; then skip "install-$group" "wheels missing from $WHEELS:$missing (run bench/gpu_wheels.sh)"; continue; fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --upgrade --target "$SITE/$group" "${files[@]}" > "$WORK/logs/install-$group.log" 2>&1 \
      || skip "install-$group" "pip failed: $(tail -n 2 "$WORK/logs/install-$group.log" | tr '\n' ' ' | cut -c1-400)"
  done
  # sae-lens imports wandb and calls it only when logging to W&B: a stub stands in for the 20 MB wheel
  if [ -d "$SITE/sae_lens" ] && ! PYTHONPATH="$SITE/sae_lens:$PYTHONPATH" "$PYTHON" -c "import wandb" 2> /dev/null; then
    cp -r bench/gpu_stubs/wandb "$SITE/sae_lens/"
  fi
  export AIMRI_PEER_SITES=$SITE
else
  skip install "no wheels at $WHEELS: run bench/gpu_wheels.sh here and carry .whl; the peers will not import"
  export AIMRI_PEER_SITES=$SITE
fi
echo $(($(date +%s) - t0)) > "$WORK/seconds/install"
if ! "$PYTHON" -c "import aimri, aimri.devices" 2> "$WORK/logs/aimri-import.log"; then
  skip aimri "aimri does not import: $(tail -n 1 "$WORK/logs/aimri-import.log")"
fi
if [ "${1:-}" = "--check-install" ]; then
  "$PYTHON" bench/gpu_models.py check-peers --timeout 120
  exit
fi
if [ "$SMOKE" = 1 ]; then
  skip peers "smoke run: the import check is left to the GPU run (the benches below import the peers anyway)"
else
  section peers 60 5 "$PYTHON" bench/gpu_models.py check-peers --timeout 50
fi

# the smoke run covers one model (a cold Python start costs ~10 s on a shared 2-core CPU); the GPU run both
if [ "$SMOKE" = 1 ]; then SECTIONS=${AIMRI_GPU_SECTIONS:-smollm2-135m-instruct}; else SECTIONS=${AIMRI_GPU_SECTIONS:-tests,smollm2-135m-instruct,gemma3-270m}; fi
NAMES=$(echo "$SECTIONS" | tr ',' '\n' | grep -x 'smollm2-135m-instruct\|gemma3-270m' | paste -sd, -)
SMOKE_FLAG=$([ "$SMOKE" = 1 ] && echo --smoke)

# -- 2. cuda tests -----------------------------------------------------------------------------------------------
if [[ ",$SECTIONS," == *,tests,* ]]; then
  if [ "$SMOKE" = 1 ]; then
    skip cuda_tests "smoke run: no CUDA here (and pytest -m cuda is left to the GPU run)"
  else
    section cuda_tests 75 20 "$PYTHON" bench/gpu_models.py pytest -- -m cuda -q -p no:cacheprovider \
      --continue-on-collection-errors --timeout 60 tests
  fi
fi

# -- 3. the GEMM peak; models; corpus ----------------------------------------------------------------------------
if section peak 30 5 "$PYTHON" bench/gpu_models.py peak $SMOKE_FLAG; then
  AIMRI_BENCH_PEAK_GFLOPS=$(json "$WORK/out/peak.json" "d['peak_gflops']")
  export AIMRI_BENCH_PEAK_GFLOPS
fi
if [ "$SMOKE" = 1 ]; then CHARS=400000; else CHARS=3000000; fi
section corpus 30 5 "$PYTHON" bench/gpu_models.py corpus --out "$WORK/corpus.jsonl" --chars $CHARS
[ -n "$NAMES" ] && section models 60 10 "$PYTHON" bench/gpu_models.py models --out "$WORK/models" --names "$NAMES" \
  --corpus "$WORK/corpus.jsonl" $SMOKE_FLAG

# -- 4. per model ------------------------------------------------------------------------------------------------
# sizes: GPU (a single H100/H200) vs smoke (2 layers x 64 wide, a shared CPU core)
if [ "$SMOKE" = 1 ]; then
  HARVEST=${AIMRI_GPU_HARVEST_ARGS:---batches 2 --batch-size 4 --context 64 --rounds 1}
  TRAIN=${AIMRI_GPU_TRAIN_ARGS:---width 256 --k 8 --batch-size 256 --steps 4 --heldout 512}
  TRACE=${AIMRI_GPU_TRACE_ARGS:---lengths= --peer-length 12 --max-feature-nodes 16 --batch-size 8}
  TC_WIDTH=256; TC_K=8; DEVICE=cpu; PEER_TIMEOUT=60; TRAIN_PEERS=${AIMRI_GPU_TRAIN_PEERS:-sparsify,sae_lens}
else
  HARVEST=${AIMRI_GPU_HARVEST_ARGS:---batches 16 --batch-size 32 --context 256 --rounds 2}
  TRAIN=${AIMRI_GPU_TRAIN_ARGS:---width 16384 --k 32 --batch-size 4096 --steps 120 --heldout 16384}
  TRACE=${AIMRI_GPU_TRACE_ARGS:---lengths= --peer-length 64 --max-feature-nodes 512 --batch-size 256}
  TC_WIDTH=8192; TC_K=32; DEVICE=cuda; PEER_TIMEOUT=120; TRAIN_PEERS=${AIMRI_GPU_TRAIN_PEERS:-sparsify,sae_lens}
fi
for model in smollm2-135m-instruct gemma3-270m; do
  [[ ",$SECTIONS," == *,$model,* ]] || continue
  [[ ",$TRAIN_PEERS," == *,sae_lens,* ]] || skip "$model-train-sae_lens" "left out (AIMRI_GPU_TRAIN_PEERS=$TRAIN_PEERS)"
  [[ ",$TRAIN_PEERS," == *,sparsify,* ]] || skip "$model-train-sparsify" "left out (AIMRI_GPU_TRAIN_PEERS=$TRAIN_PEERS)"
  if [ ! -s "$WORK/out/models.json" ]; then skip "$model" "no model folders (see the models section)"; continue; fi
  path=$(json "$WORK/out/models.json" "d['$model']['path']" 2> /dev/null) || { skip "$model" "not built"; continue; }
  site=$(json "$WORK/out/models.json" "d['$model']['site']")
  common=(--json --model "$path" --corpus "$WORK/corpus.jsonl" --device $DEVICE --dtype auto --peer-timeout $PEER_TIMEOUT)
  # shellcheck disable=SC2086
  eval "harvest_args=($HARVEST)"; eval "train_args=($TRAIN)"; eval "trace_args=($TRACE)"
  section "$model-harvest" 90 15 "$PYTHON" bench/harvest.py "${common[@]}" --site "$site" --peers nnsight "${harvest_args[@]}"
  section "$model-train" 120 20 "$PYTHON" bench/train.py "${common[@]}" --site "$site" --peers "$TRAIN_PEERS" "${train_args[@]}"
  # random transcoders (made by trace.py itself: one process fewer) unless AIMRI_GPU_TRANSCODERS holds real ones
  tcs=${AIMRI_GPU_TRANSCODERS:+$AIMRI_GPU_TRANSCODERS/$model}
  section "$model-trace" 120 20 "$PYTHON" bench/trace.py "${common[@]}" --transcoders "${tcs:-$WORK/transcoders-$model}" \
    --random-transcoders $TC_WIDTH:$TC_K --no-factual "${trace_args[@]}"
  rm -rf "$WORK/transcoders-$model" "$AIMRI_HOME/bench"  # disk: the next model's turn
done

# -- 5. the report -----------------------------------------------------------------------------------------------
"$PYTHON" bench/gpu_models.py report --work "$WORK" --budget "$BUDGET" --start "$START" $SMOKE_FLAG > "$WORK/report.json" \
  2> "$WORK/logs/report.log" || echo "{\"error\": \"report failed: $(tail -n 1 "$WORK/logs/report.log" | tr -d '"\\')\"}" > "$WORK/report.json"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then  # the device tool brings back what is under $OUT
  cp "$WORK/report.json" "$OUT/gpu.json"
  for f in "$WORK"/logs/*.log; do echo "=== $(basename "$f")"; tail -c 20000 "$f"; done > "$OUT/gpu-logs.txt"
  tar -C "$WORK" -czf "$OUT/gpu-out.tgz" out skipped seconds 2> /dev/null
fi
cat "$WORK/report.json"
