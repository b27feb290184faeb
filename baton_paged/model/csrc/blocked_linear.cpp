// out = x @ W.T (+ b) on AVX-512, W packed once into blocks of 32 output columns:
// packed[b, k, c] = W[32 b + c, k] (baton_paged/model/packed_linear.py packs it), its values
// float32, or int8 codes with a float32 scale per output column (W[n, k] = codes[n, k] * scale[n]:
// quantized_linear.py's int8), or with a scale and an offset per group of inputs and column
// (W[n, k] = codes[n, k] * scale[n, g] + zero[n, g], g = k / group: int8_groups.py, GGUF's 5-, 6-
// and 8-bit formats; the scales and offsets in blocks too, [n / 32, groups, 32]), or 4-bit codes
// alike, two a byte ([n / 32, k, 16]: quantized_linear.py's int4, GGUF's 4-bit formats). x and out
// are float32 or bfloat16; the sums are float32.
//
// Why our own: oneDNN's float32 kernels on their own packed weights read that weight at 30-40
// GB/s in a decode step of one row, where a plain matrix-vector product reads it at ~50 (an
// Intel Xeon with AMX, 2 threads; measured, 0.56-0.82x oneDNN's time at one row), and a single
// stream is nothing but such steps. From 4 rows up this kernel is on a par with oneDNN (0.81-0.96x
// at 32 rows, 0.93-1.10x at 256-512), so one packed copy serves every row count, and with no
// kernel to compile per row count there is nothing to pad rows to. int8 codes are a quarter of
// float32's bytes, widened in registers; torch's own int8 kernel is a matrix-vector one.
//
// The loop: a tile of up to 6 rows x 64 columns (two blocks) keeps 24 accumulators in registers;
// per input k it loads the 64 weights once and multiplies them into every row's accumulators.
// A pair's first tile asks for its weights a little ahead of the one it multiplies (Asks::kStream);
// while its later tiles run, the next pair's weights are asked for (Ahead).
// Each output is summed over k in order, in one accumulator, whatever the tile, and scaled after:
// a row's result does not depend on the other rows in the call.
//
// blocked_silu_linear pairs each gate block with its up block in one tile instead of two
// neighbours, and stores silu(gate) * up (silu_and_mul's float arithmetic) in place of the two:
// the gate-up rows are never written and read back (the small Llama's float32 bench workload
// 0.974x the time, its B=32 decode step 0.973x; fresh engines interleaved, the same tokens).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>

#include "claimed_items.h"
#include "cpu_common.h"
#include "decoder_ops.h"
#include "wide_math.h"

#ifdef __AVX512F__
#include <immintrin.h>

namespace {

constexpr int64_t kBlock = 32;     // output columns a block holds
constexpr int64_t kRowChunk = 48;  // rows one work item covers, for larger calls
constexpr int64_t kStreamAhead = 16;  // inputs ahead a first pass asks for its weights
constexpr int kStreamRows = 2;        // the narrowest first pass that asks (one row needs not)

struct Operands {
  const float* x;        // [rows, k]
  const float* scale;    // [blocks * 32]: int8 codes' scale per column; or null
  const float* g_scale;  // [blocks, groups, 32]: int8 codes' scale per group and column; or null
  const float* g_zero;   // the same for the value code 0 stands for
  const float* bias;     // [blocks * 32] or null
  void* out;             // [rows, blocks * 32], float or bfloat16
  int64_t k, width;      // inputs; output columns
  int64_t group;         // inputs a group (k where not grouped)
  int64_t up_blocks = 0;  // silu_linear: gate block b's up block is b + up_blocks; 0 otherwise
};

// The weights' four kinds: float32, int8 codes times a scale per column (applied to the sums),
// int8 codes or 4-bit ones with a scale and an offset per group of inputs and column (applied to
// the codes as they are widened, so two vectors of each live in registers beside the tile's
// accumulators). `row`: a block's values per input, in `type`s (4-bit codes two to a byte: byte c
// holds column c in its low half, column c + 16 in its high one).
struct Floats {
  using type = float;
  static constexpr bool grouped = false;
  static constexpr int tile_rows = 6;  // 24 accumulators
  static constexpr int64_t row = kBlock;
};
struct Codes {
  using type = int8_t;
  static constexpr bool grouped = false;
  static constexpr int tile_rows = 6;
  static constexpr int64_t row = kBlock;
};
struct GroupCodes {
  using type = int8_t;
  static constexpr bool grouped = true;
  static constexpr int tile_rows = 4;  // 16 accumulators, 4 weight, 8 scale and offset vectors
  static constexpr int64_t row = kBlock;
};
struct GroupNibbles {
  using type = uint8_t;
  static constexpr bool grouped = true;
  static constexpr int tile_rows = 4;
  static constexpr int64_t row = kBlock / 2;
};

// One block's 32 values at one input, as two vectors of floats (codes widened exactly).
inline void load_row(const float* p, __m512 out[2]) {
  out[0] = _mm512_loadu_ps(p);
  out[1] = _mm512_loadu_ps(p + 16);
}
inline __m512 widened(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); }
inline void load_row(const int8_t* p, __m512 out[2]) {
  out[0] = widened(_mm_loadu_si128((const __m128i*)p));
  out[1] = widened(_mm_loadu_si128((const __m128i*)(p + 16)));
}
inline void load_row(const uint8_t* p, __m512 out[2]) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
  out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
}

