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

}  // namespace pyengine
