// AMX tile registers for the calling thread: 8 tiles of 16 rows x 64 bytes while alive
// (palette 1).  Shared by the AMX builds (attention_amx.cpp, quant_amx.cpp); include only
// from a TU compiled with -mamx-tile.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace pyengine {

struct AmxTiles {
  AmxTiles() {
    alignas(64) uint8_t cfg[64] = {};
    cfg[0] = 1;  // palette
    for (int t = 0; t < 8; ++t) {
      cfg[16 + 2 * t] = 64;  // bytes per row
      cfg[48 + t] = 16;      // rows
    }
    _tile_loadconfig(cfg);
  }
  ~AmxTiles() { _tile_release(); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// Tiles 0-3 accumulate a 32 x 32 fp32 block of C (rows ldc floats apart) as 2 x 2 tiles of
// 16 x 16: start it at zero or from C, and store it back.
inline void c_block_start(float* c, int64_t ldc, bool zero) {
  if (zero) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, ldc * 4);
    _tile_loadd(1, c + 16, ldc * 4);
    _tile_loadd(2, c + 16 * ldc, ldc * 4);
    _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
  }
}

inline void c_block_store(float* c, int64_t ldc) {
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  _tile_stored(2, c + 16 * ldc, ldc * 4);
  _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
}

}  // namespace pyengine
