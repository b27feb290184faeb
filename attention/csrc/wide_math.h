// WideMath: paged attention's per-row math on 16-lane float vectors, for heads whose size is a
// multiple of 16 (64, 80, 96, 128, ...).
//
// Why a second vector width: cpu_common.h's 8-lane vectors fill half of an AVX-512 register, and
// on a core with full-width AVX-512 units (AMD Zen 5, Intel server cores) half the arithmetic is
// left unused. A B=32 decode step on the small Llama's heads (8 layers, context 180) measured
// 17.8 GB/s of bfloat16 K/V and 25 GB/s of float32 K/V with 8 lanes, against ~51 GB/s this
// machine's memory gives a plain sum: the kernel was bound by instructions, not by memory.
//
// Values are weighed for up to four query heads of a KV head at once (``accumulate_rows``), so a
// widened value vector feeds four rows' FMAs: on the SmolLM2 shape (3 query heads a KV head) that
// took a B=32 bfloat16 decode step's attention from 444 to 240 us a layer on an Intel Xeon (AMX).
//
// What else differs from VectorMath: bfloat16 K/V is never widened into scratch. Keys are read in
// their pages' pairs of dims (key_pairs.h), all the rows of a head at once (``rows_scores``);
// values are widened in registers as they are read (a bfloat16 is the top half of a float's
// bits).
//
// Only on AVX-512 builds: elsewhere GCC lowers each 16-lane vector with spills (a review built it
// for AVX2 and measured 4.5-6.7x the 8-lane kernel's time), so ``fits`` refuses and VectorMath
// runs.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"
#include "key_pairs.h"

namespace baton {

typedef float vwide __attribute__((vector_size(64)));
typedef int32_t vwide_int __attribute__((vector_size(64)));
typedef uint16_t vwide_half __attribute__((vector_size(32)));
constexpr int64_t kWideLanes = 16;

inline vwide load_wide(const float* p) { return load_lanes<vwide>(p); }
inline vwide load_wide(const c10::BFloat16* p) {
#if defined(__AVX512F__)
  // One widening load and a shift: GCC lowers the generic conversion below to two half-width
  // widenings and an insert.
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vwide)_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
#else
  return load_lanes<vwide, vwide_int, vwide_half>(p);
#endif
}

inline void store_wide(float* p, vwide v) { std::memcpy(p, &v, sizeof v); }

// cpu_common.h's bfloat16 rounding on 16 lanes: widened back, or stored.
inline vwide rounded_wide(vwide v) { return rounded_to_bfloat16<vwide_int>(v); }

inline void store_wide(c10::BFloat16* p, vwide v) {
  const vwide_half h = __builtin_convertvector(bfloat16_bits_of<vwide_int>(v), vwide_half);
  std::memcpy(p, &h, sizeof h);
}

inline vwide splat(float x) { return vwide{} + x; }

inline float wide_sum(vwide v) {
  const vfloat half = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return horizontal_sum(half);
}

// Lane i of the result is the sum of a[i]'s lanes: a transposing tree of pairwise adds (15
// shuffle-and-add steps for all sixteen, where one horizontal sum each would take 4 apiece).
inline vwide sum_each_wide(const vwide* a) {
  auto pairs = [](vwide x, vwide y) {  // (x0+x1, y0+y1, x2+x3, y2+y3, ...)
    return __builtin_shufflevector(x, y, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14,
                                   30) +
           __builtin_shufflevector(x, y, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15,
                                   31);
  };
  auto quads = [](vwide x, vwide y) {  // four sums (x's two, y's two) per group of four lanes
    return __builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28,
                                   29) +
           __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30,
                                   31);
  };
  auto octs = [](vwide x, vwide y) {  // eight sums per half: x's four, then y's four
    return __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26,
                                   27) +
           __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30,
                                   31);
  };
  const vwide low = octs(quads(pairs(a[0], a[1]), pairs(a[2], a[3])),
                         quads(pairs(a[4], a[5]), pairs(a[6], a[7])));
  const vwide high = octs(quads(pairs(a[8], a[9]), pairs(a[10], a[11])),
                          quads(pairs(a[12], a[13]), pairs(a[14], a[15])));
  return __builtin_shufflevector(low, high, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                 23) +
         __builtin_shufflevector(low, high, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                 30, 31);
}

// exp_clamped (cpu_common.h) on 16 lanes: the same result in each lane, in one pass where two
// halves took twice the instructions (a bfloat16 silu-and-mul of SmolLM2's prefill size spent
// most of its time on exp and the division).
inline vwide exp_wide(vwide x) { return exp_clamped_lanes<vwide, vwide_int>(x); }