inline void store_lanes(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store_lanes(c10::BFloat16* p, __m512 v) {
  baton::vfloat half[2];
  std::memcpy(half, &v, sizeof v);
  baton::store(p, half[0]);
  baton::store(p + baton::kLanes, half[1]);
}

// 16 sums of columns [column, column + 16) scaled and biased. One fused multiply-add where both
// apply, written out: left to the compiler, a multiply and an add may be fused in one tile and not
// in another, and a row's result would depend on the tile it lands in.
inline __m512 finished(const Operands& op, __m512 sums, int64_t column) {
  if (op.scale && op.bias) {
    return _mm512_fmadd_ps(sums, _mm512_loadu_ps(op.scale + column),
                           _mm512_loadu_ps(op.bias + column));
  }
  if (op.scale) return _mm512_mul_ps(sums, _mm512_loadu_ps(op.scale + column));
  if (op.bias) return _mm512_add_ps(sums, _mm512_loadu_ps(op.bias + column));
  return sums;
}

// The next blocks' weights, asked into L2 while this pair's tiles after the first one run: the
// first pass over a pair waits on memory for its weights, the others multiply them from cache,
// and without the asking the two took turns. Spread over those passes, `per_k` 64-byte lines an
// input (asked any faster, over two passes, it measured slower). 32 rows of the small Llama's
// per-step linears: 0.76-0.86x the time (0.81-0.84x at 8-24 rows, 2 threads, Intel Xeon with
// AMX); the fresh engine's first generate 3-5% faster.
struct Ahead {
  const char* next = nullptr;  // the next lines to ask for; null where there are none
  int64_t lines = 0;           // how many are left
  int64_t per_k = 0;           // lines asked an input in a pass

  void at(int64_t k) const {
    for (int64_t i = k * per_k, stop = std::min(lines, i + per_k); i < stop; ++i) {
      _mm_prefetch(next + 64 * i, _MM_HINT_T1);
    }
  }
  void passed(int64_t k) {  // a pass over k inputs asked for its share
    const int64_t asked = std::min(lines, k * per_k);
    next += 64 * asked;
    lines -= asked;
  }
};

// One input's worth of a block's weights asked for, a line per 64 bytes of it (past a block's end,
// the next block's or nothing of ours: a prefetch never faults).
template <typename Kind>
inline void stream(const typename Kind::type* at) {
  const char* bytes = reinterpret_cast<const char*>(at);
  for (int64_t line = 0; line < Kind::row * static_cast<int64_t>(sizeof(*at)); line += 64) {
    _mm_prefetch(bytes + line, _MM_HINT_T0);
  }
}

// What a tile asks the memory for besides its own loads: nothing, the next blocks' weights
// (Ahead), or its own weights kStreamAhead inputs ahead of the one it multiplies (kStream: a
// pair's first pass, which reads them from memory). A tile of several rows runs too long a loop
// for the core to keep enough of its own loads in flight: a call of 6 rows over SmolLM2's weights
// streamed from memory took 1.35x a call of one, where its arithmetic would hide under the memory
// time. With kStream, and the widest tile first: 0.82-0.85x the time at 4-8 rows, 0.93x at 2,
// 0.95-0.99x at 12-64 (SmolLM2's per-step linears, 2 threads, Intel Xeon with AMX).
enum class Asks { kNothing, kAhead, kStream };

// Rows [row, row + R) x blocks [block, block + Blocks) (Blocks: 1 or 2); w: the first block's
// [k, 32] weights, the second's after them. The inputs run group by group (one run where the
// weights are not grouped), each group's scales and offsets loaded once.
template <int R, int Blocks, typename Kind, typename Out, Asks Mode = Asks::kNothing>
void tile(const Operands& op, const typename Kind::type* w, int64_t row, int64_t block,
          Ahead* ahead = nullptr) {
  constexpr int J = 2 * Blocks;  // 16-lane vectors a row
  __m512 acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* x = op.x + row * op.k;
  const typename Kind::type* second = w + op.k * Kind::row * std::max<int64_t>(1, op.up_blocks);
  const int64_t step = Kind::grouped ? op.group : op.k, groups = op.k / step;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 scale[J], zero[J];
    if constexpr (Kind::grouped) {
      for (int j = 0; j < J; ++j) {  // block (block + j / 2), group g, lanes 16 (j % 2)
        const int64_t at = ((block + j / 2) * groups + g) * kBlock + 16 * (j % 2);
        scale[j] = _mm512_loadu_ps(op.g_scale + at);
        zero[j] = _mm512_loadu_ps(op.g_zero + at);
      }
    }
    for (int64_t k = g * step; k < (g + 1) * step; ++k) {
      if constexpr (Mode == Asks::kAhead) ahead->at(k);
      if constexpr (Mode == Asks::kStream) {
        stream<Kind>(w + (k + kStreamAhead) * Kind::row);
        if constexpr (Blocks == 2) stream<Kind>(second + (k + kStreamAhead) * Kind::row);
      }
      __m512 wk[J];
      load_row(w + k * Kind::row, wk);
      if constexpr (Blocks == 2) load_row(second + k * Kind::row, wk + 2);
      if constexpr (Kind::grouped) {
        for (int j = 0; j < J; ++j) wk[j] = _mm512_fmadd_ps(wk[j], scale[j], zero[j]);
      }
      for (int r = 0; r < R; ++r) {
        const __m512 xr = _mm512_set1_ps(x[r * op.k + k]);
        for (int j = 0; j < J; ++j) acc[r][j] = _mm512_fmadd_ps(xr, wk[j], acc[r][j]);
      }
    }
  }
  if constexpr (Mode == Asks::kAhead) ahead->passed(op.k);
  const int64_t column = block * kBlock;
  Out* out = static_cast<Out*>(op.out) + row * op.width + column;
  if constexpr (Blocks == 2) {
    if (op.up_blocks) {  // silu(gate) * up: silu_and_mul_row's float arithmetic on 16 lanes
      for (int r = 0; r < R; ++r) {
        for (int j = 0; j < 2; ++j) {
          const baton::vwide gate = (baton::vwide)acc[r][j], up = (baton::vwide)acc[r][2 + j];
          store_lanes(out + r * op.width + 16 * j,
                      (__m512)(gate / (1.0f + baton::exp_wide(-gate)) * up));
        }
      }
      return;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) {
      store_lanes(out + r * op.width + 16 * j, finished(op, acc[r][j], column + 16 * j));
    }
  }
}

