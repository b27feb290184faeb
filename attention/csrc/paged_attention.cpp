// Paged attention that reads K/V pages where they lie, and the write of a step's new K/V into
// its pages: the ``cpu_paged`` backend's two calls per layer.
//
// Built on first use by attention/cpu_extension.py and cached per machine. Templated
// over float, double and bfloat16, accumulating in at::opmath_type (float for float and bfloat16,
// double for double), so the float64 exactness tests run the same kernel as float32 serving.
// Parallel loops go through at::parallel_for: torch's own thread pool, torch.set_num_threads.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scaled_dot_product_attention.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "amx_attention.h"
#include "claimed_items.h"
#include "cpu_common.h"
#include "float_tiles.h"
#include "paged_inputs.h"
#include "wide_math.h"

using namespace baton;

namespace {

constexpr int64_t kQueryTile = 16;  // new tokens of one request a work item (tiles: at least)
constexpr int64_t kPrefetchPages = 2;  // how far ahead of the page being read its K/V is asked for
// Keys per softmax update, in whole pages (at least one): a block's K, then its V, stay in cache
// (L2) between the two passes, and its scores fit the per-thread scratch. (The tiles round it up
// to 32 keys: amx_attention.h.) 256 against 128 (SmolLM2's 9/3 heads of 64, bfloat16, 2 threads,
// interleaved): B=32 decode steps at contexts 160-400 0.975-0.987x the time; on tiles, 16 new
// tokens a request after 160 cached 0.865x, whole prompts of 256 0.936x, 64 after 436 0.925x;
// 512 did no better.
constexpr int64_t kBlockKeys = 256;

int64_t block_keys(int64_t page_size) {
  return std::max<int64_t>(1, kBlockKeys / page_size) * page_size;
}

// Whether a prompt's items run on tiles where they fit: bfloat16 ones on AMX tiles where the CPU
// has them (amx_attention.h), float32 ones on AVX-512 register tiles (float_tiles.h); the vector
// maths otherwise. A switch for the tests and benchmarks that compare the two.
std::atomic<bool> prompt_tiles_enabled{true};

// ---- Per-row math: scores, softmax weights, weighted values -------------------------------------
// Three implementations with one interface. ScalarMath is plain loops for any dtype and head size
// (float64 exactness runs here); VectorMath uses cpu_common.h's 8-lane float vectors for float
// and bfloat16 with head_dim % 8 == 0; WideMath (wide_math.h) 16-lane ones where the head size
// allows, which every common model's does. ``load_query`` gives a query row in the form the scores
// read; ``view`` hands the math one page's K or V of one head in the type it reads: VectorMath
// widens bfloat16 pages into float scratch once per page and head, so the rows of a query group
// (and both passes over the page) never convert a value twice. bfloat16 keys lie in pairs of dims
// (key_pairs.h): WideMath reads them so (``kReadsKeyPairs``), the others get them unpaired
// (``keys_view``).

template <typename scalar_t, typename acc_type>
struct ScalarMath {
  using acc_t = acc_type;
  using kv_t = scalar_t;
  using query_t = acc_t;
  static constexpr bool kReadsKeyPairs = false;  // keys in pairs come unpaired (keys_view)
  static bool fits(int64_t) { return true; }

  // The query row as the scores read it: widened and scaled.
  static void load_query(query_t* dst, const scalar_t* src, int64_t dim, double scale) {
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<acc_t>(src[d]) * scale;
  }

  // The page's n rows of one head as they lie (`stride` elements apart).
  static const kv_t* view(const scalar_t* page, int64_t, int64_t stride, int64_t, kv_t*,
                          int64_t& view_stride) {
    view_stride = stride;
    return page;
  }

  // score[j] = q . k_j for n keys (keys `stride` elements apart).
  static void scores(acc_t* score, const acc_t* q, const kv_t* k, int64_t n, int64_t stride,
                     int64_t dim) {
    for (int64_t j = 0; j < n; ++j, k += stride) {
      acc_t sum = 0;
      for (int64_t d = 0; d < dim; ++d) sum += q[d] * static_cast<acc_t>(k[d]);
      score[j] = sum;
    }
  }

  // score[j] = exp(score[j] - shift); returns their sum.
  static acc_t exp_sum(acc_t* score, int64_t n, acc_t shift) {
    acc_t sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += (score[j] = std::exp(score[j] - shift));
    return sum;
  }

  static void rescale(acc_t* acc, acc_t correction, int64_t dim) {
    for (int64_t d = 0; d < dim; ++d) acc[d] *= correction;
  }

  // acc += sum_j p[j] v_j.
  static void accumulate(acc_t* acc, const acc_t* p, const kv_t* v, int64_t n, int64_t stride,
                         int64_t dim) {
    for (int64_t j = 0; j < n; ++j, v += stride) {
      for (int64_t d = 0; d < dim; ++d) acc[d] += p[j] * static_cast<acc_t>(v[d]);
    }
  }

