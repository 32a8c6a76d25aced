#!/usr/bin/env bash
# One prepared check of a GPU machine, in at most 8 minutes on one GPU:
#   the device summary; the TensorFlow-free fast tests on the GPU;
#   ViT-B/16 and ViT-L/16 (plain, 8@1/2, 8@1/4), training and inference images/s
#   in bf16 with MFU; cuDNN against XLA attention; transformers' PyTorch ViT
#   (bf16 autocast, SDPA) for the plain models; the other batch sizes of
#   64/128/256/512 for the plain B/16 with whatever time is left.
# Steps run in order of what the targets need, each with its own time cap.
# Writes $OUT/gpu_check.json and $OUT/gpu_check.md (and the parts they are made of).
#
#   bash benchmarks/gpu_check.sh prepare   # here, with network: ml-collections' wheel
#   bash benchmarks/gpu_check.sh           # there, from the repository root (OUT=... to choose)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # the same path on CPU, tiny settings
#
# benchmarks/wheels is git-ignored: the device tool must carry it (carry=["benchmarks/wheels"]).
# GPU machines have jax (CUDA), flax, optax, orbax, pytest, torch and transformers but no
# TensorFlow, no ml-collections and no network: steps are timed on synthetic batches, and
# the carried pure-Python wheels are unpacked onto PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}

if [[ "${1:-}" == prepare ]]; then
  mkdir -p "$WHEELS"
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation py --abi none --platform any -d "$WHEELS" ml-collections
fi

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
START=$SECONDS
CARRIED=$(mktemp -d)  # Not under $OUT: the unpacked libraries are not results.
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # Wheels are zip files: unpack, do not install.
  "$PYTHON" -c "import glob, sys, zipfile
for wheel in glob.glob('$WHEELS/*.whl'): zipfile.ZipFile(wheel).extractall('$CARRIED')"
fi
export PYTHONPATH="$PWD:$CARRIED${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
log() { echo "[$((SECONDS - START)) s] $*" | tee -a "$OUT/progress.txt"; }

# Without these every step below would fail: stop at once, with the reason.
if ! "$PYTHON" -c "import absl, flax.linen, jax, ml_collections, optax" 2>"$OUT/preflight.txt"; then
  log "preflight failed (run 'bash benchmarks/gpu_check.sh prepare' here and carry $WHEELS):"
  tail -n 3 "$OUT/preflight.txt"
  exit 1
fi

if [[ -n "${GPU_CHECK_TINY:-}" ]]; then  # The CPU dry path: same steps, tiny models.
  MODELS=(Ti/8 Ti/4) BATCH=4 OTHER_BATCHES=2 MERGERS=none,2@1/4 SIZE=16 REPEATS=2 CALLS=1
  TESTS=(tests/test_no_tensorflow.py tests/test_utilisation.py)
else
  # One batch per model for the targets (B/16 at 256, L/16 at 128); the plain B/16 at
  # the other batches last, as far as time allows.
  MODELS=(B/16 L/16) BATCH=256 OTHER_BATCHES=64,128,512 MERGERS=none,8@1/2,8@1/4 SIZE=224
  REPEATS=5 CALLS=3
  TESTS=(tests/test_vit.py tests/test_patch_merger.py tests/test_flops.py
         tests/test_distributed.py tests/test_utilisation.py tests/test_no_tensorflow.py
         tests/test_attention.py tests/test_scan.py)
