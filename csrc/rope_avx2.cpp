// avx2 build of RoPE (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx2
#include "rope_impl.h"