  // dst = acc * inverse, one finished row.
  static void finish(scalar_t* dst, const acc_t* acc, acc_t inverse, int64_t dim) {
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(acc[d] * inverse);
  }
};

// The sums of eight vectors' lanes, sum i in lane i: a transposing tree of pairwise adds, 7
// shuffle-and-add steps for all eight where a horizontal sum each takes 3 (24).
inline vfloat sum_each(vfloat a0, vfloat a1, vfloat a2, vfloat a3, vfloat a4, vfloat a5,
                       vfloat a6, vfloat a7) {
  auto pairs = [](vfloat x, vfloat y) {  // lanes (x0+x1, y0+y1, x2+x3, y2+y3, ...)
    return __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  };
  auto quads = [](vfloat x, vfloat y) {  // pairs of pairs: (x01, x23 ...) -> sums of four
    return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  };
  const vfloat q0 = quads(pairs(a0, a1), pairs(a2, a3));  // a0..a3 over lanes 0-3, then 4-7
  const vfloat q1 = quads(pairs(a4, a5), pairs(a6, a7));
  return __builtin_shufflevector(q0, q1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(q0, q1, 4, 5, 6, 7, 12, 13, 14, 15);
}

template <typename scalar_t>
struct VectorMath {
  using acc_t = float;
  using kv_t = float;
  using query_t = float;
  static constexpr bool kReadsKeyPairs = false;
  static bool fits(int64_t dim) { return dim % kLanes == 0; }

  static void load_query(float* dst, const scalar_t* src, int64_t dim, double scale) {
    ScalarMath<scalar_t, float>::load_query(dst, src, dim, scale);
  }

  static void finish(scalar_t* dst, const float* acc, float inverse, int64_t dim) {
    ScalarMath<scalar_t, float>::finish(dst, acc, inverse, dim);
  }

  static const float* view(const scalar_t* page, int64_t n, int64_t stride, int64_t dim,
                           float* scratch, int64_t& view_stride) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      view_stride = stride;
      return page;
    } else {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t d = 0; d < dim; d += kLanes) {
          const vfloat v = load(page + j * stride + d);
          std::memcpy(scratch + j * dim + d, &v, sizeof v);
        }
      }
      view_stride = dim;
      return scratch;
    }
  }

  // Eight keys at a time, their sums gathered into one vector (sum_each); the rest one by one.
  static void scores(float* score, const float* q, const float* k, int64_t n, int64_t stride,
                     int64_t dim) {
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes, k += kLanes * stride) {
      vfloat a[kLanes] = {};
      for (int64_t d = 0; d < dim; d += kLanes) {
        const vfloat qd = load(q + d);
        for (int64_t i = 0; i < kLanes; ++i) a[i] += qd * load(k + i * stride + d);
      }
      const vfloat sums = sum_each(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
      std::memcpy(score + j, &sums, sizeof sums);
    }
    for (; j < n; ++j, k += stride) {
      vfloat sum = {};
      for (int64_t d = 0; d < dim; d += kLanes) sum += load(q + d) * load(k + d);
      score[j] = horizontal_sum(sum);
    }
  }

  // The score buffer has room for n rounded up to a whole vector; the tail is ignored.
  static float exp_sum(float* score, int64_t n, float shift) {
    vfloat sums = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const vfloat e = exp_clamped(load(score + j) - shift);
      std::memcpy(score + j, &e, sizeof e);
      sums += e;
    }
    float sum = horizontal_sum(sums);
    if (j < n) {
      const vfloat e = exp_clamped(load(score + j) - shift);
      std::memcpy(score + j, &e, sizeof e);
      for (; j < n; ++j) sum += score[j];
    }
    return sum;
  }

  static void rescale(float* acc, float correction, int64_t dim) {
    for (int64_t d = 0; d < dim; d += kLanes) {
      const vfloat a = load(acc + d) * correction;
      std::memcpy(acc + d, &a, sizeof a);
    }
  }

  // Four 8-wide slices of the head at a time, each kept in a register across the keys (four
  // independent FMA chains), then any remaining slices one by one.
  static void accumulate(float* acc, const float* p, const float* v, int64_t n, int64_t stride,
                         int64_t dim) {
    int64_t d = 0;
    for (; d + 4 * kLanes <= dim; d += 4 * kLanes) {
      vfloat a0 = load(acc + d), a1 = load(acc + d + kLanes);
      vfloat a2 = load(acc + d + 2 * kLanes), a3 = load(acc + d + 3 * kLanes);
      const float* row = v + d;
      for (int64_t j = 0; j < n; ++j, row += stride) {
        a0 += p[j] * load(row);
        a1 += p[j] * load(row + kLanes);
        a2 += p[j] * load(row + 2 * kLanes);
        a3 += p[j] * load(row + 3 * kLanes);
      }
      std::memcpy(acc + d, &a0, sizeof a0);
      std::memcpy(acc + d + kLanes, &a1, sizeof a1);
      std::memcpy(acc + d + 2 * kLanes, &a2, sizeof a2);
      std::memcpy(acc + d + 3 * kLanes, &a3, sizeof a3);
    }
    for (; d < dim; d += kLanes) {
      vfloat a = load(acc + d);
      const float* column = v + d;
      for (int64_t j = 0; j < n; ++j, column += stride) a += p[j] * load(column);
      std::memcpy(acc + d, &a, sizeof a);
    }
  }
};

// The largest of score[0, n): eight lanes at a time for float (cpu_common.h), plainly otherwise.
template <typename acc_t>
acc_t largest(const acc_t* score, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n >= kLanes) {
      const vfloat best = lanes_largest(score, n);
      float out = best[0];
      for (int64_t i = 1; i < kLanes; ++i) out = std::max(out, best[i]);
      for (int64_t j = n - n % kLanes; j < n; ++j) out = std::max(out, score[j]);
      return out;
    }
  }
  return *std::max_element(score, score + n);
}

