// avx2 build of the quantized matmul (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx2
#include "quant_impl.h"
