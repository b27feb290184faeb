// The Python module of the attention kernels (paged_attention.cpp, page_copy.cpp). It includes
// only pybind11 and torch's Tensor casters: torch/extension.h brings the whole C++ frontend, which
// tripled this file's compile time, the longest step of a first build.

#include <torch/csrc/utils/pybind.h>

void paged_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_table,
                     const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens, double scale);
void write_kv(at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& slot_mapping,
              const at::Tensor& key, const at::Tensor& value);
bool use_prompt_tiles(bool enabled);
bool amx_attention_available();
bool float_tiles_available();
void copy_pages(at::Tensor dst, const at::Tensor& src, const at::Tensor& dst_pages,
                const at::Tensor& src_pages);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention);
  m.def("write_kv", &write_kv);
  m.def("copy_pages", &copy_pages);
  m.def("use_prompt_tiles", &use_prompt_tiles);
  m.def("amx_attention_available", &amx_attention_available);
  m.def("float_tiles_available", &float_tiles_available);
  // Addresses of the two kernels for the native executor's layer loop (baton_paged/model/csrc/
  // decoder_loop.cpp), a library of its own in the same process, built against the same torch.
  m.def("write_kv_address", [] { return reinterpret_cast<int64_t>(&write_kv); });
  m.def("paged_attention_address", [] { return reinterpret_cast<int64_t>(&paged_attention); });
}