// Math::accumulate for `count` rows weighing the same values (row r: acc + r * dim, weights
// p + r * p_stride), through the math's own accumulate_rows where it has one.
template <typename Math, typename = void>
struct HasAccumulateRows : std::false_type {};
template <typename Math>
struct HasAccumulateRows<Math, std::void_t<decltype(&Math::accumulate_rows)>> : std::true_type {};

template <typename Math, typename acc_t, typename kv_t>
void accumulate_rows(acc_t* acc, const acc_t* p, int64_t p_stride, int64_t count, const kv_t* v,
                     int64_t n, int64_t stride, int64_t dim) {
  if constexpr (HasAccumulateRows<Math>::value) {
    Math::accumulate_rows(acc, p, p_stride, count, v, n, stride, dim);
  } else {
    for (int64_t r = 0; r < count; ++r) {
      Math::accumulate(acc + r * dim, p + r * p_stride, v, n, stride, dim);
    }
  }
}

// One page's n keys of one head (starting at `head`: PagedInputs::key_head) as Math reads them:
// where they lie (`stride` the slot stride, or the page size for keys in pairs), or, where they
// lie in pairs (bfloat16, key_pairs.h) and the math reads keys token by token, unpaired into
// scratch.
template <typename Math, typename scalar_t>
const typename Math::kv_t* keys_view(const PagedInputs<scalar_t>& in, const scalar_t* head,
                                     int64_t n, typename Math::kv_t* scratch, int64_t& stride) {
  if constexpr (kKeysInPairs<scalar_t> && !Math::kReadsKeyPairs) {
    for (int64_t j = 0; j < n; ++j) {
      load_key_pairs(scratch + j * in.head_dim, head, j, in.head_dim, in.page_size);
    }
    stride = in.head_dim;
    return scratch;
  } else {
    const int64_t slots = kKeysInPairs<scalar_t> ? in.page_size : in.slot_stride;
    return Math::view(head, n, slots, in.head_dim, scratch, stride);
  }
}

// ---- Many new tokens of one request: torch's attention ------------------------------------------
// A prompt's tokens against its keys are matrix products, which torch's CPU attention
// (at::scaled_dot_product_attention: flash attention on oneDNN's microkernels, AMX tiles for
// bfloat16 where the CPU has them) runs as such, where our per-row math scores one row against a
// page at a time. A request of at least kTorchQueries new tokens goes to it where they see enough
// (query, key) pairs, at the crossovers measured (2 threads, Intel Xeon with AMX; ours against
// torch's, the context gathered from its pages included):
// - bfloat16, SmolLM2's 9/3 heads of 64: whole prompts of 64 tokens (2k pairs) on a par; 96
//   tokens 101 vs 79 us; 286 687 vs 497; 2048 34.5 vs 9.3 ms; 32 new tokens after 300 cached
//   164 vs 151 us.
// - float32, 8/4 heads of 64: whole prompts on a par up to ~1024 tokens (7.0 vs 6.4 ms), 2048
//   32.0 vs 23.6 ms; but with earlier tokens cached torch's is the slower (256 new tokens after
//   1024 cached 4.3 vs 4.8 ms, 512 after 2048 20.8 vs 21.6, 256 after 4096 18.0 vs 20.1): only
//   whole prompts of ~1450 tokens and more go (where the register tiles are off or do not fit).
// - bfloat16 on AMX tiles (amx_attention.h; same shape, one request a call, us a layer), with
//   items of up to 64 tokens on long contexts (plan_tile_items): whole prompts of 512 tokens
//   0.66x torch's time, 768 0.81x, 1024 0.80x, 1400 0.98x, 1700 1.01x, 2000 1.02x; new tokens
//   after cached ones stay ahead at every size tried (256 after 1024 0.80x, 512 after 1536 0.86x,
//   1024 after 1024 0.85x, 2048 after 2048 0.90x). So where the tiles run, only whole prompts of
//   kTilesTorchPairs pairs or more go (~1450 tokens and more), as float32's do.
// - float32 on register tiles (float_tiles.h; 8/4 heads of 64, against torch's on the gathered
//   context): whole prompts of 2048 tokens 0.90x torch's time, 2500 0.95x, 3000 1.00x, 4096 1.08x:
//   whole prompts of up to ~2900 tokens (kFloatTilesTorchPairs) stay ours.
// Decode rows, short prompts and chunks stay ours, and so does float64, the exactness runs' type.
constexpr int64_t kTorchQueries = 32;
constexpr int64_t kTilesTorchPairs = 1 << 20;
constexpr int64_t kFloatTilesTorchPairs = 1 << 22;

template <typename scalar_t>
int64_t torch_pairs(bool on_tiles) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return on_tiles ? kTilesTorchPairs : 4096;
  if constexpr (std::is_same_v<scalar_t, float>) return on_tiles ? kFloatTilesTorchPairs : 1 << 20;
  return std::numeric_limits<int64_t>::max();
}

template <typename scalar_t>
bool by_torch(const PagedInputs<scalar_t>& in, int64_t b) {
  const int64_t q_len = in.cu_seqlens_q[b + 1] - in.cu_seqlens_q[b], context = in.context_lens[b];
  const int64_t pairs = q_len * (context - (q_len - 1) / 2);  // causal: a triangle
  // Only as a whole prompt: float32, and any dtype where its tiles run.
  const bool whole = q_len == context, whole_only = std::is_same_v<scalar_t, float> || in.on_tiles;
  return q_len >= kTorchQueries && pairs >= torch_pairs<scalar_t>(in.on_tiles) &&
         (whole || !whole_only);
}

