// The fused signal pass compiled for avx2 (flags set in CMakeLists.txt).
#define HALTWISE_ISA_NS isa_avx2
#include "signals_cpu_kernel.h"
