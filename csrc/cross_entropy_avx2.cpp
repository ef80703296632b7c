// avx2 build of the cross-entropy row kernel (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx2
#include "cross_entropy_impl.h"
