// The small per-layer ops of a Llama-family decoder, each one pass over its data: RMSNorm,
// residual add fused with RMSNorm, rotary embedding, SiLU-and-mul. Each follows Hugging Face's
// op order and dtypes, so the native executor's tokens equal HF generate's. Built on first use
// as a library of their own (baton_paged/model/decoder_kernels.py), with this file's Python module.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>

// pybind11 and torch's Tensor casters only (not torch/extension.h): see attention/csrc/bindings.cpp
#include <torch/csrc/utils/pybind.h>

#include "cpu_common.h"
#include "decoder_ops.h"
#include "wide_math.h"

using namespace baton;

namespace {

// Hugging Face's Llama RMSNorm, step for step: normalise in float32 (for every input dtype),
// cast back, then scale by the weight in the input dtype.
template <typename scalar_t>
void rms_norm_row(scalar_t* dst, const scalar_t* x, const scalar_t* weight, int64_t n,
                  double eps) {
  float squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < n; ++i) squares += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  const float inv = 1.0f / std::sqrt(squares / n + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = weight[i] * static_cast<scalar_t>(static_cast<float>(x[i]) * inv);
  }
}

// One head of one token rotated in place: v the head's D values, c and s its position's rows.
// bfloat16 heads run in 16-lane float vectors where the build has AVX-512, each product rounded
// to bfloat16 and then their sum, where c10::BFloat16's operators round (a product of two
// bfloat16 values is exact in float), so every bit is the scalar loop's, which takes the tail.
// Element by element, each operator a round trip through float, SmolLM2's 286-token prefill
// took 69 us a layer here, 2.4x float32's (48 us in vectors).
template <typename scalar_t>
void rotate_head(scalar_t* v, const scalar_t* c, const scalar_t* s, int64_t half) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    for (; i + kWideLanes <= half; i += kWideLanes) {
      const vwide lo = load_wide(v + i), hi = load_wide(v + i + half);
      const vwide low_cos = rounded_wide(lo * load_wide(c + i));
      const vwide high_sin = rounded_wide(hi * load_wide(s + i));
      const vwide high_cos = rounded_wide(hi * load_wide(c + i + half));
      const vwide low_sin = rounded_wide(lo * load_wide(s + i + half));
      store_wide(v + i, low_cos - high_sin);
      store_wide(v + i + half, high_cos + low_sin);
    }
  }
#endif
  for (; i < half; ++i) {
    const scalar_t lo = v[i], hi = v[i + half];
    v[i] = lo * c[i] - hi * s[i];
    v[i + half] = hi * c[i + half] + lo * s[i + half];
  }
}

}  // namespace

// out = RMSNorm(x) * weight, row by row.
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, 2, "x");
  check_rows(out, 2, "out");
  const int64_t n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        rms_norm_row(out.data_ptr<scalar_t>() + t * out.stride(0),
                     x.data_ptr<scalar_t>() + t * x.stride(0), weight.data_ptr<scalar_t>(), n, eps);
      }
    });
  });
}

// residual += x; x = RMSNorm(residual) * weight (both in place): a decoder layer's residual
// add fused with the next norm, so the hidden state is read once.
void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_rows(x, 2, "x");
  check_rows(residual, 2, "residual");
  const int64_t n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* h = x.data_ptr<scalar_t>() + t * x.stride(0);
        scalar_t* r = residual.data_ptr<scalar_t>() + t * residual.stride(0);
        for (int64_t i = 0; i < n; ++i) r[i] = r[i] + h[i];
        rms_norm_row(h, r, weight.data_ptr<scalar_t>(), n, eps);
      }
    });
  });
}

// Rotary embedding in place, rotate-half (GPT-NeoX / Llama) layout: for i < D/2,
// (x_i, x_{i+D/2}) <- (x_i cos - x_{i+D/2} sin, x_{i+D/2} cos + x_i sin), with cos/sin rows
// [max_position, D] indexed by each token's position.
void rotary_embedding(at::Tensor query, at::Tensor key, const at::Tensor& positions,
                      const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(query, 3, "query");
  check_rows(key, 3, "key");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "positions must be contiguous int64");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "cos and sin tables must be contiguous");
  const int64_t dim = query.size(2), half = dim / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, query.scalar_type(), "rotary_embedding", [&] {
    struct Heads {  // query's or key's heads: where each token's start, how many, how far apart
      scalar_t* data;
      int64_t count, token_stride, head_stride;
    };
    const Heads both[2] = {
        {query.data_ptr<scalar_t>(), query.size(1), query.stride(0), query.stride(1)},
        {key.data_ptr<scalar_t>(), key.size(1), key.stride(0), key.stride(1)}};
    const scalar_t* cos_rows = cos.data_ptr<scalar_t>();
    const scalar_t* sin_rows = sin.data_ptr<scalar_t>();
    at::parallel_for(0, query.size(0), 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cos_rows + pos[t] * dim;
        const scalar_t* s = sin_rows + pos[t] * dim;
        for (const Heads& x : both) {
          for (int64_t h = 0; h < x.count; ++h) {
            rotate_head(x.data + t * x.token_stride + h * x.head_stride, c, s, half);
          }
        }
      }
    });
  });
}

