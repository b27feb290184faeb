// out = x @ W.T (+ b) for bfloat16 x and W on Intel AMX tiles, W packed once into blocks of 32
// output columns whose inputs go in pairs: packed[b, p, c, i] = W[32 b + c, 2 p + i]
// ([n / 32, k / 2, 32, 2], baton_paged/model/packed_linear.py packs it). That is the layout an
// AMX bfloat16 multiply takes its second operand in (pairs of inputs side by side per column), so
// a tile of 16 pairs x 16 columns loads straight from the packing, 128 bytes a row apart.
//
// Why our own: oneDNN's bfloat16 matmul on its own packed weights reads them at 26-28 GB/s in a
// decode step of one row (an Intel Xeon with AMX, 2 threads), half what a plain sum reads, and no
// better at 32 rows. This kernel, measured on the two Llama shapes' per-step linears: 0.62-0.71x
// oneDNN's time at 1-32 rows, on a par or faster at 256-2048 (kGroupBlocks). One packing serves
// every row count, and with no kernel to compile per row count there is nothing to pad rows to.
//
// The loop (multiply, below, says how threads share it): a work item is one block of 32 columns x a
// chunk of 32 rows, four 16 x 16 float accumulator tiles; per 32 inputs it loads two tiles of x's
// rows and two of the weights and multiplies each pair. A last chunk of fewer rows is copied into
// scratch first (the rows past it are computed and dropped). Each output is a sum over k in the
// hardware's order, the same whatever the other rows: a row's result does not depend on the call it
// is in. The sums are float32, the bias added in float32, then rounded to bfloat16 to nearest even,
// as torch rounds, except that the tile multiply and the rounding take denormal values as zero
// (torch keeps them). amx_silu_linear runs a gate-up projection's gate and up blocks in turn and
// writes silu(gate) * up instead: the activation's pass over rows both threads had just written is
// gone.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "amx_tiles.h"
#include "claimed_items.h"
#include "decoder_ops.h"
#include "wide_math.h"

#ifdef BATON_AMX
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // output columns a block holds
constexpr int64_t kChunk = 32;  // rows a work item covers: two tiles of 16
constexpr int64_t kStep = 32;   // inputs a tile multiply covers: 16 pairs
constexpr int64_t kStepBytes = kStep * kBlock * sizeof(c10::BFloat16);  // a block's, per step
// How far ahead of the step being multiplied its weights are asked for (near a block's end, those
// of the block the thread multiplies next, as its caller names it). The hardware does not run ahead
// of tile loads on its own: without it a one-row call over SmolLM2's weights read them at ~18 GB/s,
// with 8 KiB ahead at ~25 (2 threads, Intel Xeon with AMX; 2 and 16 KiB did less well).
constexpr int64_t kPrefetchBytes = 8192;
// Blocks whose chunks run together, chunk by chunk, in a prefill's items: their weights stay in
// cache from one chunk to the next, and each output row is written 8 blocks (512 bytes) on end. One
// block's chunks in a row wrote 64 bytes a row at a time, scattered: a 256-row gate-up projection
// took 1.3x oneDNN's time, a third of it those writes; with 8 blocks 1.0x, and 0.9x at 2048 rows
// (from 1.85x).
constexpr int64_t kGroupBlocks = 8;
// A claimed item's chunks: a group's blocks for 128 rows, 15-40 us of a SmolLM2 layer's work.
constexpr int64_t kSlabChunks = 4;
// The most chunks a call takes block by block (every chunk of a block, then the next block) rather
// than in slabs: up to 256 rows, where each block's weights are then read once, from memory, for
// all its rows. SmolLM2's 30 layers of bfloat16 linears, weights rotated over three copies as an
// engine reads them from memory (2 threads, interleaved), against up to 128 rows: 160 rows 0.79x
// the time, 200 0.82x, 247 0.95x; 300 and 384 rows 1.01-1.02x block by block, so they stay in
// slabs.
constexpr int64_t kBlockByBlockChunks = 8;