// Request b's K (keys) or V for its first `count` positions, from its pages: [count, heads, dim].
template <typename scalar_t>
at::Tensor gathered(const PagedInputs<scalar_t>& in, bool keys, int64_t b, int64_t count,
                    const at::TensorOptions& options) {
  at::Tensor out = at::empty({count, in.num_kv_heads, in.head_dim}, options);
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t page = in.page_size;
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t h = 0; h < in.num_kv_heads; ++h, dst += in.head_dim) {
      if (keys && kKeysInPairs<scalar_t>) {
        const int32_t index = in.block_table[b * in.table_stride + t / page];
        load_key_pairs(dst, in.key_head(index, h), t % page, in.head_dim, page);
      } else {
        const scalar_t* cache = keys ? in.key_cache : in.value_cache;
        std::memcpy(dst, in.at(cache, b, t, h), in.head_dim * sizeof(scalar_t));
      }
    }
  }
  return out;
}

// Request b's rows of out, by torch's attention over its context gathered from the pages, the
// mask aligned bottom-right (the last new token sees the whole context) as the kernels' is. A whole
// prompt needs no mask (causal as torch aligns it); with earlier tokens cached the mask is
// explicit, which torch widens to the query's type, so the rows go in pieces of at most
// kMaskEntries (row, key) entries (at least kTorchQueries rows), each against the keys its rows
// see (a 4096-token chunk after 28k cached tokens would otherwise hold a 256 MiB mask).
constexpr int64_t kMaskEntries = int64_t{1} << 20;

template <typename scalar_t>
void attend_by_torch(const at::Tensor& out, const at::Tensor& query,
                     const PagedInputs<scalar_t>& in, int64_t b) {
  const int64_t first = in.cu_seqlens_q[b], q_len = in.cu_seqlens_q[b + 1] - first;
  const int64_t context = in.context_lens[b];
  const auto heads_first = [](const at::Tensor& t) { return t.unsqueeze(0).transpose(1, 2); };
  const at::Tensor key = gathered(in, /*keys=*/true, b, context, query.options());
  const at::Tensor value = gathered(in, /*keys=*/false, b, context, query.options());
  const auto attend = [&](int64_t row, int64_t rows, int64_t keys,
                          const std::optional<at::Tensor>& mask) {
    const at::Tensor attended = at::scaled_dot_product_attention(
        heads_first(query.narrow(0, first + row, rows)), heads_first(key.narrow(0, 0, keys)),
        heads_first(value.narrow(0, 0, keys)), mask, 0.0, !mask, in.scale, /*enable_gqa=*/true);
    out.narrow(0, first + row, rows).copy_(attended[0].transpose(0, 1));
  };
  if (q_len == context) return attend(0, q_len, context, std::nullopt);
  const int64_t piece = std::max(kTorchQueries, kMaskEntries / context);  // not 1-row calls
  for (int64_t row = 0; row < q_len; row += piece) {
    const int64_t rows = std::min(piece, q_len - row), keys = context - q_len + row + rows;
    at::Tensor seen = at::ones({rows, keys}, query.options().dtype(at::kBool));
    attend(row, rows, keys, seen.tril_(keys - rows));  // in place: one mask a piece, not two
  }
}

// New tokens of a request a work item takes: `base`, or `long_context` for a request whose
// context (cached and new tokens) is at least kLongItemKeys.
constexpr int64_t kLongItemKeys = 512;
struct ItemTokens {
  int64_t base = kQueryTile, long_context = kQueryTile;
  int64_t of(int64_t context) const { return context >= kLongItemKeys ? long_context : base; }
};

// Whole requests (all heads, so a page is read front to back once) unless that leaves threads
// idle; then each KV head is its own item. Longest first, taken dynamically: ragged contexts
// still keep every thread busy.
template <typename scalar_t>
std::vector<WorkItem> plan_items(const PagedInputs<scalar_t>& in, int64_t batch, int64_t threads,
                                 ItemTokens item_tokens = {}) {
  std::vector<WorkItem> items;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = in.cu_seqlens_q[b + 1] - in.cu_seqlens_q[b];
    if (by_torch(in, b)) continue;  // attend_by_torch's
    const int64_t tokens = item_tokens.of(in.context_lens[b]);
    for (int64_t t = 0; t < q_len; t += tokens) {
      const int64_t n = std::min(tokens, q_len - t);
      const int64_t keys = in.context_lens[b] - q_len + t + n;  // what the tile's last token sees
      items.push_back({b, t, n, 0, in.num_kv_heads, n * keys * in.num_kv_heads});
    }
  }
  if (static_cast<int64_t>(items.size()) < 4 * threads && in.num_kv_heads > 1) {
    std::vector<WorkItem> split;
    for (const WorkItem& item : items) {
      for (int64_t h = 0; h < in.num_kv_heads; ++h) {
        split.push_back({item.request, item.first_token, item.num_tokens, h, h + 1,
                         item.cost / in.num_kv_heads});
      }
    }
    items.swap(split);
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  return items;
}

