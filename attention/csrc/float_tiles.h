// Paged attention's prompt tiles for float32 pages on AVX-512 registers: a chunk of 32 query rows
// in two vectors, one row a lane, against the keys and values read where they lie.
//
// Why: the vector maths (wide_math.h) score one query row against 16 keys at a time, each key's
// dot product summed across lanes (a transposing tree per 16 keys), and weigh a row's values with
// at most a KV head's group of rows sharing each value vector: a 256-token prompt ran at ~150
// GFLOP/s on 2 threads of an Intel Xeon (AMX), a third of what its FMA units give. A prompt's rows
// against its keys are matrix products; here they run as such, with no sums across lanes:
// whole prompts of 256-1024 tokens in 0.57-0.64x the time on the small Llama's heads, 0.58-0.64x on
// SmolLM2's, 0.54-0.68x without grouping (benchmarks/bench_prompt_tiles.py; items sized by
// paged_attention.cpp's plan_tile_items).
//
// How, per KV head: its rows (tokens x the query heads sharing the KV head) in chunks of 32 (a
// last one of up to 16 in one vector), its keys in blocks (paged_attention.cpp's block_keys), all
// as lanes = rows:
// - queries: each chunk's rows laid out dim by dim, [dim][32 rows], scaled, once;
// - scores: S^T[key][rows] = sum over dims of k[dim] (one float broadcast) x that dim's query
//   lanes, eight keys at a time into both vectors (16 independent FMA chains, each broadcast and
//   query load serving two and eight FMAs);
// - softmax: a key's scores in a vector are 16 rows', so each row's largest score, its
//   exponentials and their sum are lane-wise maxima, exponentials and adds; keys a row does not
//   see (causal) weigh zero by mask;
// - values: O^T[dim][rows] += v[dim] (broadcast) x the key's weights, 8 dims at a time for both
//   vectors; the running max / sum / output rescaled as in the vector maths (an online softmax);
// - finish: each row's dims back out of the lanes, divided by its sum.
// Rows are independent (a row's lane never mixes with another's); a chunk's lanes past its rows
// repeat its last row, so every lane sees at least one key and no lane divides zero by zero.
// Which path a token takes depends on its item (paged_attention.cpp sends items of fewer than 16
// rows to the vector maths), so its bits may differ when the same prompt is prefilled in other
// chunks; both are float32 attention, near naive attention.
#pragma once

#include <cstdint>
#include <vector>

#include "paged_inputs.h"
#include "wide_math.h"

#if defined(__AVX512F__)
#define BATON_FLOAT_TILES 1

#include <immintrin.h>

#include <algorithm>
#include <limits>

namespace baton {

class FloatTiles {
 public:
  static constexpr int64_t kTile = 16;       // rows a vector: one a lane
  static constexpr int64_t kMaxVectors = 2;  // vectors of rows a chunk
  static constexpr int64_t kKeys = 8;        // keys scored at once

  static bool fits(int64_t head_dim, int64_t /*page_size: any*/) { return head_dim % kTile == 0; }

  // Rows of a whole chunk, and the most new tokens of a request a work item takes
  // (paged_attention.cpp's plan_tile_items): a chunk of 16 rows scores and weighs one vector a
  // broadcast and costs a pass over each block's keys of its own, so items are sized for whole
  // chunks where they can be.
  static constexpr int64_t kChunkRows = kMaxVectors * kTile;
  static constexpr int64_t kMostItemTokens = 128;

  // A thread's tile state: registers need none claimed (AMX tiles do: amx_attention.h).
  static void claim() {}
  static void release() {}

  FloatTiles(const PagedInputs<float>& in, int64_t block_keys)
      : in_(in), dim_(in.head_dim), block_(round_up(block_keys, kKeys)) {
    keys_.resize(block_);
    values_.resize(block_);
    scores_.resize(block_ * kMaxVectors * kTile);
  }

  // Each KV head's rows in chunks of 32 (a last one of up to 16 in one vector), block by block
  // of keys: a block's K and V rows are located once for all the chunks that see it.
  void attend(const WorkItem& item) {
    const int64_t rows = item.num_tokens * in_.group, chunk_rows = kMaxVectors * kTile;
    chunks_.resize((rows + chunk_rows - 1) / chunk_rows);
    // Row r sees keys < first_limit + r / group + 1; the last row sees num_keys.
    const int64_t first_limit = in_.first_limit(item);
    const int64_t num_keys = first_limit + item.num_tokens;
    for (int64_t head = item.first_head; head < item.last_head; ++head) {
      for (size_t c = 0; c < chunks_.size(); ++c) {
        const int64_t row0 = c * chunk_rows;
        start_chunk(chunks_[c], item, head, row0, std::min(chunk_rows, rows - row0),
                    first_limit);
      }
      for (int64_t start = 0; start < num_keys; start += block_) {
        const int64_t len = std::min(block_, num_keys - start);
        locate(item.request, head, start, len);
        for (Chunk& chunk : chunks_) {
          // The keys of the block the chunk's last row sees (rows see more as they go).
          const int64_t seen = std::min(len, chunk.limit[chunk.count - 1] - start);
          if (seen <= 0) continue;
          if (chunk.vectors == 2) {
            attend_block<2>(chunk, start, seen);
          } else {
            attend_block<1>(chunk, start, seen);
          }
        }
      }
      for (const Chunk& chunk : chunks_) finish_chunk(chunk, item, head);
    }
  }

