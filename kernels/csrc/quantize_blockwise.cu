// Blockwise RTN quantization into ONNX Runtime's MatMulNBits layout (see modelpress_kernels.h).
//
// The arithmetic follows MLAS's BlockwiseQuantizer (onnxruntime/core/mlas/lib/q4_dq.cpp) step by step so
// that the codes come out bit-identical: min/max over the block's valid rows, range2scale (symmetric) or
// range2scalezp (asymmetric), reciprocal scale, roundf (half away from zero) of v * (1/scale) + zp, clamp.
// Every multiply and add is an explicit _rn intrinsic so that nvcc does not fuse them into an FMA, which
// would round differently from the CPU.
//
// One thread owns one column n and one zero-point byte's worth of blocks (two 4-bit blocks, one 8-bit):
// threads of a warp take consecutive columns, so each row of a block is read as one coalesced segment,
// and the zero-point byte two blocks share is written by the one thread that computed both.
#include <float.h>

#include "common.cuh"

namespace {

template <typename T>
struct ScaleRounding {
    // fp16 scales are rounded before the codes are computed (MLAS stores an MLFloat16 and reads it back);
    // bf16 weights are quantized by ONNX Runtime's Python side in float32 and only the scales are cast.
    static constexpr bool kBeforeCodes = false;
};
template <>
struct ScaleRounding<__half> {
    static constexpr bool kBeforeCodes = true;
};

template <typename T, int BLOCK, int BITS>
__global__ void __launch_bounds__(128) quantize_blockwise_kernel(const T* __restrict__ weight, int64_t K,
                                                                 int64_t N, int64_t k_blocks, bool symmetric,
                                                                 uint8_t* __restrict__ packed,
                                                                 T* __restrict__ scales,
                                                                 uint8_t* __restrict__ zero_points) {
    constexpr int kPack = 8 / BITS;                // blocks per zero-point byte, codes per packed byte
    constexpr int kBlob = BLOCK * BITS / 8;        // packed bytes per block
    constexpr int kWords = kBlob / 4;
    constexpr int kMax = (1 << BITS) - 1;
    constexpr int kMid = 1 << (BITS - 1);
    constexpr float kMaxFp = static_cast<float>(kMax);
    constexpr float kFullRange = static_cast<float>(kMax);  // kMax - kMin, kMin = 0
    constexpr float kHalfRange = static_cast<float>(kMid);  // kMid - kMin
    static_assert(kBlob % 16 == 0, "a block's packed bytes are written as 16-byte vectors");

    const int64_t groups = (k_blocks + kPack - 1) / kPack;
    const int64_t column_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t group = blockIdx.y; group < groups; group += gridDim.y) {
        for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += column_stride) {
            uint32_t zp_byte = 0;
            // The last high-nibble code of this 2-block stretch: MLAS leaves it in the padding nibble after an
            // odd K (its per-stretch buffer keeps it), copied so that the bytes come out identical.
            uint32_t last_high = 0;
#pragma unroll 1
            for (int p = 0; p < kPack; ++p) {
                const int64_t kb = group * kPack + p;
                int zp = kMid;
                if (kb < k_blocks) {
                    const int64_t k0 = kb * BLOCK;
                    const int64_t remaining = K - k0;
                    const int valid = remaining < BLOCK ? static_cast<int>(remaining) : BLOCK;
                    float v[BLOCK];
                    float lo = FLT_MAX;
                    float hi = -FLT_MAX;
#pragma unroll
                    for (int i = 0; i < BLOCK; ++i) {
                        // + 0.0f turns -0.0 into +0.0 (as the reference does) so that ties between zeros
                        // cannot make the scale's sign depend on the order of comparisons.
                        v[i] = i < valid ? __fadd_rn(mp::to_float(weight[(k0 + i) * N + n]), 0.0f) : 0.0f;
                        if (i < valid) {
                            if (v[i] < lo) lo = v[i];
                            if (v[i] > hi) hi = v[i];
                        }
                    }
                    float scale_f;
                    if (symmetric) {
                        // range2scale: the larger half maps to [kMin, kMid], hence the minus sign.
                        const float extreme = fabsf(hi) > fabsf(lo) ? hi : lo;
                        scale_f = __fdiv_rn(-extreme, kHalfRange);
                    } else {
                        lo = lo < 0.0f ? lo : 0.0f;
                        hi = hi > 0.0f ? hi : 0.0f;
                        scale_f = __fdiv_rn(__fsub_rn(hi, lo), kFullRange);
                        float zero_point_fp = lo;
                        if (scale_f != 0.0f) zero_point_fp = __fsub_rn(0.0f, __fdiv_rn(lo, scale_f));
                        if (zero_point_fp < 0.0f) {
                            zp = 0;
                        } else if (zero_point_fp > kMaxFp) {
                            zp = kMax;
                        } else {
                            zp = static_cast<int>(roundf(zero_point_fp));
                        }
                    }
                    const T stored = mp::from_float<T>(scale_f);
                    scales[n * k_blocks + kb] = stored;
                    const float scale = ScaleRounding<T>::kBeforeCodes ? mp::to_float(stored) : scale_f;
                    const float reciprocal = scale != 0.0f ? __fdiv_rn(1.0f, scale) : 0.0f;
                    const float zp_fp = static_cast<float>(zp);

                    uint32_t words[kWords];
#pragma unroll
                    for (int w = 0; w < kWords; ++w) words[w] = 0;
#pragma unroll
                    for (int i = 0; i < BLOCK; ++i) {
                        if (i < valid) {
                            float q = roundf(__fadd_rn(__fmul_rn(v[i], reciprocal), zp_fp));
                            q = q < 0.0f ? 0.0f : (q > kMaxFp ? kMaxFp : q);
                            const uint32_t code = static_cast<uint32_t>(q);
                            constexpr int kCodesPerWord = 32 / BITS;
                            words[i / kCodesPerWord] |= code << ((i % kCodesPerWord) * BITS);
                            if (BITS == 4 && (i & 1)) last_high = code;
                        } else if (BITS == 4 && (i & 1) && i == valid) {
                            // the padding nibble after an odd K (see last_high)
                            words[i / 8] |= last_high << ((i % 8) * 4);
                        }
                    }
                    uint4* out = reinterpret_cast<uint4*>(packed + (n * k_blocks + kb) * kBlob);
#pragma unroll
                    for (int w = 0; w < kWords; w += 4) {
                        out[w / 4] = make_uint4(words[w], words[w + 1], words[w + 2], words[w + 3]);
                    }
                }
                zp_byte |= static_cast<uint32_t>(zp & kMax) << (p * BITS);
            }
            if (zero_points != nullptr) zero_points[n * groups + group] = static_cast<uint8_t>(zp_byte);
        }
    }
}

