#!/usr/bin/env bash
# Everything a lent GPU should run, in parts that fit one call each (the machine has no network;
# torch, triton and transformers are preinstalled there; fastapi/uvicorn, openai, xformers and
# their needs are not, and travel as wheels in .gpu-wheels: `carry: [".gpu-wheels"]`).
#
#   benchmarks/gpu_check.sh [fa4] [tests] [bf16] [attention] [engine] [quantized] [overhead] [policies]
#     (default: all but fa4, which needs the two-call preparation below)
#   TESTS="tests/engine/test_gpu_engine.py -k swap" benchmarks/gpu_check.sh tests   (a rerun)
#
# Installs the project without dependencies and the carried wheels, then runs the parts named:
# tests     pytest -m gpu over attention, allocator, engine and the server ($TESTS to narrow)
# bf16      the bf16 token-by-token checks against HF per backend and model shape (-s: figures)
# attention bench_attention.py on CUDA: per-backend kernel time beside the HBM-read bound
# engine    bench_gpu.py: the engine per attention backend, padded, HF generate (small Llama)
# quantized bench_gpu.py on the Llama-3.2-1B shape at B=64: bf16, int4 and fp8 against the
#           bound the weights' bytes put on tokens/s (issue 35)
# overhead  bench_overhead.py on CUDA: host ms per step by phase, GPU idle share (greedy offline
#           with step-ahead scheduling on, the CUDA default, and off; streams; sampled), and
#           bench_sampler.py on CUDA
# policies  bench_policies_gpu.py: BATON vs Orca/static/chunked on a Llama-3.2-1B shape in bf16
# Every log and result lands in $LOGS, packed after each part into $OUT/gpu-check.tgz (the
# device tool brings back at most 8 files); $OUT/summary.txt has one line per part.
#
# Bring the wheels here first (the machine is Python 3.12, x86-64):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-wheels \
#     xformers==0.0.35 fastapi starlette uvicorn pydantic pydantic_core annotated-types \
#     typing-inspection typing_extensions opentelemetry-api anyio sniffio openai jiter distro \
#     httpx2 httpcore2 idna truststore
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_31_x86_64 -d .gpu-wheels "llguidance==1.7.6"  # a newer glibc tag
#
# FlashAttention-4 (part fa4: flash_attn.cute, which reads our 16-token pages in place on SM90+).
# Its CuTe DSL library wheel is 92 MB, over one call's 64 MiB, so it travels in two halves over
# two back-to-back calls (a warm machine keeps the repository's ignored files between calls):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .gpu-fa4 flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
#     nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi \
#     torch-c-dlpack-ext quack-kernels einops
#   benchmarks/gpu_check.sh split-fa4   # here: .gpu-fa4-1 (the big wheel's first half and the
#                                       # small wheels, 55 MB), .gpu-fa4-2 (its second half, 44 MB)
#   call 1: carry [".gpu-fa4-1"]; command: benchmarks/gpu_check.sh stash-fa4   (seconds)
#   call 2, at once: carry [".gpu-wheels", ".gpu-fa4-2"]; command: benchmarks/gpu_check.sh fa4 tests
# (nvidia-cutlass-dsl asks for its CUDA 12 libraries too; installed without dependencies, the
# CUDA 13 ones that match the machine's torch are the only ones there.)
set -uo pipefail
cd "$(dirname "$0")/.."
BIG_FA4_WHEEL="nvidia_cutlass_dsl_libs_cu13-*.whl"
if [[ "${1:-}" == split-fa4 ]]; then
  rm -rf .gpu-fa4-1 .gpu-fa4-2 && mkdir -p .gpu-fa4-1 .gpu-fa4-2
  big=$(ls .gpu-fa4/$BIG_FA4_WHEEL) || { echo "no $BIG_FA4_WHEEL in .gpu-fa4"; exit 1; }
  split -b 46m -d "$big" ".gpu-fa4-1/$(basename "$big").part-"
  mv .gpu-fa4-1/*.part-01 .gpu-fa4-2/ && cp .gpu-fa4/*.whl .gpu-fa4-1/ && rm ".gpu-fa4-1/$(basename "$big")"
  du -sh .gpu-fa4-1 .gpu-fa4-2
  exit 0
fi
if [[ "${1:-}" == stash-fa4 ]]; then  # call 1 of 2: keep the first half on the machine
  mkdir -p .gpu-stash && cp .gpu-fa4-1/* .gpu-stash/ && ls -la .gpu-stash
  exit 0
fi
OUT="${OUT:-/tmp/gpu-check}"
LOGS="${LOGS:-/tmp/gpu-check-logs}"
mkdir -p "$OUT" "$LOGS"
export BATON_PAGED_CACHE="${BATON_PAGED_CACHE:-/tmp/baton-paged-cache}"  # models, kernels: not in $OUT
export PYTHONUNBUFFERED=1
parts="${*:-tests bf16 attention engine quantized overhead policies}"
start=$(date +%s)
stamp() {
  echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$LOGS/summary.txt"
  cp "$LOGS/summary.txt" "$OUT/" && tar czf "$OUT/gpu-check.tgz" -C "$LOGS" .
}
wants() { [[ " $parts " == *" $1 "* ]]; }

python -m pip install --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 \
  || { stamp "install failed"; tail -20 "$LOGS/install.log"; exit 1; }
if compgen -G ".gpu-wheels/*.whl" >/dev/null; then
  python -m pip install --no-deps --no-index .gpu-wheels/*.whl >>"$LOGS/install.log" 2>&1 \
    && stamp "installed $(ls .gpu-wheels/*.whl | wc -l) carried wheels" \
    || stamp "could not install the carried wheels (install.log)"
fi
if wants fa4; then  # call 2 of 2: join the halves and install FlashAttention-4
  cp .gpu-stash/* .gpu-fa4-2/ 2>/dev/null
  big=$(ls .gpu-fa4-2/*.part-00 2>/dev/null | sed 's/.part-00$//')
  if [[ -n "$big" ]] && cat "$big".part-* >"$big" && rm "$big".part-* \
    && python -m pip install --no-deps --no-index .gpu-fa4-2/*.whl >>"$LOGS/install.log" 2>&1 \
    && python -c "from flash_attn.cute import flash_attn_varlen_func" >>"$LOGS/install.log" 2>&1; then
    stamp "installed FlashAttention-4"
  else
    stamp "FlashAttention-4 not installed (first half not stashed, or it does not import: install.log)"
  fi
fi
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1
python - <<'PY' 2>&1 | tee "$LOGS/versions.txt"
import importlib, torch
def version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception as error:
        return f"absent ({type(error).__name__})"
names = ("transformers", "triton", "xformers", "flash_attn.cute", "fastapi", "uvicorn", "openai")
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
      "flash-attention built in:", torch.backends.cuda.is_flash_attention_available(),
      *(f"{n} {version(n)}" for n in names))
PY
stamp "installed; parts: $parts"

if wants tests; then
  # shellcheck disable=SC2086 # $TESTS is a list of pytest arguments
  timeout 180 python -m pytest -m gpu -q -p no:cacheprovider -rs --continue-on-collection-errors \
    --ignore=tests/engine/test_gpu_bf16.py ${TESTS:-tests/attention tests/allocator tests/engine \
    tests/server/test_gpu_serve.py} >"$LOGS/pytest-gpu.log" 2>&1
  stamp "pytest -m gpu exit $?: $(tail -1 "$LOGS/pytest-gpu.log")"
fi

if wants bf16; then
  timeout 120 python -m pytest -m gpu -q -s -p no:cacheprovider -rs \
    tests/engine/test_gpu_bf16.py >"$LOGS/pytest-bf16.log" 2>&1
  stamp "bf16 token checks exit $?: $(tail -1 "$LOGS/pytest-bf16.log")"
  grep "^bf16 " "$LOGS/pytest-bf16.log" | tee -a "$LOGS/summary.txt"
fi

if wants attention; then
  timeout 75 python benchmarks/bench_attention.py --device cuda >"$LOGS/bench-attention.log" 2>&1
  stamp "bench_attention exit $?"
  cp benchmarks/results/attention-cuda.* "$LOGS/" 2>/dev/null
fi

if wants engine; then
  timeout 150 python benchmarks/bench_gpu.py --models small --batch-sizes 32,128 \
    --num-requests 128 --max-budget 128 \
    --systems baton,baton-flash,baton-xformers,baton-padded,hf-generate \
    >"$LOGS/bench-gpu.log" 2>&1
  stamp "bench_gpu exit $?"
  tail -12 "$LOGS/bench-gpu.log"
  cp benchmarks/results/gpu-*.json "$LOGS/" 2>/dev/null
fi

if wants quantized; then
  timeout 240 python benchmarks/bench_gpu.py --models llama1b --batch-sizes 64 \
    --num-requests 128 --max-budget 128 --systems baton,baton-int4,baton-fp8 --tag quantized \
    >"$LOGS/bench-quantized.log" 2>&1
  stamp "bench_gpu quantized exit $?"
  tail -6 "$LOGS/bench-quantized.log"
  cp benchmarks/results/gpu-*-quantized.json "$LOGS/" 2>/dev/null
fi

if wants overhead; then
  timeout 70 python benchmarks/bench_overhead.py --device cuda --repeats 1 \
    >"$LOGS/bench-overhead.log" 2>&1
  stamp "bench_overhead exit $?"
  tail -8 "$LOGS/bench-overhead.log"
  timeout 60 python benchmarks/bench_overhead.py --device cuda --repeats 1 --batches 32,128 \
    --output-kind cumulative --name overhead-cpu-cumulative >"$LOGS/bench-overhead-stream.log" 2>&1
  stamp "bench_overhead (streams) exit $?"
  timeout 60 python benchmarks/bench_overhead.py --device cuda --repeats 1 --batches 32,128 \
    --async-scheduling off --name overhead-cpu-sync >"$LOGS/bench-overhead-sync.log" 2>&1
  stamp "bench_overhead (step-ahead off) exit $?"
  timeout 60 python benchmarks/bench_overhead.py --device cuda --repeats 1 --batches 32,128 \
    --temperature 0.8 --top-p 0.95 --name overhead-cpu-sampled >"$LOGS/bench-overhead-sampled.log" 2>&1
  stamp "bench_overhead (sampled) exit $?"
  timeout 60 python benchmarks/bench_sampler.py --device cuda --repeats 5 \
    >"$LOGS/bench-sampler.log" 2>&1
  stamp "bench_sampler exit $?"
  cp benchmarks/results/overhead-cuda*.* benchmarks/results/sampler-cuda.* "$LOGS/" 2>/dev/null
fi

if wants policies; then
  timeout 150 python benchmarks/bench_policies_gpu.py >"$LOGS/bench-policies-gpu.log" 2>&1
  stamp "bench_policies_gpu exit $?"
  tail -12 "$LOGS/bench-policies-gpu.log"
  cp benchmarks/results/policies-gpu.* "$LOGS/" 2>/dev/null
fi
stamp "done"