// Per-thread scratch: the tile's scaled queries, running max / sum, output accumulators, each
// row's scores over one block of keys, and one page of one head widened (VectorMath, bfloat16).
template <typename Math>
struct Scratch {
  using acc_t = typename Math::acc_t;
  std::vector<typename Math::query_t> query;
  std::vector<acc_t> max, sum, acc, scores;
  std::vector<typename Math::kv_t> page;
  int64_t score_stride = 0;
  void fit(int64_t rows, int64_t dim, int64_t page_size, int64_t block_keys) {
    query.resize(rows * dim);
    acc.assign(rows * dim, acc_t(0));
    max.assign(rows, -std::numeric_limits<acc_t>::infinity());
    sum.assign(rows, acc_t(0));
    score_stride = block_keys + kLanes;
    scores.resize(rows * score_stride);
    page.resize(page_size * dim);
  }
};

// Ask for one page's K (or V) of heads [first, last): the whole page when every head is wanted
// (contiguous), else each token's slice. Pages are scattered, so the hardware cannot guess the
// next one; each is asked for while the page before it is being read. Only the first two lines
// of each 4 KiB of a run are asked for: that starts the hardware's own stream prefetcher, and
// asking for every line (128 prefetches a page) stalled on an Intel Xeon (AMX) once the line
// fill buffers ran out: 46% of the kernel's samples sat on prefetches, and the B=32 decode
// microbenchmark (bfloat16, context 256, 4 KV heads) ran 1.1x slower than with starts only.
// (Keys in pairs hold each head's slots together: any run of heads is one run.)
template <typename scalar_t>
void prefetch_page(const PagedInputs<scalar_t>& in, const scalar_t* cache, int64_t page,
                   int64_t first, int64_t last) {
  const bool whole = first == 0 && last == in.num_kv_heads;
  const bool pairs = kKeysInPairs<scalar_t> && cache == in.key_cache;
  const int64_t runs = whole || pairs ? 1 : in.page_size;
  const int64_t run_elements = whole   ? in.page_size * in.slot_stride
                               : pairs ? (last - first) * in.page_size * in.head_dim
                                       : (last - first) * in.head_stride;
  const int64_t run_bytes = run_elements * sizeof(scalar_t);
  const char* start = reinterpret_cast<const char*>(
      pairs ? in.key_head(page, first) : cache + page * in.page_stride + first * in.head_stride);
  for (int64_t r = 0; r < runs; ++r) {
    const char* run = start + r * in.slot_stride * sizeof(scalar_t);
    for (int64_t i = 0; i < run_bytes; i += 4096) {
      for (int64_t line = i; line < std::min(run_bytes, i + 128); line += 64) prefetch(run + line);
    }
  }
}

// Ask for share `part` of `parts` of one page's K (or V), all heads: spread over the page's heads
// as they are read, a whole page is asked for without a burst of prefetches (prefetch_page).
// Measured with the next page asked for this way in both passes (B=32 decode, bfloat16, 4 KV
// heads, Intel Xeon with AMX): context 1024, 1843 -> 1211 us a layer; 128 and 256 unchanged.
template <typename scalar_t>
void prefetch_share(const PagedInputs<scalar_t>& in, const scalar_t* cache, int64_t page,
                    int64_t part, int64_t parts) {
  const int64_t lines = in.page_size * in.slot_stride * sizeof(scalar_t) / 64;
  const char* start = reinterpret_cast<const char*>(cache + page * in.page_stride);
  for (int64_t i = part * lines / parts; i < (part + 1) * lines / parts; ++i) {
    prefetch(start + 64 * i);
  }
}