// Rows [begin, end) x one or two blocks, tile by tile: the widest first, which streams the
// blocks' weights from memory (Asks::kStream), then the narrow ones, then the other wide ones,
// which ask for `next_bytes` of `next` (the next blocks, null where none) between them.
template <int Blocks, typename Kind, typename Out>
void rows(const Operands& op, const typename Kind::type* w, int64_t block, int64_t begin,
          int64_t end, const char* next, int64_t next_bytes) {
  constexpr int64_t most = Kind::tile_rows;
  const int64_t n = end - begin, rest = n % most;  // rows left to tiles of 4, 2 and 1
  int64_t count[4] = {n / most, rest / 4, rest % 4 / 2, rest % 2};  // tiles of most, 4, 2, 1
  const int64_t wide = count[0] + count[1], asking = wide - (wide > 0 ? 1 : 0);
  Ahead ahead{next, next ? next_bytes / 64 : 0, 0};
  if (asking > 0) ahead.per_k = (ahead.lines + asking * op.k - 1) / (asking * op.k);
  int64_t row = begin;
  bool first = true;
  const auto pass = [&](auto rows_constant) {
    constexpr int R = decltype(rows_constant)::value;
    if (first) {
      tile<R, Blocks, Kind, Out, R >= kStreamRows ? Asks::kStream : Asks::kNothing>(op, w, row,
                                                                                 block);
    } else if (R >= 4 && ahead.per_k > 0) {
      tile<R, Blocks, Kind, Out, Asks::kAhead>(op, w, row, block, &ahead);
    } else {
      tile<R, Blocks, Kind, Out>(op, w, row, block);
    }
    first = false;
    row += R;
  };
  using Most = std::integral_constant<int, most>;
  using Four = std::integral_constant<int, 4>;
  using Two = std::integral_constant<int, 2>;
  using One = std::integral_constant<int, 1>;
  if (count[0] > 0) {  // the first pass: the widest tile there is
    --count[0];
    pass(Most{});
  } else if (count[1] > 0) {
    --count[1];
    pass(Four{});
  } else if (count[2] > 0) {
    --count[2];
    pass(Two{});
  }
  for (; count[3]; --count[3]) pass(One{});
  for (; count[2]; --count[2]) pass(Two{});
  for (; count[1]; --count[1]) pass(Four{});
  for (; count[0]; --count[0]) pass(Most{});
}