// silu(gate) * up into 16 bfloat16 values, gate and up being bfloat16 values widened: the silu
// rounded to bfloat16, then the product, as torch's bfloat16 ops round. decoder_ops.cpp's
// silu_and_mul and amx_linear.cpp's fused gate-up pass both store through it, so they agree to
// the bit. With AVX512-BF16 both roundings are the hardware's (to nearest even, as c10's; a
// denormal result flushes to zero, as amx_linear's rounding does, and a NaN stays a NaN): 0.71x
// the time of the bit arithmetic (2^20 values, one thread; the same bits on all of them).
inline void store_silu_and_mul(c10::BFloat16* dst, vwide gate, vwide up) {
  const vwide silu = gate / (1.0f + exp_wide(-gate));
#if defined(__AVX512BF16__)
  const __m256i rounded = (__m256i)_mm512_cvtneps_pbh((__m512)silu);
  const vwide widened = (vwide)_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      (__m256i)_mm512_cvtneps_pbh((__m512)(widened * up)));
#else
  store_wide(dst, rounded_wide(silu) * up);
#endif
}

// The same interface as paged_attention.cpp's ScalarMath and VectorMath.
template <typename scalar_t>
struct WideMath {
  using acc_t = float;
  using kv_t = scalar_t;  // pages are read as they lie
  using query_t = float;  // widened and scaled
  // bfloat16 keys are read in their pages' pairs (key_pairs.h): `k` is a head's start and
  // `stride` the page size.
#if defined(__AVX512F__)
  static constexpr bool kReadsKeyPairs = kKeysInPairs<scalar_t>;
#else
  static constexpr bool kReadsKeyPairs = false;  // never runs there (fits)
#endif

#if defined(__AVX512F__)
  static bool fits(int64_t dim) { return dim % kWideLanes == 0; }
#else
  static bool fits(int64_t) { return false; }
#endif

  static const kv_t* view(const scalar_t* page, int64_t, int64_t stride, int64_t, kv_t*,
                          int64_t& view_stride) {
    view_stride = stride;
    return page;
  }

  static void load_query(query_t* dst, const scalar_t* src, int64_t dim, double scale) {
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(src[d]) * scale;
  }

  // score[j] = q . k_j for n float keys `stride` apart: sixteen keys at a time, their sums
  // gathered into one vector; the rest one by one.
  static void scores(float* score, const query_t* q, const kv_t* k, int64_t n, int64_t stride,
                     int64_t dim) {
    static_assert(!kReadsKeyPairs, "bfloat16 keys are scored by rows_scores");
    int64_t j = 0;
    for (; j + kWideLanes <= n; j += kWideLanes, k += kWideLanes * stride) {
      vwide a[kWideLanes] = {};
      for (int64_t d = 0; d < dim; d += kWideLanes) {
        const vwide qd = load_wide(q + d);
        for (int64_t i = 0; i < kWideLanes; ++i) a[i] += qd * load_wide(k + i * stride + d);
      }
      store_wide(score + j, sum_each_wide(a));
    }
    for (; j < n; ++j, k += stride) {
      vwide sum = {};
      for (int64_t d = 0; d < dim; d += kWideLanes) sum += load_wide(q + d) * load_wide(k + d);
      score[j] = wide_sum(sum);
    }
  }

#if defined(__AVX512F__)
  // The scores of `rows` query rows (dim apart; row r's into score + r * score_stride) against
  // the n bfloat16 keys of one head of one page, its pairs starting at k on pages of `page`
  // slots: sixteen keys a vector, four rows at a time, each pair of dims widened once for them
  // all.
  static void rows_scores(float* score, int64_t score_stride, const query_t* q, int64_t rows,
                          const kv_t* k, int64_t n, int64_t page, int64_t dim) {
    for (int64_t r = 0; r < rows; r += 4) {
      float* out = score + r * score_stride;
      switch (std::min<int64_t>(4, rows - r)) {
        case 4: pair_scores<4>(out, score_stride, q + r * dim, k, n, page, dim); break;
        case 3: pair_scores<3>(out, score_stride, q + r * dim, k, n, page, dim); break;
        case 2: pair_scores<2>(out, score_stride, q + r * dim, k, n, page, dim); break;
        default: pair_scores<1>(out, score_stride, q + r * dim, k, n, page, dim);
      }
    }
  }
#endif

  // The score buffer has room for n rounded up to whole 8-lane vectors (paged_attention.cpp's
  // Scratch); the tail past n is computed and ignored.
  static float exp_sum(float* score, int64_t n, float shift) {
    vwide sums = {};
    int64_t j = 0;
    for (; j + kWideLanes <= n; j += kWideLanes) {
      const vwide e = exp_wide(load_wide(score + j) - shift);
      store_wide(score + j, e);
      sums += e;
    }
    float sum = wide_sum(sums);
    for (; j < n; j += kLanes) {
      const vfloat e = exp_clamped(load(score + j) - shift);
      std::memcpy(score + j, &e, sizeof e);
      for (int64_t i = j; i < std::min(n, j + kLanes); ++i) sum += score[i];
    }
    return sum;
  }

