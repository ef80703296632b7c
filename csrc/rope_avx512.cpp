// avx512 build of RoPE (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx512
#include "rope_impl.h"