// Blocks [begin, end) for rows [row, row_end), in pairs, a last odd one alone; w: block begin's
// weights, the others' after them. Each pair asks for the next one's weights; the last, for
// `after_bytes` at `after` (what the caller reads next, if anything).
template <typename Kind, typename Out>
void blocks(const Operands& op, const typename Kind::type* w, int64_t begin, int64_t end,
            int64_t row, int64_t row_end, const char* after = nullptr, int64_t after_bytes = 0) {
  const int64_t size = op.k * Kind::row, bytes = size * sizeof(typename Kind::type);
  if (op.up_blocks) {  // gate blocks [begin, end), each with its up block: two blocks a tile
    for (int64_t block = begin; block < end; ++block) {
      const bool last = block + 1 == end;
      const auto* w_block = w + (block - begin) * size;
      const auto* next = last ? after : reinterpret_cast<const char*>(w_block + size);
      rows<2, Kind, Out>(op, w_block, block, row, row_end, next, last ? after_bytes : bytes);
    }
    return;
  }
  int64_t block = begin;
  for (; block + 2 <= end; block += 2) {
    const bool last = block + 2 == end;
    const auto* next = last ? after : reinterpret_cast<const char*>(w + (block + 2 - begin) * size);
    const int64_t next_bytes = last ? after_bytes : (std::min(end, block + 4) - block - 2) * bytes;
    rows<2, Kind, Out>(op, w + (block - begin) * size, block, row, row_end, next, next_bytes);
  }
  if (block < end) {
    rows<1, Kind, Out>(op, w + (block - begin) * size, block, row, row_end, nullptr, 0);
  }
}

// Blocks [begin, end) of codes as the floats a tile multiplies by (scaled and offset where
// grouped: the very values the tile computes), into floats ([end - begin, k, 32]).
template <typename Kind>
void widen(const Operands& op, const typename Kind::type* w, int64_t begin, int64_t end,
           float* floats) {
  const int64_t groups = op.k / op.group;
  for (int64_t block = begin; block < end; ++block) {
    for (int64_t k = 0; k < op.k; ++k) {
      __m512 v[2];
      load_row(w + ((block - begin) * op.k + k) * Kind::row, v);
      float* into = floats + ((block - begin) * op.k + k) * kBlock;
      for (int half = 0; half < 2; ++half) {
        if constexpr (Kind::grouped) {
          const int64_t g = (block * groups + k / op.group) * kBlock + 16 * half;
          v[half] = _mm512_fmadd_ps(v[half], _mm512_loadu_ps(op.g_scale + g),
                                    _mm512_loadu_ps(op.g_zero + g));
        }
        _mm512_storeu_ps(into + 16 * half, v[half]);
      }
    }
  }
}

