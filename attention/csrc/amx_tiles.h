// What every AMX kernel does first: get the process its tile state, and load each thread's tile
// configuration. Shared by amx_attention.h and the decoder library's amx_linear.cpp, whose tiles
// are all the same shape: 16 rows of 64 bytes.
#pragma once

#if defined(__AMX_TILE__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace baton {

// Linux hands a process the AMX tile state only once asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA); without it the first tile instruction faults. oneDNN asks the same, so asking again
// is harmless.
inline bool amx_tiles_granted() {
  static const bool granted = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

// ldtilecfg's 64-byte operand: palette 1, then each tile's bytes a row and rows.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// All eight tiles 16 rows of 64 bytes, for the calling thread: the tile state is per thread, so
// each worker loads it before its first multiply.
inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  // GCC does not see ldtilecfg read all 64 bytes: inlined into paged attention's worker, it issued
  // the load before the byte counts were stored, and the zero counts faulted. The barrier orders
  // the stores first.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

}  // namespace baton
#endif
