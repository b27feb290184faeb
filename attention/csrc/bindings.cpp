// The Python module of the CPU kernels (paged_attention.cpp, decoder_ops.cpp).

#include <torch/extension.h>

void paged_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_table,
                     const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens, double scale);
void write_kv(at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& slot_mapping,
              const at::Tensor& key, const at::Tensor& value);
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps);
void rotary_embedding(at::Tensor query, at::Tensor key, const at::Tensor& positions,
                      const at::Tensor& cos, const at::Tensor& sin);
void silu_and_mul(at::Tensor out, const at::Tensor& x);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention);
  m.def("write_kv", &write_kv);
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rotary_embedding", &rotary_embedding);
  m.def("silu_and_mul", &silu_and_mul);
}
