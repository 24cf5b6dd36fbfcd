// Helpers shared by the kernels: element conversion, warp/block reductions, launch sizing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include "modelpress_kernels.h"

namespace mp {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

__device__ __forceinline__ double warp_sum(double v) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

// Sum over the whole block, returned to every thread. blockDim.x must be a multiple of 32 (<= 1024);
// `scratch` holds 32 values. Safe to call repeatedly with the same scratch.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int warps = blockDim.x / kWarp;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : V(0);
    return warp_sum(v);
}

inline int div_up(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Enough blocks to fill the device (blocks_per_sm on each multiprocessor); grid-stride loops cover the rest.
inline int grid_for(int64_t work, int threads, int device, int blocks_per_sm = 8) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 80;
    const int64_t wanted = (work + threads - 1) / threads;
    const int64_t cap = static_cast<int64_t>(sms) * blocks_per_sm;
    const int64_t blocks = wanted < cap ? wanted : cap;
    return blocks < 1 ? 1 : static_cast<int>(blocks);
}

// Select the device the caller's pointers live on (this library has its own copy of the runtime).
inline cudaError_t enter(int device) {
    cudaGetLastError();  // clear an error left by an earlier, unrelated call
    return cudaSetDevice(device);
}

inline bool valid_dtype(int dtype) { return dtype == MP_FLOAT32 || dtype == MP_FLOAT16 || dtype == MP_BFLOAT16; }

}  // namespace mp

// Dispatch a templated launch on the element type code. Used as:
//   MP_DISPATCH_DTYPE(dtype, T, { kernel<T><<<...>>>(...); })
#define MP_DISPATCH_DTYPE(dtype, T, ...)               \
    switch (dtype) {                                   \
        case MP_FLOAT32: {                             \
            using T = float;                           \
            __VA_ARGS__;                               \
            break;                                     \
        }                                              \
        case MP_FLOAT16: {                             \
            using T = __half;                          \
            __VA_ARGS__;                               \
            break;                                     \
        }                                              \
        case MP_BFLOAT16: {                            \
            using T = __nv_bfloat16;                   \
            __VA_ARGS__;                               \
            break;                                     \
        }                                              \
        default:                                       \
            return static_cast<int>(cudaErrorInvalidValue); \
    }
