// Runtime ISA detection (CPUID + XGETBV): which kernel variant a machine can run.
#pragma once

namespace pyengine {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa();                 // what this CPU (and OS) supports
Isa active_isa();               // best_isa() capped by set_isa_cap (for tests)
void set_isa_cap(Isa cap);
const char* isa_name(Isa isa);

// The variant of a kernel (function pointer or table of them) for the active ISA.
template <typename Fn>
Fn pick_isa(Fn scalar_fn, Fn avx2_fn, Fn avx512_fn) {
  switch (active_isa()) {
    case Isa::kAvx512: return avx512_fn;
    case Isa::kAvx2: return avx2_fn;
    default: return scalar_fn;
  }
}

// AMX bf16 tiles (bf16 attention): CPUID AMX-TILE + AMX-BF16, the OS enables the tile state
// (XCR0) and grants it to this process (Linux arch_prctl, requested once).  Used only on
// top of avx512 (active_isa() == kAvx512) and while set_amx(true) (default; tests switch
// it off to run the fp32 tile loops on bf16 inputs).
bool has_amx();
bool amx_active();
void set_amx(bool on);

}  // namespace pyengine
