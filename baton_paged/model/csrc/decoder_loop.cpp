// The native executor's decoder layers in one C++ call: per layer the fused norm, QKV matmul,
// rotary embedding, K/V write, paged attention, output matmul, norm, gate-up matmul, SiLU-and-mul
// and down matmul, the same calls in the same order as the Python loop in llama_executor.py, so
// their results are the same to the bit (where the AMX or the column-block kernel reads the
// gate-up weights, it and SiLU-and-mul are one pass, to the same bits: Linears::activated). Why:
// at decode sizes each of a layer's ~15 calls cost microseconds of Python and dispatch around a
// kernel of tens of us (measured: the small Llama's B=32 bfloat16 decode forward 4.8 -> ~4.3 ms),
// and the loop holds no GIL while it runs.
//
// The matmuls are float32, int8 or 4-bit ones in column blocks (blocked_linear.cpp), bfloat16 ones
// on AMX tiles (amx_linear.cpp), or go through torch's dispatcher to oneDNN
// (mkldnn::_linear_pointwise on the weights oneDNN packed), their rows padded to the buckets the
// caller passes (baton_paged/model/row_buckets.py). Attention is the cpu_paged backend's kernels,
// in the attention library: that library hands over their addresses (attention/csrc/bindings.cpp),
// so they are called directly, in the same process and against the same torch, with no trip
// through Python.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "decoder_ops.h"

namespace {

// The attention library's functions (attention/csrc/paged_attention.cpp), by address.
using PagedAttention = void (*)(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, double);
using WriteKV = void (*)(at::Tensor, at::Tensor, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&);

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// x @ W.T (+ b): PackedLinear.__call__ (packed_linear.py) step for step. A bfloat16 weight in
// pair blocks goes to amx_linear.cpp, one in column blocks (float32, or int8 codes with their
// scale) to blocked_linear.cpp, as they are; one oneDNN packed, with x's rows padded with zeros to
// their bucket, in chunks of the largest bucket beyond it.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& zero, const std::vector<int64_t>& buckets) {
#ifdef BATON_AMX
  if (packed.dim() == 4) return amx_linear(x, packed, bias);
#endif
#ifdef __AVX512F__
  if (!packed.is_mkldnn()) return blocked_linear(x, packed, bias, scale, zero);
#endif
  const int64_t rows = x.size(0), largest = buckets.back();
  if (rows > largest) {
    at::Tensor out = at::empty({rows, packed.size(0)}, x.options());
    for (int64_t start = 0; start < rows; start += largest) {
      const int64_t n = std::min(largest, rows - start);
      const at::Tensor part = linear(x.narrow(0, start, n), packed, bias, scale, zero, buckets);
      out.narrow(0, start, n).copy_(part);
    }
    return out;
  }
  const int64_t bucket = rows ? *std::lower_bound(buckets.begin(), buckets.end(), rows) : 0;
  if (bucket == rows) return onednn_linear(x, packed, bias);
  at::Tensor padded = at::zeros({bucket, x.size(1)}, x.options());
  padded.narrow(0, 0, rows).copy_(x);
  return onednn_linear(padded, packed, bias).narrow(0, 0, rows);
}

// The layers' linears as llama_executor._loop_weights lists them: linear i reads weights[i]
// (float32 column blocks, bfloat16 pair blocks, oneDNN's packing, or int8 / 4-bit codes alone:
// QuantizedLinear with no dense copy), or its codes[i] for up to code_rows[i] rows where it has
// both (QuantizedLinear); scales[i] and zeros[i] (grouped codes' offsets) go with whichever codes
// it reads.
struct Linears {
  const std::vector<at::Tensor>& weights;
  const std::vector<std::optional<at::Tensor>>& codes;
  const std::vector<std::optional<at::Tensor>>& scales;
  const std::vector<std::optional<at::Tensor>>& zeros;
  const std::vector<std::optional<at::Tensor>>& biases;
  const std::vector<int64_t>& code_rows;
  const std::vector<int64_t>& buckets;

  const at::Tensor& read(const at::Tensor& x, int64_t i) const {  // what linear i reads for x
    return codes[i] && x.size(0) <= code_rows[i] ? *codes[i] : weights[i];
  }

  at::Tensor operator()(const at::Tensor& x, int64_t i) const {
    const at::Tensor& packed = read(x, i);
    const bool coded = packed.scalar_type() == at::kChar || packed.scalar_type() == at::kByte;
    const std::optional<at::Tensor> none;
    return linear(x, packed, biases[i], coded ? scales[i] : none, coded ? zeros[i] : none,
                  buckets);
  }