namespace {

template <typename scalar_t>
void silu_and_mul_row(scalar_t* dst, const scalar_t* gate, const scalar_t* up, int64_t width) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const acc_t g = static_cast<acc_t>(gate[i]);
    const scalar_t activated = static_cast<scalar_t>(g / (acc_t(1) + std::exp(-g)));
    dst[i] = activated * up[i];
  }
}

// The float row in 8-lane vectors (libm's expf is a call per element, which no loop of it
// vectorises), any tail element by element.
inline void silu_and_mul_row(float* dst, const float* gate, const float* up, int64_t width) {
  int64_t i = 0;
  for (; i + kLanes <= width; i += kLanes) {
    const vfloat g = load(gate + i);
    const vfloat out = g / (1.0f + exp_clamped(-g)) * load(up + i);
    std::memcpy(dst + i, &out, sizeof out);
  }
  for (; i < width; ++i) dst[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// The bfloat16 row in 16-lane float vectors where the build has AVX-512 (else 8), with the
// generic loop's roundings: silu rounded to bfloat16, then the product rounded, each to nearest
// even as c10 rounds (cpu_common.h's bfloat16_bits_of). Element by element, with a libm call
// each, it took 9x the float row's time; in 8-lane vectors, with their bit-exact roundings, still
// 3x (172 us for 214 rows of SmolLM2's 1536, 2 threads, Intel Xeon with AMX); in 16, 148 us, and
// 110 once exp_wide ran in one pass rather than two halves. Most of the rest is the exp and the
// division; where the CPU has AVX512-BF16 the two roundings are its own conversion (wide_math.h's
// store_silu_and_mul: the same bits but for denormal results, which it flushes).
inline void silu_and_mul_row(c10::BFloat16* dst, const c10::BFloat16* gate,
                             const c10::BFloat16* up, int64_t width) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + kWideLanes <= width; i += kWideLanes) {
    store_silu_and_mul(dst + i, load_wide(gate + i), load_wide(up + i));
  }
#endif
  for (; i + kLanes <= width; i += kLanes) {
    const vfloat g = load(gate + i);
    store(dst + i, round_to_bfloat16(g / (1.0f + exp_clamped(-g))) * load(up + i));
  }
  for (; i < width; ++i) {
    const float g = static_cast<float>(gate[i]);
    const c10::BFloat16 activated(g / (1.0f + std::exp(-g)));
    dst[i] = activated * up[i];
  }
}

}  // namespace

// out[T, I] = silu(x[:, :I]) * x[:, I:]: the gated MLP's activation on one gate-up matmul.
void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  check_rows(x, 2, "x");
  check_rows(out, 2, "out");
  const int64_t width = out.size(1);
  TORCH_CHECK(x.size(1) == 2 * width, "x must be [T, 2 * I] for out [T, I]");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "silu_and_mul", [&] {
    at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* gate = x.data_ptr<scalar_t>() + t * x.stride(0);
        silu_and_mul_row(out.data_ptr<scalar_t>() + t * out.stride(0), gate, gate + width, width);
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rotary_embedding", &rotary_embedding);
  m.def("silu_and_mul", &silu_and_mul);
  m.def("group_int8_linear", &group_int8_linear);
  m.def("row_argmax", &row_argmax);
#ifdef __AVX512F__
  m.def("blocked_linear", &blocked_linear, py::arg("x"), py::arg("packed"), py::arg("bias"),
        py::arg("scale") = py::none(), py::arg("zero") = py::none());
  m.def("blocked_silu_linear", &blocked_silu_linear, py::arg("x"), py::arg("packed"));
#endif
#ifdef BATON_AMX
  m.def("amx_linear_usable", &amx_linear_usable);
  m.def("amx_linear", &amx_linear, py::arg("x"), py::arg("packed"), py::arg("bias"));
  m.def("amx_silu_linear", &amx_silu_linear, py::arg("x"), py::arg("packed"));
#endif
  m.def("decoder_layers", &decoder_layers, py::call_guard<py::gil_scoped_release>());
}
