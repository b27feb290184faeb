// Copying whole KV pages between two page pools in one call: swap-outs and swap-ins whose pages
// lie scattered (after churn, no two consecutive) otherwise cost one torch copy_ each, whose
// dispatch (a few microseconds) is a large share of a page's copy. Here the pages are split over
// torch's threads and each copied with one memcpy.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstring>

void copy_pages(at::Tensor dst, const at::Tensor& src, const at::Tensor& dst_pages,
                const at::Tensor& src_pages) {
  TORCH_CHECK(dst.is_cpu() && src.is_cpu(), "copy_pages copies between CPU page pools");
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "page pools must be contiguous");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "page pools must share a dtype");
  TORCH_CHECK(dst.stride(0) == src.stride(0), "page pools must have the same page size");
  TORCH_CHECK(dst_pages.scalar_type() == at::kLong && src_pages.scalar_type() == at::kLong &&
                  dst_pages.is_contiguous() && src_pages.is_contiguous(),
              "page lists must be contiguous int64");
  TORCH_CHECK(dst_pages.numel() == src_pages.numel(), "page lists must pair one to one");
  const int64_t count = dst_pages.numel();
  const int64_t page_bytes = dst.stride(0) * dst.element_size();
  const int64_t* to = dst_pages.data_ptr<int64_t>();
  const int64_t* from = src_pages.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(to[i] >= 0 && to[i] < dst.size(0) && from[i] >= 0 && from[i] < src.size(0),
                "page index out of range");
  }
  char* out = static_cast<char*>(dst.data_ptr());
  const char* in = static_cast<const char*>(src.data_ptr());
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(out + to[i] * page_bytes, in + from[i] * page_bytes, page_bytes);
    }
  });
}