// Keys [start, start + len) of one block against every row of the item: their scores first (each
// page's K read front to back once, for every head and row of the group), one softmax update per
// row for the whole block, then the values (each page's V read once). Row r of a head sees keys
// < first_limit + r / group + 1 (causal within the tile); a row that sees none of the block is
// left as it was.
// Inlined, as attend_item is: a second caller (run_items_on_tiles) made GCC keep both as calls,
// and a B=32 bfloat16 decode step's attention took 1.04-1.06x its time.
template <typename Math, typename scalar_t>
[[gnu::always_inline]] inline void attend_block(const PagedInputs<scalar_t>& in, Scratch<Math>& s,
                  const WorkItem& item, const int32_t* pages, int64_t num_pages,
                  int64_t first_limit, int64_t start, int64_t len) {
  const int64_t dim = in.head_dim, page = in.page_size, rows = item.num_tokens * in.group;
  auto seen = [&](int64_t r) {  // keys of the block row r sees
    return std::clamp<int64_t>(first_limit + r / in.group + 1 - start, 0, len);
  };
  // use(row0, offset, n, kv, stride) for each page of the block and head of the item, the page's
  // n keys or values of the head as view(page, head, n, stride) hands them to the math; an item
  // of every head asks for the next page of the same cache a head's share at a time.
  const bool all_heads = item.first_head == 0 && item.last_head == in.num_kv_heads;
  auto each_page = [&](const scalar_t* cache, auto&& view, auto&& before, auto&& use) {
    for (int64_t offset = 0; offset < len; offset += page) {
      const int64_t n = std::min(page, len - offset), index = (start + offset) / page;
      before(index);
      for (int64_t head = item.first_head; head < item.last_head; ++head) {
        if (all_heads && index + 1 < num_pages) {
          prefetch_share(in, cache, pages[index + 1], head, in.num_kv_heads);
        }
        int64_t stride = 0;
        const auto* kv = view(pages[index], head, n, stride);
        use((head - item.first_head) * rows, offset, n, kv, stride);
      }
    }
  };
  auto keys = [&](int64_t index, int64_t head, int64_t n, int64_t& stride) {
    return keys_view<Math>(in, in.key_head(index, head), n, s.page.data(), stride);
  };
  auto values = [&](int64_t index, int64_t head, int64_t n, int64_t& stride) {
    const scalar_t* at = in.value_cache + index * in.page_stride + head * in.head_stride;
    return Math::view(at, n, in.slot_stride, dim, s.page.data(), stride);
  };
  auto ask = [&](const scalar_t* cache, int64_t index) {
    if (index < num_pages) prefetch_page(in, cache, pages[index], item.first_head, item.last_head);
  };
  using acc_t = typename Math::acc_t;
  acc_t* scores = s.scores.data();
  each_page(
      in.key_cache, keys, [&](int64_t index) { ask(in.key_cache, index + kPrefetchPages); },
      [&](int64_t row0, int64_t offset, int64_t n, const auto* k, int64_t stride) {
        if constexpr (Math::kReadsKeyPairs) {
          // Every row against all n keys: a row's scores past what it sees are never read.
          Math::rows_scores(scores + row0 * s.score_stride + offset, s.score_stride,
                            s.query.data() + row0 * dim, rows, k, n, stride, dim);
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t visible = std::min(n, seen(r) - offset);
            if (visible <= 0) continue;
            Math::scores(scores + (row0 + r) * s.score_stride + offset,
                         s.query.data() + (row0 + r) * dim, k, visible, stride, dim);
          }
        }
      });
  for (int64_t h = 0; h < item.last_head - item.first_head; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = seen(r), row = h * rows + r;
      if (visible == 0) continue;
      acc_t* score = scores + row * s.score_stride;
      const acc_t block_max = largest(score, visible);
      const acc_t new_max = std::max(s.max[row], block_max);
      const acc_t correction = std::exp(s.max[row] - new_max);
      s.sum[row] = s.sum[row] * correction + Math::exp_sum(score, visible, new_max);
      s.max[row] = new_max;
      Math::rescale(s.acc.data() + row * dim, correction, dim);
    }
  }
  // V's pages are asked for ahead like K's: with only the next page's share (each_page), the
  // values pass ran 6% slower (B=32 decode, context 300, both dtypes and both Llama shapes, Intel
  // Xeon with AMX).
  each_page(
      in.value_cache, values, [&](int64_t index) { ask(in.value_cache, index + kPrefetchPages); },
      [&](int64_t row0, int64_t offset, int64_t n, const auto* v, int64_t stride) {
        for (int64_t r = 0; r < rows; r += in.group) {  // a token's rows see the same keys
          const int64_t visible = std::min(n, seen(r) - offset);
          if (visible <= 0) continue;
          accumulate_rows<Math>(s.acc.data() + (row0 + r) * dim,
                                scores + (row0 + r) * s.score_stride + offset, s.score_stride,
                                in.group, v, visible, stride, dim);
        }
      });
}

template <typename Math, typename scalar_t>
[[gnu::always_inline]] inline void attend_item(const WorkItem& item,
                                               const PagedInputs<scalar_t>& in, Scratch<Math>& s) {
  using acc_t = typename Math::acc_t;
  const int64_t dim = in.head_dim, group = in.group, page = in.page_size;
  const int64_t rows = item.num_tokens * group, heads = item.last_head - item.first_head;
  const int64_t block = block_keys(page);
  s.fit(heads * rows, dim, page, block);
  // Row (h, r) is row r of KV head first_head + h (PagedInputs::query_row).
  auto row_of = [&](int64_t h, int64_t r) { return (h * rows + r) * dim; };
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      Math::load_query(s.query.data() + row_of(h, r), in.query_row(item, item.first_head + h, r),
                       dim, in.scale);
    }
  }
  const int64_t first_limit = in.first_limit(item);
  const int64_t num_keys = first_limit + item.num_tokens;
  const int32_t* pages = in.block_table + item.request * in.table_stride;
  const int64_t num_pages = (num_keys + page - 1) / page;
  for (int64_t p = 0; p < kPrefetchPages && p < num_pages; ++p) {
    prefetch_page(in, in.key_cache, pages[p], item.first_head, item.last_head);
  }
  for (int64_t start = 0; start < num_keys; start += block) {
    attend_block<Math>(in, s, item, pages, num_pages, first_limit, start,
                       std::min(block, num_keys - start));
  }

  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      Math::finish(in.out_row(item, item.first_head + h, r), s.acc.data() + row_of(h, r),
                   acc_t(1) / s.sum[h * rows + r], dim);
    }
  }
}

template <typename Math, typename scalar_t>
void run_items(const PagedInputs<scalar_t>& in, int64_t batch) {
  const std::vector<WorkItem> items = plan_items(in, batch, at::get_num_threads());
  run_claimed(static_cast<int64_t>(items.size()), [&](const auto& claim) {
    Scratch<Math> scratch;
    for (int64_t i = claim(); i >= 0; i = claim()) attend_item<Math>(items[i], in, scratch);
  });
}

// Whether any of the call's items has a chunk's worth of rows a KV head (a request's first tile
// is its largest), so that the call has work for the tiles.
template <typename Tiles, typename scalar_t>
bool has_tile_items(const PagedInputs<scalar_t>& in, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = in.cu_seqlens_q[b + 1] - in.cu_seqlens_q[b];
    if (std::min(q_len, kQueryTile) * in.group >= Tiles::kTile && !by_torch(in, b)) return true;
  }
  return false;
}