  static void rescale(float* acc, float correction, int64_t dim) {
    for (int64_t d = 0; d < dim; d += kWideLanes) {
      store_wide(acc + d, load_wide(acc + d) * correction);
    }
  }

  // acc += sum_j p[j] v_j: four 16-lane slices of the head at a time (load_slice's order), two
  // keys at a time into two sets of accumulators (eight independent FMA chains), then any
  // remaining slices one by one.
  static void accumulate(float* acc, const float* p, const kv_t* v, int64_t n, int64_t stride,
                         int64_t dim) {
    int64_t d = 0;
    for (; d + kSlice <= dim; d += kSlice) {
      vwide even[4], odd[4] = {};
      for (int s = 0; s < 4; ++s) even[s] = load_wide(acc + d + s * kWideLanes);
      const kv_t* row = v + d;
      int64_t j = 0;
      for (; j + 2 <= n; j += 2, row += 2 * stride) {
        vwide x[4], y[4];
        load_slice(row, x);
        load_slice(row + stride, y);
        for (int s = 0; s < 4; ++s) {
          even[s] += p[j] * x[s];
          odd[s] += p[j + 1] * y[s];
        }
      }
      if (j < n) {
        vwide x[4];
        load_slice(row, x);
        for (int s = 0; s < 4; ++s) even[s] += p[j] * x[s];
      }
      for (int s = 0; s < 4; ++s) store_wide(acc + d + s * kWideLanes, even[s] + odd[s]);
    }
    for (; d < dim; d += kWideLanes) {
      vwide a = load_wide(acc + d);
      const kv_t* column = v + d;
      for (int64_t j = 0; j < n; ++j, column += stride) a += p[j] * load_wide(column);
      store_wide(acc + d, a);
    }
  }

  // accumulate for `count` rows that weigh the same values (the query heads of one KV head, for
  // one token): row r adds to acc + r * dim with weights p + r * p_stride. Up to four rows at a
  // time share each value vector's widening, which otherwise costs as much as the FMAs.
  static void accumulate_rows(float* acc, const float* p, int64_t p_stride, int64_t count,
                              const kv_t* v, int64_t n, int64_t stride, int64_t dim) {
    for (int64_t r = 0; r < count; r += 4) {
      float* a = acc + r * dim;
      const float* w = p + r * p_stride;
      switch (std::min<int64_t>(4, count - r)) {
        case 4: rows_of<4>(a, w, p_stride, v, n, stride, dim); break;
        case 3: rows_of<3>(a, w, p_stride, v, n, stride, dim); break;
        case 2: rows_of<2>(a, w, p_stride, v, n, stride, dim); break;
        default: accumulate(a, w, v, n, stride, dim);
      }
    }
  }

  // dst = acc * inverse, one finished row (rounded to bfloat16 as c10's conversion rounds), each
  // whole 64-dim slice put back in order from load_slice's.
  static void finish(scalar_t* dst, const float* acc, float inverse, int64_t dim) {
    int64_t d = 0;
#if defined(__AVX512F__)
    if constexpr (kSlicesInPairs) {
      const __m512i low = interleave_index(0), high = interleave_index(8);
      for (; d + kSlice <= dim; d += kSlice) {
        for (int64_t half = d; half < d + kSlice; half += 2 * kWideLanes) {
          const __m512 even = _mm512_loadu_ps(acc + half);
          const __m512 odd = _mm512_loadu_ps(acc + half + kWideLanes);
          store_wide(dst + half, (vwide)_mm512_permutex2var_ps(even, low, odd) * inverse);
          store_wide(dst + half + kWideLanes,
                     (vwide)_mm512_permutex2var_ps(even, high, odd) * inverse);
        }
      }
    }
#endif
    for (; d < dim; d += kWideLanes) store_wide(dst + d, load_wide(acc + d) * inverse);
  }

 private:
  static constexpr int64_t kSlice = 4 * kWideLanes;  // dims a value pass holds in registers
#if defined(__AVX512F__)
  static constexpr bool kSlicesInPairs = std::is_same_v<scalar_t, c10::BFloat16>;
#else
  static constexpr bool kSlicesInPairs = false;
#endif

