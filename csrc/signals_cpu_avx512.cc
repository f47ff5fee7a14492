// The fused signal pass compiled for avx512 (flags set in CMakeLists.txt).
#define HALTWISE_ISA_NS isa_avx512
#include "signals_cpu_kernel.h"
