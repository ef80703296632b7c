#include "cpu_features.h"

#include <atomic>
#include <cpuid.h>
#include <cstdint>
#include <sys/syscall.h>
#include <unistd.h>

namespace pyengine {
namespace {

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

Isa detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::kScalar;
  bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return Isa::kScalar;
  uint64_t xcr0 = xgetbv0();
  bool ymm_os = (xcr0 & 0x6) == 0x6, zmm_os = (xcr0 & 0xe6) == 0xe6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::kScalar;
  bool avx2 = b & (1u << 5);
  bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
       avx512vl = b & (1u << 31), vnni = c & (1u << 11);
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  bool bf16 = a1 & (1u << 5);
  if (zmm_os && avx512f && avx512dq && avx512bw && avx512vl && vnni && bf16 && fma && f16c)
    return Isa::kAvx512;
  if (ymm_os && avx2 && fma && f16c) return Isa::kAvx2;
  return Isa::kScalar;
}

std::atomic<int> g_cap{int(Isa::kAvx512)};
std::atomic<bool> g_amx{true};

bool detect_amx() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  const uint64_t tile_state = (1ull << 17) | (1ull << 18);  // XTILECFG, XTILEDATA
  if (!tile || !bf16 || (xgetbv0() & tile_state) != tile_state) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace

Isa best_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  int best = int(best_isa()), cap = g_cap.load();
  return Isa(best < cap ? best : cap);
}

void set_isa_cap(Isa cap) { g_cap.store(int(cap)); }

bool has_amx() {
  static const bool amx = best_isa() == Isa::kAvx512 && detect_amx();
  return amx;
}

bool amx_active() { return g_amx.load() && active_isa() == Isa::kAvx512 && has_amx(); }

void set_amx(bool on) { g_amx.store(on); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace pyengine
