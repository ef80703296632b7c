// Runtime ISA detection (CPUID + XGETBV): which kernel variant a machine can run.
#pragma once

namespace pyengine {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa();                 // what this CPU (and OS) supports
Isa active_isa();               // best_isa() capped by set_isa_cap (for tests)
void set_isa_cap(Isa cap);
const char* isa_name(Isa isa);

}  // namespace pyengine
