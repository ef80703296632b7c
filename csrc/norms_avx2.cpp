// avx2 build of the row normalisations (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx2
#include "norms_impl.h"
