// avx512 build of the decode step's attention (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx512
#include "decode_impl.h"