template <typename Kind, typename Out>
void multiply(const Operands& op, const typename Kind::type* w, int64_t count, int64_t n_rows) {
  const int64_t size = op.k * Kind::row;
  if (n_rows <= kRowChunk) {  // each thread its own run of blocks, read once
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      blocks<Kind, Out>(op, w + begin * size, begin, end, 0, n_rows);
    });
    return;
  }
  // Many rows: items of a block pair x a chunk of rows, a pair's chunks in a row, so that the
  // pair's weights are read from memory once and from cache for its other chunks. int8 codes are
  // widened once a pair and thread, so the tiles' inner loop is float32's. A thread runs the items
  // next() hands it (-1: none left); `end` bounds its run where the runs are split up front.
  // A pair: two adjacent blocks, or (silu_linear) a gate block and its up block.
  const int64_t span = op.up_blocks ? 1 : 2;
  const int64_t pairs = (count + span - 1) / span, chunks = (n_rows + kRowChunk - 1) / kRowChunk;
  const auto run = [&](const auto& next, int64_t end) {
    at::Tensor widened;  // 64-byte aligned, as the weights' tensor is: no load splits a line
    if constexpr (!std::is_same_v<Kind, Floats>) {
      widened = at::empty({2 * op.k * kBlock}, at::kFloat);
    }
    int64_t widened_pair = -1;
    for (int64_t item = next(); item >= 0; item = next()) {
      const int64_t pair = item / chunks, block = span * pair, row = (item % chunks) * kRowChunk;
      const int64_t last = std::min(block + span, count);
      const int64_t row_end = std::min(n_rows, row + kRowChunk);
      if constexpr (std::is_same_v<Kind, Floats>) {
        // Two chunks (49-96 rows): the next pair's weights asked for, half in each, where this
        // thread multiplies it next (0.92-0.94x the time at 64 rows). With more chunks the first
        // pass is a small share and asking measured no faster.
        const int64_t chunk = item % chunks, next_item = item - chunk + chunks;
        const int64_t next_bytes = (std::min(count, block + 4) - last) * size * sizeof(float);
        const int64_t half = next_bytes / 2 / 64 * 64;
        const bool asks = chunks == 2 && next_item < end && !op.up_blocks;
        const char* after = reinterpret_cast<const char*>(w + last * size) + chunk * half;
        const int64_t asked = asks ? (chunk ? next_bytes - half : half) : 0;
        blocks<Floats, Out>(op, w + block * size, block, last, row, row_end, after, asked);
      } else {
        float* floats = widened.data_ptr<float>();
        if (pair != widened_pair) widen<Kind>(op, w + block * size, block, last, floats);
        widened_pair = pair;
        blocks<Floats, Out>(op, floats, block, last, row, row_end);
      }
    }
  };
  if (chunks == 2) {  // split up front: the look-ahead needs to know this thread's next item
    at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
      int64_t item = begin;
      run([&] { return item < end ? item++ : int64_t{-1}; }, end);
    });
    return;
  }
  // Claimed as threads come free (claimed_items.h): a 4096-token float32 prefill of SmolLM2's
  // shape took 0.87-0.92x the time of runs split up front (interleaved, 2 threads), the same bits.
  baton::run_claimed(pairs * chunks, [&](const auto& claim) { run(claim, pairs * chunks); });
}

template <typename Out>
void multiply_by(const at::Tensor& packed, const Operands& op, int64_t n_rows) {
  const int64_t count = packed.size(0);
  if (packed.scalar_type() == at::kFloat) {
    multiply<Floats, Out>(op, packed.data_ptr<float>(), count, n_rows);
  } else if (packed.scalar_type() == at::kByte) {
    multiply<GroupNibbles, Out>(op, packed.data_ptr<uint8_t>(), count, n_rows);
  } else if (op.g_scale) {
    multiply<GroupCodes, Out>(op, packed.data_ptr<int8_t>(), count, n_rows);
  } else {
    multiply<Codes, Out>(op, packed.data_ptr<int8_t>(), count, n_rows);
  }
}

