// How ``cpu_paged`` lays out bfloat16 K in its pages: each KV head's keys of a page transposed in
// pairs of dims. Dims 2j and 2j + 1 of the key in slot s lie side by side at
//     head start + j * 2 * page_size + 2 * s,      head start = page start + head * page_size * dim
// so one 64-byte load holds one pair of dims for 16 keys. (float32 and float64 pages stay token
// by token: [slot][head][dim].)
//
// Why: a decode row's scores are one dot product per key. With keys token by token, each key's
// products land in the lanes of its own vector, and sixteen keys' vectors need a transposing sum
// (15 shuffle-and-add steps) before their scores sit in one vector; AVX512-BF16 dot products run
// at half the rate of float FMAs on an Intel Xeon (AMX) besides. With the pairs side by side, a
// row's scores for 16 keys are 2 x dim/2 FMAs of widened lanes (a shift and a mask per pair of
// dims, shared by the rows of a query group) into one vector, with no sum across lanes. A B=32
// decode step's attention (SmolLM2's 9/3 heads of 64, context 160) took 0.85x its time. The same
// layout is the right operand of an AMX score multiply (amx_attention.h loads its key tiles from
// the pages as they lie, where it transposed each block first).
//
// Everything that reads or writes K in bfloat16 pages goes through here: paged_attention.cpp's
// write_kv, its gather for torch's attention, and the maths that read pages token by token.
// Other backends' pages (torch, padded, flash) are token by token: pages never move between
// backends, and whole-page copies (swap, prefix sharing, page_copy.cpp) keep any layout.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace baton {

template <typename scalar_t>
constexpr bool kKeysInPairs = std::is_same_v<scalar_t, c10::BFloat16>;

// Where dim `d` of the key in slot `slot` lies from its head's start.
inline int64_t key_pair_offset(int64_t slot, int64_t d, int64_t page_size) {
  return (d / 2) * 2 * page_size + 2 * slot + d % 2;
}

// One key's dims (token order) into its head's pairs, two at a time.
template <typename T>
inline void store_key_pairs(T* head, int64_t slot, const T* key, int64_t dim, int64_t page_size) {
  for (int64_t d = 0; d < dim; d += 2) {
    std::memcpy(head + key_pair_offset(slot, d, page_size), key + d, 2 * sizeof(T));
  }
}

// One key's dims back in token order, as T (pairs copied whole where T is the pages' type).
template <typename T, typename Page>
inline void load_key_pairs(T* key, const Page* head, int64_t slot, int64_t dim,
                           int64_t page_size) {
  for (int64_t d = 0; d < dim; d += 2) {
    const Page* pair = head + key_pair_offset(slot, d, page_size);
    if constexpr (std::is_same_v<T, Page>) {
      std::memcpy(key + d, pair, 2 * sizeof(T));
    } else {
      key[d] = static_cast<T>(pair[0]);
      key[d + 1] = static_cast<T>(pair[1]);
    }
  }
}

}  // namespace baton
