// avx512 build of the SwiGLU element kernels (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx512
#include "swiglu_impl.h"
