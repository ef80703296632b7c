// avx2 build of the LoRA skinny products (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx2
#include "lora_impl.h"
