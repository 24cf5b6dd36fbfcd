// The library's identity: ABI version and error names (see modelpress_kernels.h).
#include "common.cuh"

extern "C" int mp_kernels_version(void) { return MP_KERNELS_ABI_VERSION; }

extern "C" const char* mp_kernels_error_string(int code) {
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