// A call's items on tiles. Each request's items take whole chunks of rows (tokens x group): 16
// tokens, or 32 where 16 would leave a chunk short (float32's chunks of 32 rows, odd groups). A
// request of a long context takes longer items (up to Tiles::kMostItemTokens, halving) while the
// call keeps 2 items a thread: an item reads its context's K and V once for all its chunks, so
// longer items read less, where a short context gains nothing and fewer items balance worse.
// float32 on 2 threads of an Intel Xeon (AMX), against items of 16 tokens (us a layer): SmolLM2's
// 9/3 heads of 64, whole prompts of 128-512 tokens 0.91-1.0x the time, 1024 0.91x, 2000 0.84x;
// 8/8 (no grouping) 0.74-0.89x and 0.51x at 2000; 8/4 and 16/4 at 1024-2000 tokens 0.80-0.95x,
// 256 new after 1024 cached 0.80-0.87x, short contexts unchanged (their items still 16 tokens).
template <typename Tiles, typename scalar_t>
std::vector<WorkItem> plan_tile_items(const PagedInputs<scalar_t>& in, int64_t batch,
                                      int64_t threads) {
  const auto enough = [&](const std::vector<WorkItem>& items) {
    return static_cast<int64_t>(items.size()) >= 2 * threads;
  };
  int64_t base = kQueryTile;
  while (base * in.group % Tiles::kChunkRows != 0) base *= 2;
  // Without a long context every plan would be the base one.
  const bool any_long = std::any_of(in.context_lens, in.context_lens + batch,
                                    [](int32_t context) { return context >= kLongItemKeys; });
  for (int64_t tokens = any_long ? Tiles::kMostItemTokens : base; tokens > base; tokens /= 2) {
    std::vector<WorkItem> items = plan_items(in, batch, threads, {base, tokens});
    if (enough(items)) return items;
  }
  std::vector<WorkItem> items = plan_items(in, batch, threads, {base, base});
  return enough(items) ? items : plan_items(in, batch, threads);
}

// Items with a chunk's worth of rows a KV head (plan_tile_items' prompt items) on tiles; the rest
// on the 16-lane math: for a decode row's few rows the AMX tile loads, waiting on K and V, ran
// 1.3x its time (B=32, context 160, SmolLM2's heads), while a tile of 16 tokens after 160 cached
// ran in 0.55x.
template <typename Tiles, typename scalar_t>
void run_items_on_tiles(const PagedInputs<scalar_t>& in, int64_t batch) {
  using Math = WideMath<scalar_t>;
  const std::vector<WorkItem> items = plan_tile_items<Tiles>(in, batch, at::get_num_threads());
  run_claimed(static_cast<int64_t>(items.size()), [&](const auto& claim) {
    // The tiles' scratch and state only once a thread claims a tile item.
    std::optional<Tiles> tiles;
    Scratch<Math> scratch;
    for (int64_t i = claim(); i >= 0; i = claim()) {
      if (items[i].num_tokens * in.group < Tiles::kTile) {
        attend_item<Math>(items[i], in, scratch);
        continue;
      }
      if (!tiles) {
        Tiles::claim();
        tiles.emplace(in, block_keys(in.page_size));
      }
      tiles->attend(items[i]);
    }
    if (tiles) Tiles::release();
  });
}

// The tiles a dtype's prompt items run on where the build has them (void where it has none):
// bfloat16 on AMX tiles, float32 on AVX-512 registers.
template <typename scalar_t>
struct TilesFor {
  using type = void;
};
#ifdef BATON_AMX_ATTENTION
template <>
struct TilesFor<c10::BFloat16> {
  using type = AmxAttention;
};
#endif
#ifdef BATON_FLOAT_TILES
template <>
struct TilesFor<float> {
  using type = FloatTiles;
};
#endif

// Whether a call's prompt items may run on tiles: built for them, switched on, and the head and
// page sizes fit.
template <typename scalar_t>
bool tiles_fit(int64_t head_dim, int64_t page_size) {
  using Tiles = typename TilesFor<scalar_t>::type;
  if constexpr (std::is_void_v<Tiles>) {
    return false;
  } else {
    return prompt_tiles_enabled && Tiles::fits(head_dim, page_size);
  }
}

// A call with no tile items (a decode step) runs the vector maths' own loop: through the mixed
// loop, with the AMX tiles' scratch built up front, a B=32 bfloat16 decode step's attention took
// 1.10x its time (context 160) and 1.25x at B=8.
template <typename Tiles, typename scalar_t>
bool ran_on_tiles(const PagedInputs<scalar_t>& in, int64_t batch) {
  if (!in.on_tiles || !has_tile_items<Tiles>(in, batch)) return false;
  run_items_on_tiles<Tiles>(in, batch);
  return true;
}

template <typename scalar_t>
void dispatch_math(const PagedInputs<scalar_t>& in, int64_t batch) {
  using Tiles = typename TilesFor<scalar_t>::type;
  if constexpr (!std::is_void_v<Tiles>) {
    if (ran_on_tiles<Tiles>(in, batch)) return;
  }
  if constexpr (std::is_same_v<at::opmath_type<scalar_t>, float>) {
    if (WideMath<scalar_t>::fits(in.head_dim)) return run_items<WideMath<scalar_t>>(in, batch);
    if (VectorMath<scalar_t>::fits(in.head_dim)) return run_items<VectorMath<scalar_t>>(in, batch);
  }
  run_items<ScalarMath<scalar_t, at::opmath_type<scalar_t>>>(in, batch);
}
}  // namespace