// Tiles (amx_tiles.h's configure_tiles, each 16 rows of 64 bytes): 0-3 the sums (rows 0-15 x
// columns 0-15, 0-15 x 16-31, 16-31 x 0-15, 16-31 x 16-31), 4-5 x's rows 0-15 and 16-31 at 32
// inputs, 6-7 the weights' 16 pairs x columns 0-15 and 16-31.
using baton::configure_tiles;

// One work item: rows [0, 32) of x (k apart; only the first 16 where Two is false) against one
// block's weights, the sums into sums[32][32]; `next`: the block multiplied after it.
template <bool Two>
void multiply_chunk(const c10::BFloat16* x, int64_t k, const c10::BFloat16* block,
                    const c10::BFloat16* next, float* sums) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (Two) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t x_stride = k * sizeof(c10::BFloat16);
  const int64_t block_bytes = k * kBlock * sizeof(c10::BFloat16);
  constexpr int64_t w_stride = kBlock * 2 * sizeof(c10::BFloat16);  // one pair of inputs
  for (int64_t input = 0; input < k; input += kStep) {
    const c10::BFloat16* pairs = block + input * kBlock;  // pair input / 2, column 0
    const int64_t ahead_at = input * kBlock * sizeof(c10::BFloat16) + kPrefetchBytes;
    const char* ahead = ahead_at < block_bytes
                            ? reinterpret_cast<const char*>(block) + ahead_at
                            : reinterpret_cast<const char*>(next) + (ahead_at - block_bytes);
    for (int64_t line = 0; line < kStepBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    _tile_loadd(4, x + input, x_stride);
    if constexpr (Two) _tile_loadd(5, x + 16 * k + input, x_stride);
    _tile_loadd(6, pairs, w_stride);
    _tile_loadd(7, pairs + 32, w_stride);  // columns 16-31: 16 pairs on
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (Two) {
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  constexpr int64_t sums_stride = kBlock * sizeof(float);
  _tile_stored(0, sums, sums_stride);
  _tile_stored(1, sums + 16, sums_stride);
  if constexpr (Two) {
    _tile_stored(2, sums + 16 * kBlock, sums_stride);
    _tile_stored(3, sums + 16 * kBlock + 16, sums_stride);
  }
}

inline __m512 load_floats(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_floats(const c10::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// rows x 32 sums plus the block's bias, rounded to bfloat16 into out (width apart).
template <typename Bias>
void finish(const float* sums, int64_t rows, const Bias* bias, c10::BFloat16* out, int64_t width) {
  __m512 plus[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  if (bias) {
    plus[0] = load_floats(bias);
    plus[1] = load_floats(bias + 16);
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int half = 0; half < 2; ++half) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(sums + r * kBlock + 16 * half), plus[half]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * width + 16 * half),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
  }
}

// The gated MLP's activation on a gate block's and its up block's rows x 32 sums, into out
// (width apart): each rounded to bfloat16 as finish rounds it, then silu_and_mul's own step
// (wide_math.h's store_silu_and_mul) on those values, so every bit is the two calls'.
void finish_silu(const float* gate, const float* up, int64_t rows, c10::BFloat16* out,
                 int64_t width) {
  const auto as_stored = [](const float* sums) {  // finish's rounding, widened back
    const __m256i bits = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(sums)));
    return (baton::vwide)_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
  };
  for (int64_t r = 0; r < rows; ++r) {
    for (int half = 0; half < 2; ++half) {
      const int64_t at = r * kBlock + 16 * half;
      baton::store_silu_and_mul(out + r * width + 16 * half, as_stored(gate + at),
                                as_stored(up + at));
    }
  }
}

// A last chunk of `left` < 32 rows (k inputs each) copied into this thread's 32-row scratch, kept
// from call to call: a fresh zeroed tensor per call cost 6-17 us, a decode step's whole budget
// for a small linear. The scratch's rows past `left` hold zeros or an earlier call's rows, finite
// values whose outputs are dropped (a row's sums never mix with another's).
const c10::BFloat16* last_chunk(const c10::BFloat16* rows, int64_t left, int64_t k) {
  static thread_local std::vector<c10::BFloat16> scratch;
  if (static_cast<int64_t>(scratch.size()) < kChunk * k) scratch.resize(kChunk * k);
  std::memcpy(scratch.data(), rows, left * k * sizeof(c10::BFloat16));
  return scratch.data();
}

// What one call multiplies, and a thread's share of it: `run` for a prefill's items (a group of
// output blocks, chunk by chunk), `all_chunks` for a decode step's (one output block, every chunk).
// An output block is one block of the weights, or with `silu` (a gate-up projection whose up blocks
// follow its gate blocks) gate block j and up block j + count / 2 multiplied in turn and finished
// into one block of activations.
template <typename Bias>
struct Product {
  const c10::BFloat16 *rows, *tail, *weights;  // tail: the last chunk's rows (last_chunk)
  const Bias* bias;
  c10::BFloat16* into;
  int64_t n_rows, k, outputs, width, full, chunks;
  bool silu;

  // block's sums into `to`, asking ahead for block `next`'s weights
  void sums(const c10::BFloat16* x_rows, int64_t n, int64_t block, int64_t next, float* to) const {
    const c10::BFloat16 *w = weights + block * k * kBlock, *after = weights + next * k * kBlock;
    if (n > 16) {
      multiply_chunk<true>(x_rows, k, w, after, to);
    } else {
      multiply_chunk<false>(x_rows, k, w, after, to);
    }
  }

  // Output block `block` for chunk `chunk`, asking ahead for output block `next` (gate and up
  // sums into this thread's scratch).
  void one(int64_t chunk, int64_t block, int64_t next, float* gate, float* up) const {
    const int64_t first = chunk * kChunk, n = std::min(kChunk, n_rows - first);
    const c10::BFloat16* x_rows = chunk < full ? rows + first * k : tail;
    c10::BFloat16* to = into + first * width + block * kBlock;
    if (silu) {  // the gate block, its up block, then the next gate block
      sums(x_rows, n, block, block + outputs, gate);
      sums(x_rows, n, block + outputs, next, up);
      finish_silu(gate, up, n, to, width);
    } else {
      sums(x_rows, n, block, next, gate);
      finish(gate, n, bias ? bias + block * kBlock : bias, to, width);
    }
  }

  // Blocks [group, group_end) for chunks [chunk, chunk_end), the blocks chunk by chunk.
  void run(int64_t group, int64_t group_end, int64_t chunk, int64_t chunk_end) const {
    alignas(64) float gate[kChunk * kBlock], up[kChunk * kBlock];
    for (; chunk < chunk_end; ++chunk) {
      for (int64_t block = group; block < group_end; ++block) {
        one(chunk, block, std::min(block + 1, outputs - 1), gate, up);
      }
    }
  }

  // Output block `block` for every chunk: before each next chunk the look-ahead asks for this
  // block's weights again, during the last for block `next`'s.
  void all_chunks(int64_t block, int64_t next) const {
    alignas(64) float gate[kChunk * kBlock], up[kChunk * kBlock];
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      one(chunk, block, chunk + 1 < chunks ? block : next, gate, up);
    }
  }
};