  // A 64-dim slice of one value row as four float vectors. bfloat16 comes widened by pairs: each
  // 32-dim half's even dims (its 32-bit lanes' low halves, shifted up), then its odd dims (the
  // high halves, masked), so each half costs one load and two operations where widening 16 dims
  // at a time took a widening load and a shift per 16 (a B=32 decode step's attention: 0.96-0.98x
  // the time). The sums stay in this order until finish puts them back.
  static void load_slice(const kv_t* row, vwide x[4]) {
#if defined(__AVX512F__)
    if constexpr (kSlicesInPairs) {
      const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
      for (int half = 0; half < 2; ++half) {
        const __m512i pairs = _mm512_loadu_si512(row + half * 2 * kWideLanes);
        x[2 * half] = (vwide)_mm512_slli_epi32(pairs, 16);
        x[2 * half + 1] = (vwide)_mm512_and_si512(pairs, high);
      }
      return;
    }
#endif
    for (int s = 0; s < 4; ++s) x[s] = load_wide(row + s * kWideLanes);
  }

#if defined(__AVX512F__)
  // Lanes 2i and 2i + 1: lane first + i of the even and of the odd vector.
  static __m512i interleave_index(int first) {
    alignas(64) int32_t index[kWideLanes];
    for (int i = 0; i < 8; ++i) {
      index[2 * i] = first + i;
      index[2 * i + 1] = kWideLanes + first + i;
    }
    return _mm512_load_si512(index);
  }

  // R rows of rows_scores. Per 16 keys, each 64-byte load holds one pair of dims of them all: its
  // low halves shifted up are the even dim's floats, its high halves masked the odd one's. Each row
  // sums into four vectors (even and odd dims of two pairs), so four chains of FMAs per row
  // overlap. Lanes past n are read as zeros and their scores stored nowhere.
  template <int R>
  static void pair_scores(float* score, int64_t score_stride, const float* q, const kv_t* k,
                          int64_t n, int64_t page, int64_t dim) {
    const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    const auto widen = [&](const kv_t* pairs, __mmask16 lanes, __m512& even, __m512& odd) {
      const __m512i x = _mm512_maskz_loadu_epi32(lanes, pairs);
      even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      odd = _mm512_castsi512_ps(_mm512_and_si512(x, high));
    };
    for (int64_t first = 0; first < n; first += kWideLanes) {
      const __mmask16 lanes = static_cast<__mmask16>(
          n - first >= kWideLanes ? 0xFFFF : (1u << (n - first)) - 1);
      __m512 a[R][4];
      for (int r = 0; r < R; ++r) {
        for (int i = 0; i < 4; ++i) a[r][i] = _mm512_setzero_ps();
      }
      const kv_t* pairs = k + 2 * first;
      for (int64_t d = 0; d < dim; d += 4, pairs += 4 * page) {
        __m512 e0, o0, e1, o1;
        widen(pairs, lanes, e0, o0);
        widen(pairs + 2 * page, lanes, e1, o1);
        for (int r = 0; r < R; ++r) {
          const float* qr = q + r * dim + d;
          a[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(qr[0]), e0, a[r][0]);
          a[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(qr[1]), o0, a[r][1]);
          a[r][2] = _mm512_fmadd_ps(_mm512_set1_ps(qr[2]), e1, a[r][2]);
          a[r][3] = _mm512_fmadd_ps(_mm512_set1_ps(qr[3]), o1, a[r][3]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]),
                                         _mm512_add_ps(a[r][2], a[r][3]));
        _mm512_mask_storeu_ps(score + r * score_stride + first, lanes, sum);
      }
    }
  }
#endif

  // R rows of accumulate_rows: four 16-lane slices of the head at a time (4R accumulators), then
  // any remaining slices one by one.
  template <int R>
  static void rows_of(float* acc, const float* p, int64_t p_stride, const kv_t* v, int64_t n,
                      int64_t stride, int64_t dim) {
    int64_t d = 0;
    for (; d + kSlice <= dim; d += kSlice) {
      vwide a[R][4];
      for (int r = 0; r < R; ++r) {
        for (int s = 0; s < 4; ++s) a[r][s] = load_wide(acc + r * dim + d + s * kWideLanes);
      }
      const kv_t* row = v + d;
      for (int64_t j = 0; j < n; ++j, row += stride) {
        vwide x[4];
        load_slice(row, x);
        for (int r = 0; r < R; ++r) {
          const float w = p[r * p_stride + j];
          for (int s = 0; s < 4; ++s) a[r][s] += w * x[s];
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int s = 0; s < 4; ++s) store_wide(acc + r * dim + d + s * kWideLanes, a[r][s]);
      }
    }
    for (; d < dim; d += kWideLanes) {
      vwide a[R];
      for (int r = 0; r < R; ++r) a[r] = load_wide(acc + r * dim + d);
      const kv_t* column = v + d;
      for (int64_t j = 0; j < n; ++j, column += stride) {
        const vwide x = load_wide(column);
        for (int r = 0; r < R; ++r) a[r] += p[r * p_stride + j] * x;
      }
      for (int r = 0; r < R; ++r) store_wide(acc + r * dim + d, a[r]);
    }
  }

};

}  // namespace baton