// bfloat16 K pages hold each head's keys in pairs of dims (key_pairs.h), within each page's
// [page_size, heads, dim] block: that block must lie contiguous, and dims come in pairs.
static void check_key_pages(const at::Tensor& key_cache) {
  if (key_cache.scalar_type() != at::kBFloat16) return;
  TORCH_CHECK(key_cache.size(3) % 2 == 0, "bfloat16 K pages need an even head size, got ",
              key_cache.size(3));
  TORCH_CHECK(key_cache.stride(2) == key_cache.size(3) &&
                  key_cache.stride(1) == key_cache.size(2) * key_cache.size(3),
              "bfloat16 K pages must each lie contiguous");
}

// out[T, Hq, D] = causal attention of every packed query token to its request's context, read
// from the pages block_table lists (bottom-right aligned: the last new token sees the whole
// context). One call covers every request and head of one layer's step.
void paged_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_table,
                     const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens, double scale) {
  check_rows(out, 3, "out");
  check_rows(query, 3, "query");
  check_rows(key_cache, 4, "key_cache");
  check_rows(value_cache, 4, "value_cache");
  TORCH_CHECK(key_cache.strides() == value_cache.strides(), "K and V pages must share strides");
  check_key_pages(key_cache);
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, pages and out must share a dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && cu_seqlens_q.scalar_type() == at::kInt &&
                  context_lens.scalar_type() == at::kInt,
              "block_table, cu_seqlens_q and context_lens must be int32");
  TORCH_CHECK(block_table.is_contiguous() && cu_seqlens_q.is_contiguous() &&
                  context_lens.is_contiguous(),
              "metadata tensors must be contiguous");
  const int64_t num_heads = query.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, query.scalar_type(), "paged_attention", [&] {
    const PagedInputs<scalar_t> in{
        query.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(),
        value_cache.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        block_table.data_ptr<int32_t>(), cu_seqlens_q.data_ptr<int32_t>(),
        context_lens.data_ptr<int32_t>(), block_table.stride(0), query.stride(0),
        query.stride(1), out.stride(0), out.stride(1), key_cache.stride(0), key_cache.stride(1),
        key_cache.stride(2), key_cache.size(1), query.size(2), num_heads / num_kv_heads,
        num_kv_heads, scale, tiles_fit<scalar_t>(query.size(2), key_cache.size(1))};
    for (int64_t b = 0; b < context_lens.size(0); ++b) {
      if (by_torch(in, b)) attend_by_torch(out, query, in, b);
    }
    dispatch_math(in, context_lens.size(0));
  });
}

// Whether prompt items may run on tiles (bfloat16 on AMX tiles where the CPU has them, float32 on
// register tiles, where the head and page sizes fit); returns the previous setting.
bool use_prompt_tiles(bool enabled) { return prompt_tiles_enabled.exchange(enabled); }

// Whether this build can run float32 prompt items on register tiles at all (an AVX-512 build).
bool float_tiles_available() { return !std::is_void_v<TilesFor<float>::type>; }

// Whether this build and process can run bfloat16 attention on AMX tiles at all.
bool amx_attention_available() {
#ifdef BATON_AMX_ATTENTION
  return amx_tiles_granted();
#else
  return false;
#endif
}

// key_cache/value_cache[slot // page, slot % page] = key/value[t] for every new token t.
void write_kv(at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& slot_mapping,
              const at::Tensor& key, const at::Tensor& value) {
  check_rows(key, 3, "key");
  check_rows(value, 3, "value");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "slot_mapping must be contiguous int64");
  TORCH_CHECK(key.scalar_type() == key_cache.scalar_type(), "key and pages must share a dtype");
  check_key_pages(key_cache);
  const int64_t page = key_cache.size(1), heads = key.size(1), dim = key.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, key.scalar_type(), "write_kv", [&] {
    auto copy = [&](at::Tensor& cache, const at::Tensor& src, int64_t t) {
      scalar_t* dst = cache.data_ptr<scalar_t>() + (slots[t] / page) * cache.stride(0) +
                      (slots[t] % page) * cache.stride(1);
      const scalar_t* from = src.data_ptr<scalar_t>() + t * src.stride(0);
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(dst + h * cache.stride(2), from + h * src.stride(1), dim * sizeof(scalar_t));
      }
    };
    // Keys in pairs (key_pairs.h): each head's pairs of the slot, page_size * dim apart.
    auto copy_key_pairs = [&](int64_t t) {
      scalar_t* first_head =
          key_cache.data_ptr<scalar_t>() + (slots[t] / page) * key_cache.stride(0);
      const scalar_t* from = key.data_ptr<scalar_t>() + t * key.stride(0);
      for (int64_t h = 0; h < heads; ++h) {
        store_key_pairs(first_head + h * page * dim, slots[t] % page, from + h * key.stride(1), dim,
                        page);
      }
    };
    for (int64_t t = 0; t < key.size(0); ++t) {
      if (kKeysInPairs<scalar_t>) {
        copy_key_pairs(t);
      } else {
        copy(key_cache, key, t);
      }
      copy(value_cache, value, t);
    }
  });
}