 private:
  // Up to 32 rows of one KV head in `vectors` vectors of 16 lanes, lane n its row row0 + n
  // (lanes past count repeat the last row): the keys each lane sees (< limit), its queries and
  // weighted values dim by dim, and its online softmax's state.
  struct Chunk {
    int64_t row0 = 0, count = 0, vectors = 1;
    alignas(64) int32_t limit[kMaxVectors * kTile];
    alignas(64) float max[kMaxVectors * kTile];
    alignas(64) float sum[kMaxVectors * kTile];
    std::vector<float> queries;  // [dim][vectors * 16]: scaled
    std::vector<float> sums;     // [dim][vectors * 16]: the weighted values so far
  };

  static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

  void start_chunk(Chunk& chunk, const WorkItem& item, int64_t head, int64_t row0, int64_t count,
                   int64_t first_limit) {
    chunk.row0 = row0;
    chunk.count = count;
    chunk.vectors = (count + kTile - 1) / kTile;
    const int64_t lanes = chunk.vectors * kTile;
    chunk.queries.resize(dim_ * lanes);
    chunk.sums.assign(dim_ * lanes, 0.0f);
    const float scale = static_cast<float>(in_.scale);
    for (int64_t n = 0; n < lanes; ++n) {
      const int64_t row = row0 + std::min(n, count - 1);
      chunk.limit[n] = static_cast<int32_t>(first_limit + row / in_.group + 1);
      chunk.max[n] = -std::numeric_limits<float>::infinity();
      chunk.sum[n] = 0.0f;
      const float* query = in_.query_row(item, head, row);
      for (int64_t d = 0; d < dim_; ++d) chunk.queries[d * lanes + n] = query[d] * scale;
    }
  }

  // keys_[j] and values_[j]: where key start + j's K and V rows of the head lie, j < len; past
  // len up to whole groups of eight, key start's (scored, never weighed).
  void locate(int64_t b, int64_t head, int64_t start, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
      keys_[j] = in_.at(in_.key_cache, b, start + j, head);
      values_[j] = in_.at(in_.value_cache, b, start + j, head);
    }
    std::fill(keys_.begin() + len, keys_.begin() + round_up(len, kKeys), keys_[0]);
  }

  // The chunk's rows against the block's first `seen` keys: their scores, the online softmax
  // over them, the weighted values.
  template <int V>
  void attend_block(Chunk& chunk, int64_t start, int64_t seen) {
    score_block<V>(chunk, seen);
    __m512 correction[V];
    for (int v = 0; v < V; ++v) correction[v] = weigh<V>(chunk, v, start, seen);
    weigh_values<V>(chunk, correction, seen);
  }

  // scores_[j][lane] = q_lane . k_(start + j) for the block's first `seen` keys (rounded up to
  // eight), eight keys at a time.
  template <int V>
  void score_block(const Chunk& chunk, int64_t seen) {
    for (int64_t j = 0; j < seen; j += kKeys) {
      score_keys<V>(keys_.data() + j, chunk.queries.data(), dim_, scores_.data() + j * V * kTile);
    }
  }

  // Eight keys' scores (k: their rows) against V vectors of rows, over every dim: each key's dim
  // broadcast once for all V vectors (V = 2 ran 1.3x the FMAs a second of V = 1 on one core of an
  // Intel Xeon). Its own function, never inlined: inlined into attend, GCC 12 stored the eight
  // accumulators of V = 1 to the stack on every dim (eight stores per eight FMAs); alone, they
  // stay in registers (a whole SmolLM2-shaped prompt of 512-2000 tokens: 0.90x the time).
  template <int V>
  __attribute__((noinline)) static void score_keys(const float* const* k, const float* queries,
                                                   int64_t dims, float* scores) {
    __m512 acc[V][kKeys];
    for (int v = 0; v < V; ++v) {
      for (int64_t i = 0; i < kKeys; ++i) acc[v][i] = _mm512_setzero_ps();
    }
    for (int64_t d = 0; d < dims; ++d) {
      __m512 q[V];
      for (int v = 0; v < V; ++v) q[v] = _mm512_loadu_ps(queries + (d * V + v) * kTile);
      for (int64_t i = 0; i < kKeys; ++i) {
        const __m512 key = _mm512_set1_ps(k[i][d]);
        for (int v = 0; v < V; ++v) acc[v][i] = _mm512_fmadd_ps(key, q[v], acc[v][i]);
      }
    }
    for (int64_t i = 0; i < kKeys; ++i) {
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(scores + (i * V + v) * kTile, acc[v][i]);
    }
  }

