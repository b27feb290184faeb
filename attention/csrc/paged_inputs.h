// What paged attention's work runs on: one call's pointers and strides, and the work items its
// threads claim. Shared by paged_attention.cpp's vector maths and amx_attention.h.
#pragma once

#include <cstdint>

#include "key_pairs.h"

namespace baton {

// A tile of one request's new tokens against KV heads [first_head, last_head), each with all the
// query heads sharing it (rows = tokens x group).
struct WorkItem {
  int64_t request, first_token, num_tokens, first_head, last_head, cost;
};

// Pointers and strides of one call, read once so the inner loops see plain integers.
template <typename scalar_t>
struct PagedInputs {
  const scalar_t* query;
  const scalar_t* key_cache;
  const scalar_t* value_cache;
  scalar_t* out;
  const int32_t* block_table;
  const int32_t* cu_seqlens_q;
  const int32_t* context_lens;
  int64_t table_stride, query_token_stride, query_head_stride, out_token_stride, out_head_stride;
  int64_t page_stride, slot_stride, head_stride;
  int64_t page_size, head_dim, group, num_kv_heads;
  double scale;
  bool on_tiles;  // bfloat16 items of a chunk's rows run on AMX tiles (amx_attention.h)

  // Where request b's V (or K of a token-by-token dtype) of position `key`, KV head `head`, lies
  // in `cache`.
  const scalar_t* at(const scalar_t* cache, int64_t b, int64_t key, int64_t head) const {
    const int32_t page = block_table[b * table_stride + key / page_size];
    return cache + page * page_stride + (key % page_size) * slot_stride + head * head_stride;
  }

  // Keys < first_limit(item) + 1 + i are what the item's token i sees (causal, the last new
  // token of its request seeing the whole context).
  int64_t first_limit(const WorkItem& item) const {
    const int64_t q_len = cu_seqlens_q[item.request + 1] - cu_seqlens_q[item.request];
    return context_lens[item.request] - q_len + item.first_token;
  }

  // Row `row` of KV head `head`'s rows of the item (query head head * group + row % group of
  // token row / group): where it lies in query, or in out.
  const scalar_t* query_row(const WorkItem& item, int64_t head, int64_t row) const {
    return query + token_of(item, row) * query_token_stride +
           (head * group + row % group) * query_head_stride;
  }
  scalar_t* out_row(const WorkItem& item, int64_t head, int64_t row) const {
    return out + token_of(item, row) * out_token_stride +
           (head * group + row % group) * out_head_stride;
  }

  // Where KV head `head`'s keys of page `page` start: its slot 0 token by token, or the start of
  // its pairs (key_pairs.h).
  const scalar_t* key_head(int64_t page, int64_t head) const {
    return key_cache + page * page_stride +
           head * (kKeysInPairs<scalar_t> ? page_size * head_dim : head_stride);
  }

 private:
  int64_t token_of(const WorkItem& item, int64_t row) const {
    return cu_seqlens_q[item.request] + item.first_token + row / group;
  }
};

}  // namespace baton
