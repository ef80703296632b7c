// avx2 build of the attention tile loops (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx2
#include "attention_impl.h"