  // silu_and_mul of gate-up linear i: in the matmul's own pass where gate and up split at a
  // block, the AMX kernel's on bfloat16 pair blocks or the column-block kernel's on float32
  // blocks (the same bits; no gate-up rows written, then read back by both threads: SmolLM2's
  // bfloat16 decode step 0.95x the time at B=32 and 0.96x at B=4, interleaved), else two calls.
  at::Tensor activated(const at::Tensor& x, int64_t i) const {
    const at::Tensor& packed = read(x, i);
    const bool splits = packed.size(0) % 2 == 0 && !biases[i];
#ifdef BATON_AMX
    if (packed.dim() == 4 && splits) return amx_silu_linear(x, packed);
#endif
#ifdef __AVX512F__
    if (packed.dim() == 3 && !packed.is_mkldnn() && packed.scalar_type() == at::kFloat &&
        x.scalar_type() == at::kFloat && splits) {
      return blocked_silu_linear(x, packed);
    }
#endif
    const at::Tensor gate_up = (*this)(x, i);
    at::Tensor out = at::empty({x.size(0), gate_up.size(1) / 2}, gate_up.options());
    silu_and_mul(out, gate_up);
    return out;
  }
};

}  // namespace

// residual [T, hidden]: the embedded tokens in, the residual stream after the last layer out (in
// place); returns the last layer's output, which the caller adds and norms with the final norm.
// Per layer l: norms[2l], norms[2l + 1] (input, post-attention); linears 4l .. 4l + 3 (QKV,
// output, gate-up, down: weights, codes, scales, zeros and biases alike, Linears above); keys[l],
// values[l] its pages.
at::Tensor decoder_layers(at::Tensor residual, const std::vector<at::Tensor>& norms,
                          const std::vector<at::Tensor>& weights,
                          const std::vector<std::optional<at::Tensor>>& codes,
                          const std::vector<std::optional<at::Tensor>>& scales,
                          const std::vector<std::optional<at::Tensor>>& zeros,
                          const std::vector<std::optional<at::Tensor>>& biases,
                          const std::vector<int64_t>& code_rows,
                          const std::vector<int64_t>& buckets, const at::Tensor& positions,
                          const at::Tensor& cos, const at::Tensor& sin,
                          const std::vector<at::Tensor>& keys,
                          const std::vector<at::Tensor>& values, const at::Tensor& slot_mapping,
                          const at::Tensor& block_table, const at::Tensor& cu_seqlens_q,
                          const at::Tensor& context_lens, int64_t num_heads, double scale,
                          double eps, int64_t write_kv_address, int64_t paged_attention_address) {
  const int64_t layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(layers > 0 && values.size() == keys.size() &&
                  norms.size() == static_cast<size_t>(2 * layers) &&
                  weights.size() == static_cast<size_t>(4 * layers) &&
                  codes.size() == weights.size() && scales.size() == weights.size() &&
                  zeros.size() == weights.size() && code_rows.size() == weights.size() &&
                  biases.size() == weights.size() && !buckets.empty(),
              "decoder_layers: 2 norms, 4 linears a layer, one K and V each");
  const Linears linear{weights, codes, scales, zeros, biases, code_rows, buckets};
  const auto write_kv = reinterpret_cast<WriteKV>(write_kv_address);
  const auto paged_attention = reinterpret_cast<PagedAttention>(paged_attention_address);
  const int64_t tokens = residual.size(0), kv_heads = keys[0].size(2), dim = keys[0].size(3);
  const int64_t q_width = num_heads * dim, kv_width = kv_heads * dim;
  at::Tensor hidden = at::empty_like(residual);
  rms_norm(hidden, residual, norms[0], eps);
  for (int64_t l = 0; l < layers; ++l) {
    if (l) add_rms_norm(hidden, residual, norms[2 * l], eps);
    const at::Tensor qkv = linear(hidden, 4 * l);
    at::Tensor query = qkv.narrow(1, 0, q_width).view({tokens, num_heads, dim});
    at::Tensor key = qkv.narrow(1, q_width, kv_width).view({tokens, kv_heads, dim});
    const at::Tensor value = qkv.narrow(1, q_width + kv_width, kv_width).view({tokens, kv_heads, dim});
    rotary_embedding(query, key, positions, cos, sin);
    write_kv(keys[l], values[l], slot_mapping, key, value);
    at::Tensor attended = at::empty({tokens, num_heads, dim}, query.options());
    paged_attention(attended, query, keys[l], values[l], block_table, cu_seqlens_q, context_lens,
                    scale);
    hidden = linear(attended.view({tokens, q_width}), 4 * l + 1);
    add_rms_norm(hidden, residual, norms[2 * l + 1], eps);
    hidden = linear(linear.activated(hidden, 4 * l + 2), 4 * l + 3);
  }
  return hidden;
}
