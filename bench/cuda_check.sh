#!/bin/bash
# The engine's CUDA path in one go, for a CUDA machine (CI has none): the engine test suite on the GPU,
# how busy the GPU is and the throughput against transformers, each with the decode CUDA graphs on and
# off, how well the step-latency model fits, and the co-serving benchmark, all on a random-weight twin
# of the bundled model unless MODEL names a real one. Logs and JSON go to OUT (default ./cuda-check).
# Runs with the python on PATH (PY=...), which must hold a CUDA torch and this project's engine
# dependencies (torch, transformers, safetensors, gguf, numpy, jinja2, pytest, matplotlib).
#
#   bash bench/cuda_check.sh                 # about 8.5 minutes on an H200
#   DURATION=60 OUT=/tmp/cc bash bench/cuda_check.sh
#   COSERVE_ARGS="--slo-ttft-ms 300 --slo-tpot-ms 30" bash bench/cuda_check.sh   # SLOs set, not derived
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-cuda-check}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
DURATION=${DURATION:-20}
COSERVE_ARGS=${COSERVE_ARGS:-}   # more coserve.py options (word-split), e.g. SLOs or --policies
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu walks the same steps on the CPU (to try the script out)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { echo "== $1 ($(date +%T))"; }

step environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  lscpu | grep -E "Model name|^CPU\(s\)"
  $PY -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

# A directory with no weights yet becomes the bundled model's random-weight twin: from the bundled GGUF,
# or, where that is missing, from the config.json that `random_twin.py DIR --config-only` put there.
MODEL=${MODEL:-$PWD/.cuda-check-twin}
if [ ! -e "$MODEL" ] || { [ -d "$MODEL" ] && ! ls "$MODEL"/*.safetensors >/dev/null 2>&1; }; then
  (cd bench && $PY random_twin.py "$MODEL") 2>&1 | tail -1
fi

# The decode graphs first (what a short lease must not miss): their tests and transformers' tokens on
# the device, then how busy the GPU is and the throughput with and without them, then the rest.
step "decode graph tests on $DEVICE"
CONSERVE_TEST_DEVICE=$DEVICE timeout 120 $PY -m pytest tests/engine/test_decode_graphs.py \
  tests/engine/test_model_vs_transformers.py -q -m "not bundled" --tb=short -rf -o timeout=60 \
  > "$OUT/pytest_graphs.log" 2>&1
echo "pytest exit $?"; tail -4 "$OUT/pytest_graphs.log"

if [ "$DEVICE" != cpu ]; then
  for graphs in on off; do
    step "gpu busy, decode graphs $graphs"
    timeout 120 $PY bench/gpu_busy.py --model "$MODEL" --device "$DEVICE" --decode-graphs $graphs \
      > "$OUT/gpu_busy_$graphs.log" 2>&1
    echo "gpu_busy exit $?"; grep "^decode graphs" "$OUT/gpu_busy_$graphs.log"
  done
fi

step throughput
(cd bench && timeout 200 $PY throughput.py --device $DEVICE --model "$MODEL" --repeats 3 \
  --json "$OUT/throughput_cuda.json" > "$OUT/throughput_cuda.log" 2>&1)
echo "throughput exit $?"; grep -E "tok/s|x$" "$OUT/throughput_cuda.log"
step "throughput, engine without decode graphs"
(cd bench && timeout 120 $PY throughput.py --device $DEVICE --model "$MODEL" --repeats 3 --skip-transformers \
  --decode-graphs off --json "$OUT/throughput_cuda_eager.json" > "$OUT/throughput_cuda_eager.log" 2>&1)
echo "throughput exit $?"; grep -E "tok/s|x$" "$OUT/throughput_cuda_eager.log"

step "cost model fit"
timeout 120 $PY bench/cost_model_fit.py --device $DEVICE --model "$MODEL" --max-batched-tokens 4096 \
  --json "$OUT/cost_model_fit.json" > "$OUT/cost_model_fit.log" 2>&1
echo "cost_model_fit exit $?"; tail -6 "$OUT/cost_model_fit.log"

step "engine tests on $DEVICE"
CONSERVE_TEST_DEVICE=$DEVICE timeout 300 $PY -m pytest tests/engine -q -m "not bundled" --tb=short -rf -o timeout=60 \
  --ignore tests/engine/test_decode_graphs.py --ignore tests/engine/test_model_vs_transformers.py \
  > "$OUT/pytest_cuda.log" 2>&1
echo "pytest exit $?"; tail -8 "$OUT/pytest_cuda.log"

step "co-serving, ${DURATION} s per policy"
(cd bench && timeout $((DURATION * 8 + 300)) $PY coserve.py --device $DEVICE --model "$MODEL" --duration "$DURATION" \
  --drain 4 --offline-requests $((DURATION * 200)) --kv-blocks 2048 --max-batched-tokens 4096 \
  --offline-max-batched-tokens 4096 --step-trace 50000 $COSERVE_ARGS --json "$OUT/coserve_cuda.json" \
  > "$OUT/coserve_cuda.log" 2>&1)
echo "coserve exit $?"; grep "sized to the TPOT SLO" "$OUT/coserve_cuda.log"
sed -n '/targets (issue 3)/,$p' "$OUT/coserve_cuda.log"
step done