template <typename T, int BLOCK, int BITS>
cudaError_t launch_quantize(const void* weight, int64_t K, int64_t N, bool symmetric, uint8_t* packed,
                            void* scales, uint8_t* zero_points, int device, cudaStream_t stream) {
    constexpr int kThreads = 128;
    const int64_t k_blocks = (K + BLOCK - 1) / BLOCK;
    const int64_t groups = (k_blocks + (8 / BITS) - 1) / (8 / BITS);
    const int64_t column_blocks = (N + kThreads - 1) / kThreads;
    const int max_x = mp::grid_for(N * groups, kThreads, device);
    dim3 grid(static_cast<unsigned>(column_blocks < max_x ? column_blocks : max_x),
              static_cast<unsigned>(groups < 65535 ? groups : 65535));
    quantize_blockwise_kernel<T, BLOCK, BITS><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(weight), K, N, k_blocks, symmetric, packed, static_cast<T*>(scales), zero_points);
    return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t dispatch_block(int block_size, const void* weight, int64_t K, int64_t N, bool symmetric,
                           uint8_t* packed, void* scales, uint8_t* zero_points, int device, cudaStream_t stream) {
    switch (block_size) {
        case 32:
            return launch_quantize<T, 32, BITS>(weight, K, N, symmetric, packed, scales, zero_points, device, stream);
        case 64:
            return launch_quantize<T, 64, BITS>(weight, K, N, symmetric, packed, scales, zero_points, device, stream);
        case 128:
            return launch_quantize<T, 128, BITS>(weight, K, N, symmetric, packed, scales, zero_points, device, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

}  // namespace

extern "C" int mp_quantize_blockwise(int device, const void* weight, int dtype, int64_t K, int64_t N, int bits,
                                     int block_size, int symmetric, uint8_t* packed, void* scales,
                                     uint8_t* zero_points, cudaStream_t stream) {
    if (weight == nullptr || packed == nullptr || scales == nullptr || K <= 0 || N <= 0 ||
        (bits != 4 && bits != 8) || (block_size != 32 && block_size != 64 && block_size != 128) ||
        !mp::valid_dtype(dtype)) {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    cudaError_t status = mp::enter(device);
    if (status != cudaSuccess) return static_cast<int>(status);
    MP_DISPATCH_DTYPE(dtype, T, {
        status = bits == 4 ? dispatch_block<T, 4>(block_size, weight, K, N, symmetric != 0, packed, scales,
                                                  zero_points, device, stream)
                           : dispatch_block<T, 8>(block_size, weight, K, N, symmetric != 0, packed, scales,
                                                  zero_points, device, stream);
    });
    return static_cast<int>(status);
}
