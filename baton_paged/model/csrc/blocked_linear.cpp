// out = x @ W.T (+ b) in float32 on AVX-512, W packed once into blocks of 32 output columns:
// packed[b, k, c] = W[32 b + c, k] (baton_paged/model/packed_linear.py packs it).
//
// Why our own: oneDNN's float32 kernels on their own packed weights read that weight at 30-40
// GB/s in a decode step of one row, where a plain matrix-vector product reads it at ~50 (an
// Intel Xeon with AMX, 2 threads; measured, 0.56-0.82x oneDNN's time at one row), and a single
// stream is nothing but such steps. From 4 rows up this kernel is on a par with oneDNN (0.81-0.96x
// at 32 rows, 0.93-1.10x at 256-512), so one packed copy serves every row count, and with no
// kernel to compile per row count there is nothing to pad rows to.
//
// The loop: a tile of up to 6 rows x 64 columns (two blocks) keeps 24 accumulators in registers;
// per input k it loads the 64 weights once and multiplies them into every row's accumulators.
// Each output is summed over k in order, in one accumulator, whatever the tile: a row's result
// does not depend on the other rows in the call.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <optional>

#include "decoder_ops.h"

#ifdef __AVX512F__
#include <immintrin.h>

namespace {

constexpr int64_t kBlock = 32;     // output columns a block holds
constexpr int64_t kTileRows = 6;   // rows a tile of two blocks keeps in registers (24 zmm)
constexpr int64_t kRowChunk = 48;  // rows one work item covers, for larger calls

struct Operands {
  const float* x;     // [rows, k]
  const float* w;     // [blocks, k, 32]
  const float* bias;  // [blocks * 32] or null
  float* out;         // [rows, blocks * 32]
  int64_t k, width;   // inputs; output columns
};

// Rows [row, row + R) x blocks [block, block + Blocks) (Blocks: 1 or 2).
template <int R, int Blocks>
void tile(const Operands& op, int64_t row, int64_t block) {
  constexpr int J = 2 * Blocks;  // 16-lane vectors a row
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* x = op.x + row * op.k;
  const float* first = op.w + block * op.k * kBlock;
  const float* second = first + op.k * kBlock;
  for (int64_t k = 0; k < op.k; ++k) {
    __m512 w[J];
    w[0] = _mm512_loadu_ps(first + k * kBlock);
    w[1] = _mm512_loadu_ps(first + k * kBlock + 16);
    if constexpr (Blocks == 2) {
      w[2] = _mm512_loadu_ps(second + k * kBlock);
      w[3] = _mm512_loadu_ps(second + k * kBlock + 16);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * op.k + k]);
      for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xr, w[j], acc[r][j]);
    }
  }
  float* out = op.out + row * op.width + block * kBlock;
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) {
      __m512 v = acc[r][j];
      if (op.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(op.bias + block * kBlock + 16 * j));
      _mm512_storeu_ps(out + r * op.width + 16 * j, v);
    }
  }
}

template <int Blocks>
void rows(const Operands& op, int64_t begin, int64_t end, int64_t block) {
  int64_t row = begin;
  for (; row + kTileRows <= end; row += kTileRows) tile<kTileRows, Blocks>(op, row, block);
  for (; row + 4 <= end; row += 4) tile<4, Blocks>(op, row, block);
  for (; row + 2 <= end; row += 2) tile<2, Blocks>(op, row, block);
  for (; row < end; ++row) tile<1, Blocks>(op, row, block);
}

// Blocks [begin, end) for rows [row, row_end): in pairs, a last odd one alone.
void blocks(const Operands& op, int64_t begin, int64_t end, int64_t row, int64_t row_end) {
  int64_t block = begin;
  for (; block + 2 <= end; block += 2) rows<2>(op, row, row_end, block);
  if (block < end) rows<1>(op, row, row_end, block);
}

}  // namespace

at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& packed,
                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "blocked_linear: x must be a float32 [rows, k] CPU tensor");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kFloat && packed.dim() == 3 &&
                  packed.is_contiguous() && packed.size(1) == x.size(1) &&
                  packed.size(2) == kBlock,
              "blocked_linear: packed must be a contiguous float32 [n / 32, k, 32] CPU tensor");
  const int64_t count = packed.size(0), width = count * kBlock, n_rows = x.size(0);
  TORCH_CHECK(!bias || (bias->device().is_cpu() && bias->scalar_type() == at::kFloat &&
                        bias->is_contiguous() && bias->numel() == width),
              "blocked_linear: bias must be a contiguous float32 [n] CPU tensor");
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty({n_rows, width}, x.options());
  const Operands op{input.data_ptr<float>(), packed.data_ptr<float>(),
                    bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), x.size(1),
                    width};
  if (n_rows <= kRowChunk) {  // each thread its own run of blocks, read once
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      blocks(op, begin, end, 0, n_rows);
    });
    return out;
  }
  // Many rows: items of a block pair x a chunk of rows, a pair's chunks in a row, so that the
  // pair's weights are read from memory once and from cache for its other chunks.
  const int64_t pairs = (count + 1) / 2, chunks = (n_rows + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = 2 * (item / chunks), row = (item % chunks) * kRowChunk;
      blocks(op, block, std::min(block + 2, count), row, std::min(n_rows, row + kRowChunk));
    }
  });
  return out;
}

#endif  // __AVX512F__