  // Vector v's online softmax over the block's first `seen` keys: its weights into scores_ (zero
  // where a lane's row does not see the key); returns how much its earlier sums shrink.
  template <int V>
  __m512 weigh(Chunk& chunk, int v, int64_t start, int64_t seen) {
    const __m512i limits = _mm512_load_si512(chunk.limit + v * kTile);
    auto visible = [&](int64_t j) {  // the lanes whose rows see key start + j
      return _mm512_cmpgt_epi32_mask(limits, _mm512_set1_epi32(static_cast<int32_t>(start + j)));
    };
    auto score = [&](int64_t j) { return scores_.data() + (j * V + v) * kTile; };
    __m512 block_max = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < seen; ++j) {
      block_max = _mm512_mask_max_ps(block_max, visible(j), block_max, _mm512_loadu_ps(score(j)));
    }
    float* max = chunk.max + v * kTile;
    float* sum = chunk.sum + v * kTile;
    const __m512 old_max = _mm512_load_ps(max);
    const __m512 new_max = _mm512_max_ps(old_max, block_max);
    // A lane's first block: its old max is -inf, the correction exp(-87) (exp_wide clamps), and
    // what it scales is zero.
    const __m512 correction = (__m512)exp_wide((vwide)_mm512_sub_ps(old_max, new_max));
    __m512 block_sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < seen; ++j) {
      const vwide e = exp_wide((vwide)_mm512_sub_ps(_mm512_loadu_ps(score(j)), new_max));
      const __m512 weight = _mm512_maskz_mov_ps(visible(j), (__m512)e);
      _mm512_storeu_ps(score(j), weight);
      block_sum = _mm512_add_ps(block_sum, weight);
    }
    _mm512_store_ps(sum, _mm512_fmadd_ps(_mm512_load_ps(sum), correction, block_sum));
    _mm512_store_ps(max, new_max);
    return correction;
  }

  // sums[dim] = sums[dim] * correction + sum_j weight_j v_j[dim], 16 / V dims at a time (sixteen
  // independent FMA chains; each value broadcast once for all V vectors of weights).
  template <int V>
  void weigh_values(Chunk& chunk, const __m512* correction, int64_t seen) {
    constexpr int64_t dims = kTile / V;
    for (int64_t d0 = 0; d0 < dim_; d0 += dims) {
      __m512 acc[V][dims];
      for (int v = 0; v < V; ++v) {
        for (int64_t i = 0; i < dims; ++i) acc[v][i] = _mm512_setzero_ps();
      }
      for (int64_t j = 0; j < seen; ++j) {
        const float* weights = scores_.data() + j * V * kTile;
        __m512 weight[V];
        for (int v = 0; v < V; ++v) weight[v] = _mm512_loadu_ps(weights + v * kTile);
        const float* value = values_[j] + d0;
        // value's dims at fixed offsets from one register: left alone, GCC kept the offsets
        // (d0 + i) in registers of their own, ran out and moved them through vector registers.
        asm("" : "+r"(value));
        for (int64_t i = 0; i < dims; ++i) {
          const __m512 x = _mm512_set1_ps(value[i]);
          for (int v = 0; v < V; ++v) acc[v][i] = _mm512_fmadd_ps(x, weight[v], acc[v][i]);
        }
      }
      for (int64_t i = 0; i < dims; ++i) {
        for (int v = 0; v < V; ++v) {
          float* at = chunk.sums.data() + ((d0 + i) * V + v) * kTile;
          _mm512_storeu_ps(at, _mm512_fmadd_ps(_mm512_loadu_ps(at), correction[v], acc[v][i]));
        }
      }
    }
  }

  void finish_chunk(const Chunk& chunk, const WorkItem& item, int64_t head) const {
    const int64_t lanes = chunk.vectors * kTile;
    for (int64_t n = 0; n < chunk.count; ++n) {
      float* dst = in_.out_row(item, head, chunk.row0 + n);
      const float inverse = 1.0f / chunk.sum[n];
      for (int64_t d = 0; d < dim_; ++d) dst[d] = chunk.sums[d * lanes + n] * inverse;
    }
  }

  const PagedInputs<float>& in_;
  const int64_t dim_, block_;
  std::vector<Chunk> chunks_;
  std::vector<const float*> keys_, values_;
  std::vector<float> scores_;
};

}  // namespace baton
#endif
