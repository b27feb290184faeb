// What the CPU kernels share: argument checks and 8-lane float vectors (GCC/Clang vector
// extensions, so any target with SIMD gets them) with the loads, sums and exp the kernels need.
// Explicit vectors make horizontal sums and exp vectorise, which plain loops did not.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>

namespace baton {

inline void check_rows(const at::Tensor& t, int64_t dims, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, "'s last dimension must be contiguous");
}

typedef float vfloat __attribute__((vector_size(32)));
typedef int32_t vint __attribute__((vector_size(32)));
typedef uint16_t vhalf __attribute__((vector_size(16)));
constexpr int64_t kLanes = 8;

// A float vector V's worth of lanes read from floats, or from bfloat16 (the top half of a float's
// bits; Bits and Half: V's lanes as int32 and uint16), for any width of V.
template <typename V>
inline V load_lanes(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename Bits, typename Half>
inline V load_lanes(const c10::BFloat16* p) {
  Half h;
  std::memcpy(&h, p, sizeof h);
  const Bits bits = __builtin_convertvector(h, Bits) << 16;
  V v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline vfloat load(const float* p) { return load_lanes<vfloat>(p); }
inline vfloat load(const c10::BFloat16* p) { return load_lanes<vfloat, vint, vhalf>(p); }

// The lane-wise largest of p[0, n - n % kLanes) (n >= kLanes; the tail is the caller's), eight
// lanes at a time (a scalar loop is one dependent max per value). With TrackNan, *nan gets
// all-ones lanes where a NaN was read: a NaN in the first vector keeps its lane, a later one
// never wins one (v > best is false).
template <bool TrackNan = false, typename T>
inline vfloat lanes_largest(const T* p, int64_t n, vint* nan = nullptr) {
  vfloat best = load(p);
  vint seen = best != best;
  for (int64_t j = kLanes; j + kLanes <= n; j += kLanes) {
    const vfloat v = load(p + j);
    best = v > best ? v : best;
    if constexpr (TrackNan) seen |= v != v;
  }
  if constexpr (TrackNan) *nan = seen;
  return best;
}

// The bfloat16 bits of each lane, rounded to nearest even as c10::BFloat16 rounds (a NaN stays a
// quiet NaN), in the low half of each 32-bit lane (Bits: V's lanes as int32, for any width of V).
template <typename Bits, typename V>
inline Bits bfloat16_bits_of(V v) {
  Bits bits;
  std::memcpy(&bits, &v, sizeof bits);
  const Bits rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16;
  const Bits is_nan = (bits & 0x7FFFFFFF) > 0x7F800000;  // all ones where the lane is a NaN
  return ((rounded & 0xFFFF) & ~is_nan) | (0x7FC0 & is_nan);
}

// v rounded to bfloat16 and widened back: what a float takes from a bfloat16 round trip.
template <typename Bits, typename V>
inline V rounded_to_bfloat16(V v) {
  const Bits bits = bfloat16_bits_of<Bits>(v) << 16;
  V out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline vint bfloat16_bits(vfloat v) { return bfloat16_bits_of<vint>(v); }
inline vfloat round_to_bfloat16(vfloat v) { return rounded_to_bfloat16<vint>(v); }

inline void store(c10::BFloat16* p, vfloat v) {
  const vhalf h = __builtin_convertvector(bfloat16_bits(v), vhalf);
  std::memcpy(p, &h, sizeof h);
}

// Ask for the cache line holding p. GCC 12 deletes __builtin_prefetch in a loop that does nothing
// else once it is inlined (the built attention kernel held not one prefetch instruction), so on
// x86 the instruction is written out, where the compiler must keep it.
inline void prefetch(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

inline float horizontal_sum(vfloat v) {
  typedef float quarter __attribute__((vector_size(16)));
  quarter four = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  four += __builtin_shufflevector(four, four, 2, 3, 0, 1);
  return four[0] + four[1];
}

// exp(x) in float lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7
// (relative error < 1e-7), times 2^n built in the exponent bits. x is clamped to [-87, 88], where
// 2^n stays a normal float: below, a softmax weight or a sigmoid is 0 to float precision anyway;
// above, exp overflows float. Any width of V (Bits: its lanes as int32), each lane's result the
// same whatever the width.
template <typename V, typename Bits>
inline V exp_clamped_lanes(V x) {
  const V low = V{} - 87.0f, high = V{} + 88.0f;
  x = x < low ? low : x;
  x = x > high ? high : x;
  const V round = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + round) - round;
  const V r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  V p = V{} + 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const Bits bits = (__builtin_convertvector(n, Bits) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline vfloat exp_clamped(vfloat x) { return exp_clamped_lanes<vfloat, vint>(x); }

}  // namespace baton
