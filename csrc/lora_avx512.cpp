// avx512 build of the LoRA skinny products (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx512
#include "lora_impl.h"