fi
batch_of() { [[ $1 == L/* && -z "${GPU_CHECK_TINY:-}" ]] && echo $((BATCH / 2)) || echo "$BATCH"; }
BENCH=("$PYTHON" -m benchmarks.throughput --image_size="$SIZE" --dtype=bfloat16
       --classifier=token --repeats="$REPEATS" --calls="$CALLS")
# The steps before the report; with the report, the kill grace of the last step and
# the floor of 10 s per step, the whole check stays under 8 minutes.
DEADLINE=${GPU_CHECK_SECONDS:-420}
cap() {  # The seconds a step may take: its own cap, or what is left of the deadline.
  local left=$((DEADLINE - (SECONDS - START)))
  (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"
}
ours() {  # ours NAME CAP ARGS...: one benchmark process (its memory is gone after it).
  local name=$1 seconds; seconds=$(cap "$2"); shift 2
  timeout -k 10 "$seconds" "${BENCH[@]}" --nohf_reference \
      --budget_s=$(( seconds > 90 ? seconds - 40 : seconds / 2 )) \
      --json="$OUT/ours_$name.json" "$@" >"$OUT/ours_$name.txt" 2>&1
  tail -n 2 "$OUT/ours_$name.txt"
}

log 'device summary'
{ timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  timeout -k 5 60 "$PYTHON" -c "import jax; from patchmerger.training import utilisation as u
print('jax', jax.__version__); print(u.device_summary()); print('peak %.3g TFLOP/s (%s)' % u.peak_tflops())"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# cuDNN's fused attention, forward and gradient, at ViT-B's head shape. If it fails
# (an error, or a crash of the process), every row of ours uses XLA's attention.
log 'cuDNN attention probe'
ATTENTION=()
timeout -k 5 60 "$PYTHON" -c "
import sys, jax, jax.numpy as jnp
q = jnp.ones((2, 197, 12, 64), jnp.bfloat16)
attend = lambda q: jax.nn.dot_product_attention(q, q, q, implementation='cudnn').astype(jnp.float32).sum()
try:
  print('cudnn attention: forward', float(jax.jit(attend)(q)), 'gradient', float(jax.jit(jax.grad(attend))(q).astype(jnp.float32).sum()))
except Exception as e:
  sys.exit(f'cudnn attention failed: {type(e).__name__}: {str(e).partition(chr(10))[0][:300]}')
" >"$OUT/cudnn_probe.txt" 2>&1 || ATTENTION=(--attention=xla)
tail -n 1 "$OUT/cudnn_probe.txt"
[[ ${#ATTENTION[@]} -gt 0 ]] && log 'cuDNN attention failed: XLA attention for every row'

log 'fast tests'
existing=(); for t in "${TESTS[@]}"; do [[ -f "$t" ]] && existing+=("$t"); done
# SIGINT, not TERM, at the cap: pytest still prints its summary line.
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout -s INT -k 10 "$(cap 60)" "$PYTHON" -m pytest -q \
    -m 'not slow' -p no:cacheprovider "${existing[@]}" >"$OUT/tests.txt" 2>&1
tail -n 3 "$OUT/tests.txt"

# The targets first: each model with and without mergers at one batch, then
# transformers at the same batches, then XLA's attention beside the default's.
for model in "${MODELS[@]}"; do
  log "ours $model at batch $(batch_of "$model")"
  [[ $model == L/* ]] && seconds=120 || seconds=150
  ours "${model//\//_}" "$seconds" --variants="$model" --mergers="$MERGERS" \
      --batch_sizes="$(batch_of "$model")" "${ATTENTION[@]}"
done

log 'transformers (PyTorch) for the plain models'
# Its own process, with JAX on the CPU, so that JAX holds no GPU memory.
for model in "${MODELS[@]}"; do
  JAX_PLATFORMS=cpu timeout -k 10 "$(cap 40)" "${BENCH[@]}" --hf_only --variants="$model" \
      --mergers=none --batch_sizes="$(batch_of "$model")" --json="$OUT/hf_${model//\//_}.json" \
      >"$OUT/hf_${model//\//_}.txt" 2>&1
  tail -n 1 "$OUT/hf_${model//\//_}.txt"
done

if [[ ${#ATTENTION[@]} -eq 0 ]]; then  # The rows above used cuDNN where 'auto' allows it.
  log "attention: xla beside the default (cuDNN), ${MODELS[0]} at batch $(batch_of "${MODELS[0]}")"
  ours attention 60 --variants="${MODELS[0]}" --mergers=none \
      --batch_sizes="$(batch_of "${MODELS[0]}")" --attention=xla
fi

log "the plain ${MODELS[0]} at batches $OTHER_BATCHES, as time allows"
ours "${MODELS[0]//\//_}_batches" 150 --variants="${MODELS[0]}" --mergers=none \
    --batch_sizes="$OTHER_BATCHES" "${ATTENTION[@]}"

log 'report'
parts=(); for f in "$OUT"/ours_*.json "$OUT"/hf_*.json; do [[ -s "$f" ]] && parts+=("$f"); done
if (( ${#parts[@]} )); then
  timeout -k 5 30 "$PYTHON" -m benchmarks.throughput --report="$(IFS=,; echo "${parts[*]}")" \
      --markdown="$OUT/tables.md" >/dev/null 2>"$OUT/report.txt"
fi
"$PYTHON" - "$OUT" "${parts[@]}" <<'EOF'
import json, os, sys
out, parts = sys.argv[1], sys.argv[2:]
read = lambda name: open(os.path.join(out, name)).read() if os.path.exists(
    os.path.join(out, name)) else ''
tests = read('tests.txt').strip().splitlines()
rows = []
for part in parts:  # A part cut short mid-write is skipped, not fatal.
  try:
    rows += json.load(open(part))
  except ValueError as e:
    rows.append({'error': f'{os.path.basename(part)}: {e}'})
record = {'device': read('device.txt').strip().splitlines(),
          'cudnn_probe': read('cudnn_probe.txt').strip().splitlines()[-1:],
          'tests': tests[-1] if tests else 'not run', 'rows': rows}
json.dump(record, open(os.path.join(out, 'gpu_check.json'), 'w'), indent=2)
with open(os.path.join(out, 'gpu_check.md'), 'w') as f:
  f.write('# gpu_check\n\n```\n' + '\n'.join(record['device'] + record['cudnn_probe'])
          + '\n```\n\n')
  f.write(f'Fast tests on this device: {record["tests"]}\n\n' + read('tables.md'))
EOF
rm -rf "$CARRIED"
log "done: $OUT/gpu_check.md, $OUT/gpu_check.json"
cat "$OUT/gpu_check.md"