void check_operands(const at::Tensor& x, const at::Tensor& packed,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                    const std::optional<at::Tensor>& zero) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "blocked_linear: x must be a float32 or bfloat16 [rows, k] CPU tensor");
  const auto dtype = packed.scalar_type();
  const bool nibbles = dtype == at::kByte;
  TORCH_CHECK(packed.device().is_cpu() && packed.dim() == 3 && packed.is_contiguous() &&
                  (dtype == at::kFloat || dtype == at::kChar || nibbles) &&
                  packed.size(1) == x.size(1) && x.size(1) > 0 &&
                  packed.size(2) == (nibbles ? kBlock / 2 : kBlock),
              "blocked_linear: packed must be a contiguous float32 or int8 [n / 32, k > 0, 32] "
              "or uint8 (4-bit codes, two a byte) [n / 32, k > 0, 16] CPU tensor");
  const int64_t width = packed.size(0) * kBlock;
  const auto is_float = [](const at::Tensor& t, bool or_bfloat16) {
    const bool dtype = t.scalar_type() == at::kFloat ||
                       (or_bfloat16 && t.scalar_type() == at::kBFloat16);
    return t.device().is_cpu() && dtype && t.is_contiguous();
  };
  TORCH_CHECK(!bias || (is_float(*bias, true) && bias->numel() == width),
              "blocked_linear: bias must be a contiguous float32 or bfloat16 [n] CPU tensor");
  TORCH_CHECK(scale.has_value() == (dtype != at::kFloat),
              "blocked_linear: codes need a scale, float32 weights take none");
  TORCH_CHECK(!zero || scale, "blocked_linear: offsets need group scales");
  TORCH_CHECK(!nibbles || zero, "blocked_linear: 4-bit codes need group scales and offsets");
  if (!scale) return;
  if (!zero) {
    TORCH_CHECK(is_float(*scale, false) && scale->dim() == 1 && scale->numel() == width,
                "blocked_linear: a scale per column must be a contiguous float32 [n] CPU tensor");
    return;
  }
  const int64_t groups = scale->dim() == 3 ? scale->size(1) : 0;
  for (const at::Tensor* t : {&*scale, &*zero}) {
    TORCH_CHECK(is_float(*t, false) && t->dim() == 3 && t->size(0) == packed.size(0) &&
                    t->size(1) == groups && t->size(2) == kBlock,
                "blocked_linear: group scales and offsets must be contiguous float32 "
                "[n / 32, groups, 32] CPU tensors");
  }
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "blocked_linear: ", groups,
              " groups misfit k ", x.size(1));
}

}  // namespace

at::Tensor blocked_linear(const at::Tensor& x, const at::Tensor& packed,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& zero) {
  check_operands(x, packed, bias, scale, zero);
  const int64_t width = packed.size(0) * kBlock, n_rows = x.size(0), k = x.size(1);
  const at::Tensor input = x.to(at::kFloat).contiguous();  // bfloat16 rows widened once
  const std::optional<at::Tensor> plus = bias ? std::optional(bias->to(at::kFloat)) : std::nullopt;
  at::Tensor out = at::empty({n_rows, width}, x.options());
  const float* per_column = scale && !zero ? scale->data_ptr<float>() : nullptr;
  const float* g_scale = zero ? scale->data_ptr<float>() : nullptr;
  const float* g_zero = zero ? zero->data_ptr<float>() : nullptr;
  const int64_t group = zero ? k / scale->size(1) : k;
  const Operands op{input.data_ptr<float>(), per_column, g_scale, g_zero,
                    plus ? plus->data_ptr<float>() : nullptr, out.data_ptr(), k, width, group};
  if (x.scalar_type() == at::kFloat) {
    multiply_by<float>(packed, op, n_rows);
  } else {
    multiply_by<c10::BFloat16>(packed, op, n_rows);
  }
  return out;
}

at::Tensor blocked_silu_linear(const at::Tensor& x, const at::Tensor& packed) {
  check_operands(x, packed, std::nullopt, std::nullopt, std::nullopt);
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat &&
                  packed.size(0) % 2 == 0,
              "blocked_silu_linear: float32 x and weights, as many up blocks as gate blocks");
  const int64_t gate_blocks = packed.size(0) / 2, n_rows = x.size(0);
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty({n_rows, gate_blocks * kBlock}, x.options());
  const Operands op{input.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, out.data_ptr(),
                    x.size(1), gate_blocks * kBlock, x.size(1), gate_blocks};
  multiply<Floats, float>(op, packed.data_ptr<float>(), gate_blocks, n_rows);
  return out;
}

#endif  // __AVX512F__
