// avx512 build of the row normalisations (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx512
#include "norms_impl.h"
