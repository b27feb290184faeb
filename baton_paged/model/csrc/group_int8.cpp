// out = x @ w.T for a few rows of x, w stored as int8 codes with a float32 scale and offset per
// group of 16 or 32 inputs: w[n, k] = codes[n, k] * scale[n, g] + zero[n, g], g = k / group.
// GGUF's 5-, 6- and 8-bit formats are exactly such groups (Q5_0, Q6_K, Q8_0:
// gguf_int8_blocks.py), which torch's int8 kernel (one scale per output row) cannot hold. A decode
// step reads each weight once, so this is a matrix-vector kernel: the codes are widened in
// registers, scaled and offset with one FMA and multiplied into every row of x. Built with the
// decoder's ops (baton_paged/model/decoder_kernels.py), whose module binds it.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"

namespace {

// 16 lanes where the CPU has AVX-512 (one register), else 8 (wider vectors spill on AVX2).
#ifdef __AVX512F__
constexpr int64_t kWidth = 16;
#else
constexpr int64_t kWidth = 8;
#endif
typedef float wfloat __attribute__((vector_size(4 * kWidth)));
typedef int8_t wcode __attribute__((vector_size(kWidth)));
typedef int32_t wint __attribute__((vector_size(4 * kWidth)));
constexpr int64_t kMaxRows = 8;

// kWidth codes as floats: one sign extension and one conversion. Written out for x86, where GCC
// turns __builtin_convertvector from int8 lanes into a scalar loop (4x slower than torch's int8
// kernel on SmolLM2's projections).
inline wfloat widened(const int8_t* codes) {
#if defined(__AVX512F__)
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)codes)));
#elif defined(__AVX2__)
  const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)codes)));
#else
  wcode c;
  std::memcpy(&c, codes, sizeof c);
  const wfloat v = __builtin_convertvector(__builtin_convertvector(c, wint), wfloat);
#endif
  wfloat out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}

inline wfloat load_wide(const float* p) {
  wfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float lane_sum(wfloat v) {
#if defined(__AVX512F__)
  const baton::vfloat low = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const baton::vfloat high = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return baton::horizontal_sum(low + high);
#else
  return baton::horizontal_sum(v);
#endif
}

// One output column for every row of x ([Rows, k] float). Rows is a template argument so that
// the accumulators stay in registers; two a row, taking alternate runs of kWidth inputs, as one
// chain of dependent additions left the loop waiting on the FMA's latency. Each run's weights are
// code * scale + zero, one FMA: the offsets cost nothing after the loop.
template <int64_t Rows, typename scalar_t>
void column(scalar_t* out, int64_t out_stride, const float* x, int64_t k, const int8_t* codes,
            const float* scale, const float* zero, int shift) {
  wfloat acc[Rows][2] = {};
  for (int64_t i = 0; i < k; i += 2 * kWidth) {  // group is kWidth or a multiple: a run, a scale
    const int64_t g0 = i >> shift, g1 = (i + kWidth) >> shift;
    const wfloat w0 = widened(codes + i) * scale[g0] + zero[g0];
    const wfloat w1 = widened(codes + i + kWidth) * scale[g1] + zero[g1];
#pragma GCC unroll 8
    for (int64_t r = 0; r < Rows; ++r) {
      acc[r][0] += load_wide(x + r * k + i) * w0;
      acc[r][1] += load_wide(x + r * k + i + kWidth) * w1;
    }
  }
  for (int64_t r = 0; r < Rows; ++r) {
    out[r * out_stride] = static_cast<scalar_t>(lane_sum(acc[r][0] + acc[r][1]));
  }
}

template <int64_t Rows, typename scalar_t>
void columns(scalar_t* out, int64_t out_stride, const float* x, int64_t k, const int8_t* codes,
             const float* scale, const float* zero, int64_t n, int64_t group) {
  const int64_t groups = k / group;
  const int shift = __builtin_ctzll(group);  // group is a power of two: no division in the loop
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) {
      column<Rows>(out + col, out_stride, x, k, codes + col * k, scale + col * groups,
                   zero + col * groups, shift);
    }
  });
}

}  // namespace

void group_int8_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& codes,
                       const at::Tensor& scale, const at::Tensor& zero, int64_t group) {
  baton::check_rows(x, 2, "x");
  baton::check_rows(out, 2, "out");
  const int64_t rows = x.size(0), k = x.size(1), n = codes.size(0);
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "1 to ", kMaxRows, " rows, got ", rows);
  TORCH_CHECK(group >= kWidth && (group & (group - 1)) == 0 && k % group == 0 &&
                  k % (2 * kWidth) == 0,
              "group ", group, " (a power of two, ", kWidth, "+) misfits k ", k);
  for (const at::Tensor* t : {&codes, &scale, &zero}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->is_contiguous(),
                "codes, scale and zero must be contiguous 2-D CPU tensors");
  }
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.size(1) == k, "codes must be int8 [n, k]");
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->size(0) == n && t->size(1) == k / group,
                "scale and zero must be float32 [n, k / group]");
  }
  TORCH_CHECK(out.size(0) == rows && out.size(1) == n && out.scalar_type() == x.scalar_type());
  std::vector<float> x_float(rows * k);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "group_int8_linear", [&] {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = x.data_ptr<scalar_t>() + r * x.stride(0);
      for (int64_t i = 0; i < k; ++i) x_float[r * k + i] = static_cast<float>(row[i]);
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t stride = out.stride(0);
    const float *xf = x_float.data(), *sc = scale.data_ptr<float>();
    const float* z = zero.data_ptr<float>();
    const int8_t* c = codes.data_ptr<int8_t>();
    switch (rows) {
      case 1: columns<1>(o, stride, xf, k, c, sc, z, n, group); break;
      case 2: columns<2>(o, stride, xf, k, c, sc, z, n, group); break;
      case 3: columns<3>(o, stride, xf, k, c, sc, z, n, group); break;
      case 4: columns<4>(o, stride, xf, k, c, sc, z, n, group); break;
      case 5: columns<5>(o, stride, xf, k, c, sc, z, n, group); break;
      case 6: columns<6>(o, stride, xf, k, c, sc, z, n, group); break;
      case 7: columns<7>(o, stride, xf, k, c, sc, z, n, group); break;
      default: columns<8>(o, stride, xf, k, c, sc, z, n, group); break;
    }
  });
}
