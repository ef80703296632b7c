// avx2 build of the decode step's attention (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx2
#include "decode_impl.h"
