// WideMath: paged attention's per-row math on 16-lane float vectors, for heads whose size is a
// multiple of 16 (float32: 64, 80, 96, 128, ...; bfloat16 with AVX512-BF16 dot products: a
// multiple of 32, so 80 and 112 stay on 8 lanes).
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
// What else differs from VectorMath: bfloat16 K/V is never widened into scratch. Where the CPU
// has AVX512-BF16, scores are bfloat16 dot products of the unscaled bfloat16 query and the keys
// as they lie (``vdpbf16ps``: exact products summed in float), scaled afterwards; values are
// widened in registers as they are read (a bfloat16 is the top half of a float's bits).
//
// Only on AVX-512 builds: elsewhere GCC lowers each 16-lane vector with spills (a review built it
// for AVX2 and measured 4.5-6.7x the 8-lane kernel's time), so ``fits`` refuses and VectorMath
// runs. Without AVX512-BF16, bfloat16 scores widen the keys in registers too.
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
// the bit.
inline void store_silu_and_mul(c10::BFloat16* dst, vwide gate, vwide up) {
  store_wide(dst, rounded_wide(gate / (1.0f + exp_wide(-gate))) * up);
}

// The same interface as paged_attention.cpp's ScalarMath and VectorMath.
template <typename scalar_t>
struct WideMath {
  using acc_t = float;
  using kv_t = scalar_t;  // pages are read as they lie
#if defined(__AVX512BF16__)
  static constexpr bool kBf16Dots = std::is_same_v<scalar_t, c10::BFloat16>;
#else
  static constexpr bool kBf16Dots = false;
#endif
  // bfloat16 dot products take the query as it came, unscaled; float math takes it scaled.
  using query_t = std::conditional_t<kBf16Dots, c10::BFloat16, float>;

#if defined(__AVX512F__)
  static bool fits(int64_t dim) { return dim % (kBf16Dots ? 2 * kWideLanes : kWideLanes) == 0; }
#else
  static bool fits(int64_t) { return false; }
#endif

  static const kv_t* view(const scalar_t* page, int64_t, int64_t stride, int64_t, kv_t*,
                          int64_t& view_stride) {
    view_stride = stride;
    return page;
  }

  static void load_query(query_t* dst, const scalar_t* src, int64_t dim, double scale) {
    for (int64_t d = 0; d < dim; ++d) {
      if constexpr (kBf16Dots) {
        dst[d] = src[d];
      } else {
        dst[d] = static_cast<float>(src[d]) * scale;
      }
    }
  }

  // score[j] = q . k_j (times scale where the query was left unscaled): sixteen keys at a time,
  // their sums gathered into one vector; the rest one by one.
  static void scores(float* score, const query_t* q, const kv_t* k, int64_t n, int64_t stride,
                     int64_t dim, float scale) {
    int64_t j = 0;
    for (; j + kWideLanes <= n; j += kWideLanes, k += kWideLanes * stride) {
      vwide a[kWideLanes] = {};
      for (int64_t d = 0; d < dim; d += step()) {
        for (int64_t i = 0; i < kWideLanes; ++i) a[i] = dot(a[i], q + d, k + i * stride + d);
      }
      const vwide sums = sum_each_wide(a);
      store_wide(score + j, kBf16Dots ? sums * scale : sums);
    }
    for (; j < n; ++j, k += stride) {
      vwide sum = {};
      for (int64_t d = 0; d < dim; d += step()) sum = dot(sum, q + d, k + d);
      score[j] = kBf16Dots ? wide_sum(sum) * scale : wide_sum(sum);
    }
  }

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

  // acc += sum_j p[j] v_j: four 16-lane slices of the head at a time, two keys at a time into two
  // sets of accumulators (eight independent FMA chains), then any remaining slices one by one.
  static void accumulate(float* acc, const float* p, const kv_t* v, int64_t n, int64_t stride,
                         int64_t dim) {
    constexpr int64_t kSlice = 4 * kWideLanes;
    int64_t d = 0;
    for (; d + kSlice <= dim; d += kSlice) {
      vwide even[4], odd[4] = {};
      for (int s = 0; s < 4; ++s) even[s] = load_wide(acc + d + s * kWideLanes);
      const kv_t* row = v + d;
      int64_t j = 0;
      for (; j + 2 <= n; j += 2, row += 2 * stride) {
        for (int s = 0; s < 4; ++s) {
          even[s] += p[j] * load_wide(row + s * kWideLanes);
          odd[s] += p[j + 1] * load_wide(row + stride + s * kWideLanes);
        }
      }
      if (j < n) {
        for (int s = 0; s < 4; ++s) even[s] += p[j] * load_wide(row + s * kWideLanes);
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

 private:
  // R rows of accumulate_rows: four 16-lane slices of the head at a time (4R accumulators), then
  // any remaining slices one by one.
  template <int R>
  static void rows_of(float* acc, const float* p, int64_t p_stride, const kv_t* v, int64_t n,
                      int64_t stride, int64_t dim) {
    constexpr int64_t kSlice = 4 * kWideLanes;
    int64_t d = 0;
    for (; d + kSlice <= dim; d += kSlice) {
      vwide a[R][4];
      for (int r = 0; r < R; ++r) {
        for (int s = 0; s < 4; ++s) a[r][s] = load_wide(acc + r * dim + d + s * kWideLanes);
      }
      const kv_t* row = v + d;
      for (int64_t j = 0; j < n; ++j, row += stride) {
        vwide x[4];
        for (int s = 0; s < 4; ++s) x[s] = load_wide(row + s * kWideLanes);
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

  static constexpr int64_t step() { return kBf16Dots ? 2 * kWideLanes : kWideLanes; }

  // sum + q[0:step] * k[0:step], lane-wise (bfloat16: pairs of products per float lane).
  static vwide dot(vwide sum, const query_t* q, const kv_t* k) {
#if defined(__AVX512BF16__)
    if constexpr (kBf16Dots) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q);
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(k);
      return (vwide)_mm512_dpbf16_ps((__m512)sum, qv, kv);
    }
#endif
    if constexpr (!kBf16Dots) return sum + load_wide(q) * load_wide(k);
    return sum;  // unreachable: kBf16Dots implies __AVX512BF16__
  }
};

}  // namespace baton
