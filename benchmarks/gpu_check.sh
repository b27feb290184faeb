#!/usr/bin/env bash
# Everything a lent GPU should run, in one call under 8 minutes (the machine lent has no network;
# torch, triton and transformers are preinstalled there, fastapi/uvicorn, flash-attn and xformers
# are not). Installs the project without dependencies, runs the `gpu` tests of the
# packages that need no server, then the GPU benchmark; every log lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export BATON_PAGED_CACHE="${BATON_PAGED_CACHE:-/tmp/baton-paged-cache}"  # models, kernels: not in $OUT
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/summary.txt"; }

python -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { stamp "install failed"; tail -20 "$OUT/install.log"; exit 1; }
# Optional GPU extras the machine lacks, carried as wheels (`carry: [".gpu-wheels"]`; fetch them
# here with `pip download --no-deps xformers==0.0.35 -d .gpu-wheels`): no network there.
for wheel in .gpu-wheels/*.whl; do
  [ -e "$wheel" ] || continue
  python -m pip install --no-deps "$wheel" >>"$OUT/install.log" 2>&1 \
    && stamp "installed $(basename "$wheel")" || stamp "could not install $(basename "$wheel")"
done
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch, transformers
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "absent"
try:
    import xformers; xv = xformers.__version__
except ImportError:
    xv = "absent"
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv, "xformers", xv,
      "transformers", transformers.__version__, torch.cuda.get_device_name())
PY
stamp "installed"

# --continue-on-collection-errors: modules importing the server need fastapi, absent there
timeout 240 python -m pytest -m gpu -q -p no:cacheprovider -rs --continue-on-collection-errors \
  tests/attention tests/allocator tests/engine >"$OUT/pytest-gpu.log" 2>&1
stamp "pytest -m gpu exit $?: $(tail -1 "$OUT/pytest-gpu.log")"

timeout 200 python benchmarks/bench_gpu.py --models small --batch-sizes 32,128 \
  --num-requests 128 --max-budget 128 >"$OUT/bench-gpu.log" 2>&1
stamp "bench_gpu exit $?"
tail -20 "$OUT/bench-gpu.log"
cp benchmarks/results/gpu-*.json "$OUT/" 2>/dev/null

timeout 150 python benchmarks/bench_overhead.py --device cuda --repeats 1 \
  >"$OUT/bench-overhead.log" 2>&1
stamp "bench_overhead exit $?"
tail -12 "$OUT/bench-overhead.log"
cp benchmarks/results/overhead-cuda.* "$OUT/" 2>/dev/null
stamp "done"
