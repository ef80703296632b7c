// avx512 build of the batched gather-LoRA (flags set in CMakeLists.txt).
#define PYENGINE_ISA_NS avx512
#include "lora_gather_impl.h"
