// avx512 build of the cross-entropy row kernel (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx512
#include "cross_entropy_impl.h"
