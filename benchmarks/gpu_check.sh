#!/usr/bin/env bash
# One prepared check of a GPU machine, in at most 8 minutes on one GPU:
#   the device summary; the TensorFlow-free fast tests on the GPU;
#   ViT-B/16 and ViT-L/16 (plain, 8@1/2, 8@1/4), training and inference images/s
#   in bf16 at the best batch of 64/128/256/512, with MFU; cuDNN against XLA
#   attention; transformers' PyTorch ViT (bf16 autocast, SDPA) for the plain models.
# Writes $OUT/gpu_check.json and $OUT/gpu_check.md (and the parts they are made of).
#
#   bash benchmarks/gpu_check.sh prepare   # here, with network: wheels the GPU machine lacks
#   bash benchmarks/gpu_check.sh           # there, from the repository root (OUT=... to choose)
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh   # the same path on CPU, tiny settings
#
# GPU machines have jax (CUDA), flax, optax, orbax, torch and transformers but no
# TensorFlow and no network: steps are timed on synthetic batches, and the pure-Python
# wheels in benchmarks/wheels (ml-collections, pytest) are unpacked onto PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels

if [[ "${1:-}" == prepare ]]; then
  mkdir -p "$WHEELS"
  exec "${PYTHON:-python}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation py --abi none --platform any -d "$WHEELS" \
      ml-collections pytest pluggy iniconfig
fi

PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
START=$SECONDS
CARRIED="$OUT/.carried"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # Wheels are zip files: unpack, do not install.
  "$PYTHON" -c "import glob, sys, zipfile
for wheel in glob.glob('$WHEELS/*.whl'): zipfile.ZipFile(wheel).extractall('$CARRIED')"
fi
export PYTHONPATH="$PWD:$CARRIED${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2

if [[ -n "${GPU_CHECK_TINY:-}" ]]; then  # The CPU dry path: same steps, tiny models.
  MODELS=(Ti/8) BATCHES=2,4 MERGERS=none,2@1/4 SIZE=16 REPEATS=2 CALLS=1
  TESTS=(tests/test_no_tensorflow.py)
else
  MODELS=(B/16 L/16) BATCHES=64,128,256,512 MERGERS=none,8@1/2,8@1/4 SIZE=224 REPEATS=5
  CALLS=3
  TESTS=(tests/test_vit.py tests/test_patch_merger.py tests/test_flops.py
         tests/test_distributed.py tests/test_utilisation.py tests/test_no_tensorflow.py
         tests/test_attention.py tests/test_scan.py)
fi
BENCH=("$PYTHON" benchmarks/throughput.py --image_size="$SIZE" --dtype=bfloat16
       --classifier=token --repeats="$REPEATS" --calls="$CALLS")
log() { echo "[$((SECONDS - START)) s] $*" | tee -a "$OUT/progress.txt"; }
DEADLINE=${GPU_CHECK_SECONDS:-470}  # The whole check, machine start-up aside.
cap() {  # The seconds a step may take: its own cap, or what is left of the deadline.
  local left=$((DEADLINE - (SECONDS - START)))
  (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"
}

log 'device summary'
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  "$PYTHON" -c "import jax; from patchmerger.training import utilisation as u
print('jax', jax.__version__); print(u.device_summary()); print('peak %.3g TFLOP/s (%s)' % u.peak_tflops())"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

log 'fast tests'
existing=(); for t in "${TESTS[@]}"; do [[ -f "$t" ]] && existing+=("$t"); done
timeout "$(cap 60)" "$PYTHON" -m pytest -q -m 'not slow' -p no:cacheprovider "${existing[@]}" \
    >"$OUT/tests.txt" 2>&1
tail -n 3 "$OUT/tests.txt"

# Ours: each plain model at every batch, its mergers at the plain model's best batch.
# One process per model, so that a model's memory is gone before the next one.
for model in "${MODELS[@]}"; do
  log "ours $model"
  batches=$BATCHES; seconds=$(cap 150)
  [[ $model == L/* ]] && batches=${BATCHES%,512} && seconds=$(cap 120)  # 512 cannot fit L/16.
  # No new row once all but the time of about one row is spent.
  timeout "$seconds" "${BENCH[@]}" --variants="$model" --mergers="$MERGERS" \
      --batch_sizes="$batches" --merger_batches=best --nohf_reference \
      --budget_s=$(( seconds > 90 ? seconds - 40 : seconds / 2 )) \
      --json="$OUT/ours_${model//\//_}.json" >"$OUT/ours_${model//\//_}.txt" 2>&1
  tail -n 2 "$OUT/ours_${model//\//_}.txt"
done

best_batch() {  # The batch at which the plain model trained fastest (64 if none ran).
  "$PYTHON" -c "import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r.get('train_img_s') and r['merger'] == 'none']
print(max(rows, key=lambda r: r['train_img_s'])['batch_size'] if rows else ${BATCHES%%,*})" "$1"
}
BEST=$(best_batch "$OUT/ours_${MODELS[0]//\//_}.json" 2>/dev/null || echo "${BATCHES%%,*}")

log "attention: cudnn against xla, ${MODELS[0]} at batch $BEST"
timeout "$(cap 60)" "${BENCH[@]}" --variants="${MODELS[0]}" --mergers=none --batch_sizes="$BEST" \
    --attention=xla,cudnn --nohf_reference --json="$OUT/attention.json" \
    >"$OUT/attention.txt" 2>&1
tail -n 2 "$OUT/attention.txt"

log 'transformers (PyTorch) for the plain models'
# Its own process, with JAX on the CPU, so that JAX holds no GPU memory.
JAX_PLATFORMS=cpu timeout "$(cap 60)" "${BENCH[@]}" --hf_only --variants="$(IFS=,; echo "${MODELS[*]}")" \
    --mergers=none --batch_sizes="${BATCHES%,512}" --json="$OUT/hf.json" >"$OUT/hf.txt" 2>&1
tail -n 2 "$OUT/hf.txt"

log 'report'
parts=(); for f in "$OUT"/ours_*.json "$OUT/attention.json" "$OUT/hf.json"; do
  [[ -s "$f" ]] && parts+=("$f"); done
"$PYTHON" benchmarks/throughput.py --report="$(IFS=,; echo "${parts[*]}")" \
    --markdown="$OUT/tables.md" >/dev/null 2>"$OUT/report.txt"
"$PYTHON" - "$OUT" "${parts[@]}" <<'EOF'
import json, os, sys
out, parts = sys.argv[1], sys.argv[2:]
read = lambda name: open(os.path.join(out, name)).read() if os.path.exists(
    os.path.join(out, name)) else ''
tests = read('tests.txt').strip().splitlines()
record = {'device': read('device.txt').strip().splitlines(),
          'tests': tests[-1] if tests else 'not run',
          'rows': [row for part in parts for row in json.load(open(part))]}
json.dump(record, open(os.path.join(out, 'gpu_check.json'), 'w'), indent=2)
with open(os.path.join(out, 'gpu_check.md'), 'w') as f:
  f.write('# gpu_check\n\n```\n' + '\n'.join(record['device']) + '\n```\n\n')
  f.write(f'Fast tests on this device: {record["tests"]}\n\n' + read('tables.md'))
EOF
log "done: $OUT/gpu_check.md, $OUT/gpu_check.json"
cat "$OUT/gpu_check.md"
