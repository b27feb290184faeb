// Paged attention's prompt tiles on Intel AMX tiles, for bfloat16 pages: the scores and the
// weighted values as tile multiplies, the softmax in 16-lane vectors between them.
//
// Why: the vector maths (wide_math.h) score one query row against one key at a time, and a
// prompt's rows against its keys are matrix products. Above 4096 (query, key) pairs a request went
// to torch's flash attention (paged_attention.cpp's by_torch), its context gathered from the pages
// first; below, the vector maths ran. On tiles (2 threads, SmolLM2's 9/3 heads of 64): a tile of 16
// new tokens after 160 cached in 0.55x the vector maths' time, whole prompts of 128-1024 tokens in
// 0.66-0.96x torch's, chunks after cached tokens 0.80-0.90x at every size tried; the bench
// workload's 128 prompts of 16-256 tokens prefilled in 0.90x the time. Decode rows stay on the
// vector maths: their 3 rows a KV head ran 1.3x its time on tiles, waiting on K and V as much as
// it does, with the per-chunk work added.
//
// How, per KV head: its rows (tokens x the query heads sharing the KV head) in chunks of 16, and
// its keys in blocks (paged_attention.cpp's, rounded up to 32 keys: 256 on pages of 16 or 32):
// - keys: loaded from the pages as they lie, K being in pairs of dims there (key_pairs.h: the
//   right operand's layout, 16 keys' pairs side by side); scores of keys past the block are
//   never read;
// - values: V's keys interleaved in pairs (the right operand's layout), 16 dims to a tile, laid
//   out once a block for all the chunks that see it; keys past the block zero, as a zero weight
//   times a stale NaN would be NaN;
// - scores: S = Q K^T, the chunk's query rows (left) against four tiles of keys at once;
// - softmax: each row's largest score, its exponentials and their sum in float, the running max /
//   sum / output rescaled as in the vector maths (an online softmax); the weights are then rounded
//   to bfloat16 (as torch's flash attention rounds its second product's operand), keys a row does
//   not see weighing zero;
// - values: O += P V, four 16-dim slices at once.
//
// On tiles, rows are independent: a row's result does not depend on the other rows of its chunk
// or call. Which path a token takes does depend on its item (paged_attention.cpp sends items of
// fewer than 16 rows to the vector maths), so a prompt's last tokens may take other bits when
// the same prompt is prefilled in other chunks.
// Built where the compiler targets AMX-BF16 (-march=native on such a CPU); used once Linux grants
// the process its tile state (amx_tiles_granted).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "paged_inputs.h"
#include "wide_math.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define BATON_AMX_ATTENTION 1

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace baton {

class AmxAttention {
 public:
  using bf16 = c10::BFloat16;
  static constexpr int64_t kTile = 16;   // keys of a score tile; query rows of a chunk
  static constexpr int64_t kPairs = 32;  // dims a score multiply covers; keys a values one covers

  // Rows of a chunk, and the most new tokens of a request a work item takes on a long context
  // (paged_attention.cpp's plan_tile_items): a block's values are laid out once for all of an
  // item's chunks. Against items of 16 tokens, 2 threads: whole prompts of 512-1024 tokens
  // 0.91-0.94x the time, 256 new after 1024 cached 0.91x (items of 128: no better, 1.05x at 2000).
  static constexpr int64_t kChunkRows = kTile;
  static constexpr int64_t kMostItemTokens = 64;

  static bool fits(int64_t head_dim, int64_t page_size) {
    return head_dim % kPairs == 0 && page_size % kTile == 0 && amx_tiles_granted();
  }

  // A thread's tile state: its configuration loaded before its first multiply, and given back
  // after its last, so that context switches no longer save it.
  static void claim() { configure_tiles(); }
  static void release() { _tile_release(); }

  // Tiles (amx_tiles.h's configure_tiles: each 16 rows of 64 bytes): 3-6 the sums of up to four
  // multiplies at a time (four tiles of keys for the scores, four 16-dim slices for the values);
  // for the scores 2 the queries (left), 0, 1 and 7 the keys (right); for the values 7 the weights
  // (left), 0-2 the values (right).

  AmxAttention(const PagedInputs<bf16>& in, int64_t block_keys)
      : in_(in), dim_(in.head_dim), block_(round_up(block_keys, kPairs)), slices_(dim_ / kTile) {
    key_tiles_.resize(block_ / kTile);
    scores_.resize(kTile * block_);
    weights_.resize(kTile * block_);
    values_.resize(block_ / kPairs * slices_ * kTile * kPairs);
    block_sums_.resize(kTile * dim_);
  }

  // Each KV head's rows in chunks of 16, block by block of keys: a block's values are laid out
  // once for all the chunks that see it.
  void attend(const WorkItem& item) {
    const int64_t rows = item.num_tokens * in_.group;
    chunks_.resize((rows + kTile - 1) / kTile);
    // Row r sees keys < first_limit + r / group + 1; the last row sees num_keys.
    const int64_t first_limit = in_.first_limit(item);
    const int64_t num_keys = first_limit + item.num_tokens;
    for (int64_t head = item.first_head; head < item.last_head; ++head) {
      for (size_t c = 0; c < chunks_.size(); ++c) {
        const int64_t row0 = c * kTile;
        start_chunk(chunks_[c], item, head, row0, std::min(kTile, rows - row0), first_limit);
      }
      for (int64_t start = 0; start < num_keys; start += block_) {
        const int64_t len = std::min(block_, num_keys - start);
        locate_keys(item.request, head, start, len);
        lay_out_values(item.request, head, start, len);
        for (Chunk& chunk : chunks_) {
          // The keys of the block the chunk's last row sees (rows see more as they go).
          const int64_t seen = std::min(len, chunk.limit[chunk.count - 1] - start);
          if (seen <= 0) continue;
          score_block(seen, chunk);
          attend_block(chunk, start, seen);
        }
      }
      for (const Chunk& chunk : chunks_) finish_chunk(chunk, item, head);
    }
  }

 private:
  // A chunk of up to 16 rows of one KV head: its query rows side by side (rows past count zero:
  // the left operand of the score multiplies), the keys each row sees (< limit), and its online
  // softmax's state.
  struct Chunk {
    int64_t row0 = 0, count = 0;
    int64_t limit[kTile];
    float max[kTile], sum[kTile];
    std::vector<bf16> queries;
    std::vector<float> sums;  // [row][dim]: the weighted values so far
  };

  static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

  // Sum tiles 3 .. 3 + n - 1 (n <= 4) zeroed; stored side by side, 16 floats apart, rows
  // `stride` bytes apart. (Tile numbers are immediates, hence the ladder.)
  static void zero_sums(int64_t n) {
    _tile_zero(3);
    if (n > 1) _tile_zero(4);
    if (n > 2) _tile_zero(5);
    if (n > 3) _tile_zero(6);
  }

  static void store_sums(int64_t n, float* out, int64_t stride) {
    _tile_stored(3, out, stride);
    if (n > 1) _tile_stored(4, out + kTile, stride);
    if (n > 2) _tile_stored(5, out + 2 * kTile, stride);
    if (n > 3) _tile_stored(6, out + 3 * kTile, stride);
  }

  // The first n of 16 lanes (none for n <= 0, all for n >= 16).
  static __mmask16 first_lanes(int64_t n) {
    return static_cast<__mmask16>((1u << std::clamp<int64_t>(n, 0, kTile)) - 1);
  }

  void start_chunk(Chunk& chunk, const WorkItem& item, int64_t head, int64_t row0, int64_t count,
                   int64_t first_limit) {
    chunk.row0 = row0;
    chunk.count = count;
    for (int64_t n = 0; n < count; ++n) chunk.limit[n] = first_limit + (row0 + n) / in_.group + 1;
    std::fill(chunk.max, chunk.max + kTile, -std::numeric_limits<float>::infinity());
    std::fill(chunk.sum, chunk.sum + kTile, 0.0f);
    chunk.sums.assign(kTile * dim_, 0.0f);
    lay_out_queries(chunk, item, head);
  }

  // The chunk's rows against the block's first `seen` keys (from start), its scores in scores_.
  void attend_block(Chunk& chunk, int64_t start, int64_t seen) {
    float correction[kTile];
    for (int64_t n = 0; n < chunk.count; ++n) {
      correction[n] = weigh_row(chunk, n, std::clamp<int64_t>(chunk.limit[n] - start, 0, seen),
                                seen);
    }
    weigh_values(round_up(seen, kPairs));
    for (int64_t n = 0; n < chunk.count; ++n) {
      float* sums = chunk.sums.data() + n * dim_;
      const float* block = block_sums_.data() + n * dim_;
      for (int64_t d = 0; d < dim_; d += kTile) {
        store_wide(sums + d, load_wide(sums + d) * correction[n] + load_wide(block + d));
      }
    }
  }

  void finish_chunk(const Chunk& chunk, const WorkItem& item, int64_t head) const {
    for (int64_t n = 0; n < chunk.count; ++n) {
      bf16* dst = in_.out_row(item, head, chunk.row0 + n);
      const float inverse = 1.0f / chunk.sum[n];
      for (int64_t d = 0; d < dim_; d += kTile) {
        store_wide(dst + d, load_wide(chunk.sums.data() + n * dim_ + d) * inverse);
      }
    }
  }

  void lay_out_queries(Chunk& chunk, const WorkItem& item, int64_t head) {
    chunk.queries.assign(kTile * dim_, bf16(0));
    for (int64_t n = 0; n < chunk.count; ++n) {
      std::memcpy(chunk.queries.data() + n * dim_, in_.query_row(item, head, chunk.row0 + n),
                  dim_ * sizeof(bf16));
    }
  }

  // key_tiles_[tile] = where the pairs of the block's keys 16 tile .. 16 tile + 15 start in their
  // page (a page holds whole tiles: fits). (Asking for the next block's K and this block's V
  // ahead, as the vector maths do, changed nothing measurable here: 0.97-1.02x.)
  void locate_keys(int64_t b, int64_t head, int64_t start, int64_t len) {
    for (int64_t key = 0; key < len; key += kTile) {
      const int64_t position = start + key;
      const int32_t page = in_.block_table[b * in_.table_stride + position / in_.page_size];
      key_tiles_[key / kTile] = in_.key_head(page, head) + 2 * (position % in_.page_size);
    }
  }

  // scores_[row][j] = q_row . k_(start + j) (unscaled) for the block's first `chunk_seen` keys
  // (those its last row sees) and the chunk's rows, four tiles of 16 keys at a time: tiles are
  // not renamed, so one sum tile reused tile after tile waited on each store (the store alone was
  // 11% of a 2048-token prompt's time).
  void score_block(int64_t chunk_seen, const Chunk& chunk) {
    const int64_t steps = dim_ / kPairs, tiles = (chunk_seen + kTile - 1) / kTile;
    const int64_t q_stride = dim_ * sizeof(bf16), out_stride = block_ * sizeof(float);
    // A step's 16 pairs of dims for a tile's keys: rows a page's pair rows apart.
    const int64_t pair_row = 2 * in_.page_size, k_stride = pair_row * sizeof(bf16);
    const auto keys = [&](int64_t tile, int64_t step) {
      return key_tiles_[tile] + step * kTile * pair_row;
    };
    for (int64_t t = 0; t < tiles; t += 4) {
      const int64_t n = std::min<int64_t>(4, tiles - t);
      zero_sums(n);
      for (int64_t step = 0; step < steps; ++step) {
        _tile_loadd(2, chunk.queries.data() + step * kPairs, q_stride);
        _tile_loadd(0, keys(t, step), k_stride);
        _tile_dpbf16ps(3, 2, 0);
        if (n > 1) {
          _tile_loadd(1, keys(t + 1, step), k_stride);
          _tile_dpbf16ps(4, 2, 1);
        }
        if (n > 2) {
          _tile_loadd(7, keys(t + 2, step), k_stride);
          _tile_dpbf16ps(5, 2, 7);
        }
        if (n > 3) {
          _tile_loadd(0, keys(t + 3, step), k_stride);
          _tile_dpbf16ps(6, 2, 0);
        }
      }
      store_sums(n, scores_.data() + t * kTile, out_stride);
    }
  }

  // Row n's online softmax over the `seen` keys of the block it sees, its scores scaled first:
  // its weights into weights_ as bfloat16 for the chunk's keys (zero past seen); returns how much
  // its earlier sums shrink. Rows of weights_ past the chunk's count hold whatever an earlier
  // chunk left: their results are not read, and rows do not mix.
  float weigh_row(Chunk& chunk, int64_t n, int64_t seen, int64_t chunk_seen) {
    bf16* weights = weights_.data() + n * block_;
    if (seen == 0) {
      std::fill(weights, weights + round_up(chunk_seen, kPairs), bf16(0));
      return 1.0f;
    }
    float* score = scores_.data() + n * block_;
    const __m512 scale = _mm512_set1_ps(static_cast<float>(in_.scale));
    __m512 lanes = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < seen; j += kTile) {
      const __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(score + j), scale);
      _mm512_storeu_ps(score + j, scaled);
      lanes = _mm512_mask_max_ps(lanes, first_lanes(seen - j), lanes, scaled);
    }
    const float block_max = _mm512_reduce_max_ps(lanes);
    const float new_max = std::max(chunk.max[n], block_max);
    const float correction = std::exp(chunk.max[n] - new_max);
    chunk.sum[n] = chunk.sum[n] * correction + WideMath<bf16>::exp_sum(score, seen, new_max);
    chunk.max[n] = new_max;
    for (int64_t j = 0; j < round_up(chunk_seen, kPairs); j += kTile) {
      store_wide(weights + j, (vwide)_mm512_maskz_loadu_ps(first_lanes(seen - j), score + j));
    }
    return correction;
  }

  // values_[pair block][slice][pair][32] = keys 2 pair and 2 pair + 1 of 32-key group `pair
  // block` interleaved over the slice's 16 dims: the right operand of a values multiply. Keys past
  // len are zeros.
  void lay_out_values(int64_t b, int64_t head, int64_t start, int64_t len) {
    const __m512i low = pair_index(0), high = pair_index(kTile);
    for (int64_t j = 0; j < round_up(len, kPairs); j += 2) {
      const bf16* first = j < len ? in_.at(in_.value_cache, b, start + j, head) : nullptr;
      const bf16* second = j + 1 < len ? first + in_.slot_stride : nullptr;
      bf16* row = values_.data() + ((j / kPairs * slices_) * kTile + j % kPairs / 2) * kPairs;
      for (int64_t d = 0; d < dim_; d += kPairs) {
        const __m512i a = first ? _mm512_loadu_si512(first + d) : _mm512_setzero_si512();
        const __m512i c = second ? _mm512_loadu_si512(second + d) : _mm512_setzero_si512();
        bf16* slice = row + (d / kTile) * kTile * kPairs;
        _mm512_storeu_si512(slice, _mm512_permutex2var_epi16(a, low, c));
        _mm512_storeu_si512(slice + kTile * kPairs, _mm512_permutex2var_epi16(a, high, c));
      }
    }
  }

  // Lanes 2i and 2i + 1: element first + i of the first and of the second vector.
  static __m512i pair_index(int first) {
    alignas(64) uint16_t index[32];
    for (int i = 0; i < 16; ++i) {
      index[2 * i] = static_cast<uint16_t>(first + i);
      index[2 * i + 1] = static_cast<uint16_t>(32 + first + i);
    }
    return _mm512_load_si512(index);
  }

  // block_sums_ = weights_ values_ over `keys` (a multiple of 32) keys, four 16-dim slices at a
  // time.
  void weigh_values(int64_t keys) {
    for (int64_t slice = 0; slice < slices_; slice += 4) {
      const int64_t n = std::min<int64_t>(4, slices_ - slice);
      zero_sums(n);
      for (int64_t key = 0; key < keys; key += kPairs) {
        _tile_loadd(7, weights_.data() + key, block_ * sizeof(bf16));
        const bf16* values = values_.data() + (key / kPairs * slices_ + slice) * kTile * kPairs;
        constexpr int64_t kSlice = kTile * kPairs, kRow = 64;
        // Each slice's values in a tile of its own, as the scores' are.
        _tile_loadd(0, values, kRow);
        _tile_dpbf16ps(3, 7, 0);
        if (n > 1) {
          _tile_loadd(1, values + kSlice, kRow);
          _tile_dpbf16ps(4, 7, 1);
        }
        if (n > 2) {
          _tile_loadd(2, values + 2 * kSlice, kRow);
          _tile_dpbf16ps(5, 7, 2);
        }
        if (n > 3) {
          _tile_loadd(0, values + 3 * kSlice, kRow);
          _tile_dpbf16ps(6, 7, 0);
        }
      }
      store_sums(n, block_sums_.data() + slice * kTile, dim_ * sizeof(float));
    }
  }

  const PagedInputs<bf16>& in_;
  const int64_t dim_, block_, slices_;
  std::vector<Chunk> chunks_;
  std::vector<const bf16*> key_tiles_;
  std::vector<bf16> weights_, values_;
  std::vector<float> scores_, block_sums_;
};

}  // namespace baton
#endif
