// avx2 build of the fused low-rank row pass (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx2
#include "lowrank_rows_impl.h"
