// The fused signal pass compiled for generic (flags set in CMakeLists.txt).
#define HALTWISE_ISA_NS isa_generic
#include "signals_cpu_kernel.h"
