#!/usr/bin/env bash
# The GPU check, prepared to run in one go on a machine with a CUDA GPU and PyTorch but no network
# and no midfill environment (e.g. a lent GPU box; at most 6 minutes: the steps time out at 75 + 105 +
# 170 s, plus 240 s for the endpoint step where Ray Serve is installed, plus 8 minutes for the 125m
# infill recipe: a command on a lent machine may run 10 minutes, so run that one on its own with
# ONLY=infill-125m and the others with ONLY="gpu-tests serve-throughput-100m serve-throughput-1b"):
#   1. installs the wheels of bench/gpu/fetch_wheels.sh from .whl/ into a private folder;
#   2. runs the `gpu`-marked tests (batched greedy on CUDA == transformers' generate, on both decode
#      paths, the static one from CUDA graphs; bf16 only on GPUs with native bf16; the static path's
#      packed prefill in bf16, and FlashAttention's varlen kernel against it and FlashAttention's
#      packed-document loss, where flash-attn is installed);
#   3. runs bench/serve_throughput.py on the GPU in bfloat16, engine in-process vs sequential `generate`
#      on the same GPU, static decode path (its packed prefill: flash_attn_varlen_func where flash-attn
#      is installed -- environment.txt says -- else sdpa per prompt) vs dynamic: a ~100M model (12
#      layers, hidden 768) and a ~1B one (16 layers, hidden 2048) -- step ms at 1/8/32 rows and over the weight-read floor, c32
#      tokens/s, a lone request's latency over generate's (docs/benchmarks.md, "GPU decode path");
#   4. bench/train_gpu.py: training tokens/s, MFU, peak GPU and host memory (1b default/eager/documentMask,
#      7b geometry with 4 layers under FSDP2 from the meta device); run alone with ONLY="train-..." (below);
#   5. trains the debug recipe scaled to `125m` (manifests/samples/trainingrun-125m-gpu.yaml) for at
#      most 5 minutes in one process and scores it with line-em on held-out stdlib function bodies
#      (bench/infill_recipe.py: own stop rate, whitespace-only, first-line exact match; 8 minutes in all);
#   6. with Ray Serve there (fetch_wheels.sh --with-ray), the endpoint with the debug-size model.
#
#   bash bench/gpu/fetch_wheels.sh [--with-ray]     # on a machine with PyPI, once
#   bash bench/gpu/run.sh                           # on the GPU machine, from the repository root
#
# With --with-ray the wheels come in two transfers (.whl/ and .whl-2/, ~58 MB each): send .whl/
# and run `STAGE=stash bash bench/gpu/run.sh` (it keeps the part in /tmp/midfill-wheels), then, on
# the same machine, send .whl-2/ and run `bash bench/gpu/run.sh`.
#
# Results (logs and JSON) go to $OUT, default bench/results/gpu/. Each step has its own time limit
# and a failing step does not stop the others; the exit status is the number of failed steps.
# WHEEL_DIRS (default ".whl .whl-2") and WHEELS (default /tmp/midfill-wheels) say where the wheels
# come from and are kept. ONLY="gpu-tests ..." runs just the named steps; MIDFILL_CHECK_DEVICE=cpu runs them on a CPU (a dry
# run of the script itself, with BENCH_ARGS="--layers 2 --hidden 64 --heads 4 --rounds 1" and
# INFILL_ARGS="--dry-run" to be quick).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results/gpu}
DEVICE=${MIDFILL_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
failed=0

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$(( $2 * ${LIMIT_SCALE:-1} )); shift 2  # LIMIT_SCALE: a CPU dry run on a busy machine
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0  # ONLY="a b": rerun just those steps
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  echo "== $name: rc=$rc in $((SECONDS - start))s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

WHEELS=${WHEELS:-/tmp/midfill-wheels}  # survives between calls on the same machine
mkdir -p "$WHEELS"
for dir in ${WHEEL_DIRS-.whl .whl-2}; do [ -d "$dir" ] && cp -f "$dir"/* "$WHEELS"/ 2>/dev/null; done
if [ "${STAGE:-}" = stash ]; then
  echo "kept $(ls "$WHEELS" | tr '\n' ' ')in $WHEELS; now send .whl-2/ and run bench/gpu/run.sh"; exit 0
fi
if compgen -G "$WHEELS/bundle.tar.part-*" >/dev/null; then
  [ "$(ls "$WHEELS"/bundle.tar.part-* | wc -l)" -eq 2 ] || { echo "need both bundle parts (.whl/ and .whl-2/)"; exit 100; }
  cat "$WHEELS"/bundle.tar.part-* | tar -x -C "$WHEELS" || { echo "unpacking the wheel bundle failed"; exit 100; }
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  # --target keeps the machine's own packages untouched; PYTHONPATH puts these first.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/midfill-site "$WHEELS"/*.whl \
    || { echo "installing the wheels failed"; exit 100; }
  export PYTHONPATH=/tmp/midfill-site PATH="/tmp/midfill-site/bin:$PATH"
fi
# midfill is not installed there: its source roots go on the path (as pytest's pythonpath does).
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/platform:$PWD" PYTHONUNBUFFERED=1

{ date -u; nvidia-smi 2>&1 | head -n 15
  $PY -c "import torch, transformers, importlib.util as u; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else ''); print('transformers', transformers.__version__); print('flash_attn installed:', u.find_spec('flash_attn') is not None)"
} 2>&1 | tee "$OUT/environment.txt"
if [ "$DEVICE" = cuda ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU visible to $PY: nothing to check"; exit 100
fi

# The files with gpu tests that import neither Ray nor MLflow at collection (the FlashAttention ones
# skip where flash-attn is missing, as on the image). -p no:cacheprovider: the tree may be thrown
# away; the config warnings are pytest-asyncio's options, unknown where it is not installed.
step gpu-tests 75 $PY -m pytest -q -p no:cacheprovider -W ignore::pytest.PytestConfigWarning -m gpu \
  tests/serving/test_engine.py tests/serving/test_static_step.py tests/serving/test_packed_prefill.py \
  tests/trainer/test_loop.py tests/trainer/test_evaluate.py
# The issue's workload: 32 requests of ~430 prompt tokens, 32 new tokens, bfloat16; both decode paths
# in the same run, so the static one is compared with today's on the same machine.
DECODE="--parts engine --rounds 1 --requests 32 --dtypes bfloat16 --baseline-dtypes bfloat16 --decode-paths static,dynamic"
step serve-throughput-100m 105 $PY bench/serve_throughput.py --device "$DEVICE" $DECODE \
  --layers 12 --hidden 768 --heads 12 --out "$OUT/serve_throughput_${DEVICE}_100m.json" ${BENCH_ARGS:-}
step serve-throughput-1b 170 $PY bench/serve_throughput.py --device "$DEVICE" $DECODE \
  --layers 16 --hidden 2048 --heads 16 --out "$OUT/serve_throughput_${DEVICE}_1b.json" ${BENCH_ARGS:-}
# Training as a job runs it (issue 19): the 1b recipe at seq 2048, micro 8, bf16 -- default settings
# (compile: auto, so compiled on a GPU), eager for comparison, documentMask (flex_attention's block
# mask where flash-attn is missing), and the 7b geometry with 4 layers from the meta device under
# FSDP2 (one process: sharded as FSDP2 shards it, world size 1). Run alone as one call of <= 6 minutes:
#   ONLY="train-1b train-1b-eager train-1b-docmask train-7b-fsdp" bash bench/gpu/run.sh
# TRAIN_ARGS shrinks the models for the CPU dry run.
TRAIN="$PY bench/train_gpu.py --seq 2048 --micro 8 --steps 8 --warmup 2"
step train-1b 100 $TRAIN --recipe 1b --out "$OUT/train_${DEVICE}_1b.json" ${TRAIN_ARGS:-}
step train-1b-eager 45 $TRAIN --recipe 1b --compile false --out "$OUT/train_${DEVICE}_1b_eager.json" ${TRAIN_ARGS:-}
step train-1b-docmask 100 $TRAIN --recipe 1b --document-mask --out "$OUT/train_${DEVICE}_1b_docmask.json" ${TRAIN_ARGS:-}
step train-7b-fsdp 90 $PY -m torch.distributed.run --standalone --nproc-per-node 1 bench/train_gpu.py --seq 2048 --micro 4 \
  --steps 6 --warmup 2 --recipe 7b --layers 4 --fsdp --out "$OUT/train_${DEVICE}_7b4_fsdp.json" ${TRAIN_ARGS:-}
# The debug recipe at 125m: does the infill recipe learn to end its lines and get some right at scale?
step infill-125m 480 $PY bench/infill_recipe.py --run manifests/samples/trainingrun-125m-gpu.yaml --device "$DEVICE" \
  --max-seconds 300 --out "$OUT/infill_recipe_125m.json" ${INFILL_ARGS:-}
# The endpoint where Ray Serve is there (debug-size model; not counted in the 6 minutes).
if $PY -c "import ray.serve, fastapi" 2>/dev/null; then
  step serve-throughput-endpoint 240 $PY bench/serve_throughput.py --device "$DEVICE" --parts engine,endpoint --rounds 1 \
    --out "$OUT/serve_throughput_${DEVICE}.json" ${BENCH_ARGS:-}
fi
echo "failed steps: $failed; results in $OUT"
exit "$failed"