// Few rows (a decode step, or up to kBlockByBlockChunks chunks): each output block for every
// chunk, the blocks taken from both ends of runs shared by pairs of threads (claimed_items.h's
// run_from_both_ends), so that multiply_chunk's look-ahead still asks for the block this thread
// multiplies next while where a pair meets follows the two vCPUs' speeds. Against equal runs of
// blocks split up front, groups of 8 chunk by chunk (SmolLM2's 30 layers of bfloat16 linears,
// interleaved in one process, 2 threads; three A/B runs): 0.88-1.04x the time at 1-16 rows,
// 0.80-0.99x at 32 and 48, 0.78-1.01x at 96-128; an engine's B=24 / 32 decode step 0.92x / 0.97x
// (medians of 20-30 rounds); the same bits. Many rows (a prefill): items of a group x
// kSlabChunks chunks, group by group, claimed as threads come free (claimed_items.h): a
// 4096-token SmolLM2 bfloat16 prefill took 0.72-0.93x the time of the static split (medians of
// interleaved runs, 2 threads; the more the two vCPUs' speeds differed, the more it gained), the
// same bits.
template <typename Bias>
void multiply(const at::Tensor& x, const at::Tensor& packed, const Bias* bias, at::Tensor& out,
              bool silu = false) {
  const int64_t n_rows = x.size(0), k = x.size(1), count = packed.size(0);
  const int64_t outputs = silu ? count / 2 : count, full = n_rows / kChunk;
  const int64_t left = n_rows - full * kChunk;
  const auto* rows = x.data_ptr<c10::BFloat16>();
  const Product<Bias> product{rows, left ? last_chunk(rows + full * kChunk * k, left, k) : nullptr,
                              packed.data_ptr<c10::BFloat16>(), bias,
                              out.data_ptr<c10::BFloat16>(), n_rows, k, outputs,
                              outputs * kBlock, full, (n_rows + kChunk - 1) / kChunk, silu};
  if (product.chunks <= kBlockByBlockChunks) {
    baton::run_from_both_ends(outputs, [&](const auto& claim) {
      configure_tiles();
      for (baton::EndItem mine = claim(); mine.item >= 0; mine = claim()) {
        product.all_chunks(mine.item, mine.next);
      }
      _tile_release();
    });
    return;
  }
  const int64_t slabs = (product.chunks + kSlabChunks - 1) / kSlabChunks;
  const int64_t groups = (outputs + kGroupBlocks - 1) / kGroupBlocks;
  baton::run_claimed(groups * slabs, [&](const auto& claim) {
    configure_tiles();
    for (int64_t item = claim(); item >= 0; item = claim()) {
      const int64_t group = item / slabs * kGroupBlocks, chunk = item % slabs * kSlabChunks;
      product.run(group, std::min(outputs, group + kGroupBlocks), chunk,
                  std::min(product.chunks, chunk + kSlabChunks));
    }
    _tile_release();
  });
}

void check_operands(const at::Tensor& x, const at::Tensor& packed, const char* name) {
  TORCH_CHECK(amx_linear_usable(), name, ": the kernel refused this process AMX tiles");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16, name,
              ": x must be a bfloat16 [rows, k] CPU tensor");
  TORCH_CHECK(packed.device().is_cpu() && packed.dim() == 4 && packed.is_contiguous() &&
                  packed.scalar_type() == at::kBFloat16 && packed.size(2) == kBlock &&
                  packed.size(3) == 2 && 2 * packed.size(1) == x.size(1) &&
                  x.size(1) % kStep == 0 && x.size(1) > 0,
              name, ": packed must be a contiguous bfloat16 [n / 32, k / 2, 32, 2] CPU tensor, "
              "k a multiple of 32 > 0 and x's");
}

}  // namespace

bool amx_linear_usable() { return baton::amx_tiles_granted(); }

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed,
                      const std::optional<at::Tensor>& bias) {
  check_operands(x, packed, "amx_linear");
  const int64_t width = packed.size(0) * kBlock;
  TORCH_CHECK(!bias || (bias->device().is_cpu() && bias->is_contiguous() &&
                        bias->numel() == width &&
                        (bias->scalar_type() == at::kFloat ||
                         bias->scalar_type() == at::kBFloat16)),
              "amx_linear: bias must be a contiguous float32 or bfloat16 [n] CPU tensor");
  at::Tensor out = at::empty({x.size(0), width}, x.options());
  if (x.size(0) == 0) return out;
  const at::Tensor input = x.contiguous();
  if (bias && bias->scalar_type() == at::kFloat) {
    multiply(input, packed, bias->data_ptr<float>(), out);
  } else {
    multiply(input, packed, bias ? bias->data_ptr<c10::BFloat16>() : nullptr, out);
  }
  return out;
}

at::Tensor amx_silu_linear(const at::Tensor& x, const at::Tensor& packed) {
  check_operands(x, packed, "amx_silu_linear");
  TORCH_CHECK(packed.size(0) % 2 == 0,
              "amx_silu_linear: a gate-up projection has as many up blocks as gate blocks");
  at::Tensor out = at::empty({x.size(0), packed.size(0) / 2 * kBlock}, x.options());
  if (x.size(0) == 0) return out;
  multiply(x.contiguous(), packed, static_cast<const float*>(nullptr), out, true);
  return out;
}

#endif  // BATON_AMX
