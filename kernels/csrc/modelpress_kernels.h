/* ModelPress native kernels: the C ABI that kernels/_native.py calls through ctypes.
 *
 * Every entry point takes raw device pointers, sizes, the CUDA device ordinal the pointers live on and
 * the cudaStream_t to launch on (torch's current stream), enqueues its kernels without synchronising,
 * and returns a cudaError_t as int: 0 on success, cudaErrorInvalidValue (1) for arguments it refuses,
 * otherwise what cudaGetLastError reported after the launches. mp_kernels_error_string names a code.
 *
 * Element types are given as MP_FLOAT32 / MP_FLOAT16 / MP_BFLOAT16. Sizes are int64_t; indexing inside
 * the kernels is 64-bit throughout.
 *
 * Keep this file, kernels/_native.py (argtypes) and tests/kernels/test_kernels.py (SYMBOLS) in step: bump
 * MP_KERNELS_ABI_VERSION whenever a signature changes, and the Python side refuses a library built
 * for another version.
 */
#ifndef MODELPRESS_KERNELS_H
#define MODELPRESS_KERNELS_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#define MP_KERNELS_ABI_VERSION 1

#define MP_FLOAT32 0
#define MP_FLOAT16 1
#define MP_BFLOAT16 2

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version compiled in (MP_KERNELS_ABI_VERSION). */
int mp_kernels_version(void);

/* cudaGetErrorString for a code returned by the functions below. */
const char* mp_kernels_error_string(int code);

/* Blockwise round-to-nearest quantization of a row-major weight [K, N] along K, in the layout of ONNX
 * Runtime's com.microsoft.MatMulNBits (bits 4 or 8, block_size 32, 64 or 128), as ONNX Runtime's RTN
 * quantizer (MlasQuantizeBlockwise) computes it:
 *   packed      uint8 [N, ceil(K / block_size), block_size * bits / 8]; 4-bit codes two per byte, the
 *               lower row in the low nibble; rows past K in the last block are 0.
 *   scales      [N, ceil(K / block_size)] in the weight's dtype.
 *   zero_points uint8 [N, ceil(ceil(K / block_size) * bits / 8)], 4-bit ones two per byte (block 2i in the
 *               low nibble); symmetric blocks get the implicit zero point 2^(bits-1) written, as does the
 *               unused high nibble of an odd block count. May be NULL.
 */
int mp_quantize_blockwise(int device, const void* weight, int dtype, int64_t K, int64_t N, int bits,
                          int block_size, int symmetric, uint8_t* packed, void* scales, uint8_t* zero_points,
                          cudaStream_t stream);

/* Bytes of device workspace mp_magnitude_threshold needs for `total` elements in all. */
int64_t mp_magnitude_threshold_workspace_bytes(int64_t total);

/* The k-th smallest |w| (1-based, as torch.kthvalue) over `count` tensors taken together, without
 * sorting or concatenating them: a 3-pass radix select (12 + 12 + 8 bits of the float32 pattern), the
 * last pass over the elements that survived the second one when they fit the workspace. tensors[i] is a
 * device pointer to numels[i] elements of dtypes[i]; the pointer arrays are host memory, read before the
 * call returns. Writes the float32 value to *result (device). */
int mp_magnitude_threshold(int device, const void* const* tensors, const int64_t* numels, const int* dtypes,
                           int count, int64_t k, void* workspace, int64_t workspace_bytes, float* result,
                           cudaStream_t stream);

/* N:M mask: of every m consecutive elements (m = 4, 8 or 16; numel divisible by m) keep the n largest |w|,
 * ties to the lower index. mask is numel bytes, 1 = kept. */
int mp_nm_mask(int device, const void* weight, int dtype, int64_t numel, int n, int m, uint8_t* mask,
               cudaStream_t stream);

/* Distillation loss T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch-mean over rows, of two
 * [rows, vocab] logit matrices of one dtype, and its gradient wrt the student, (softmax(s/T) -
 * softmax(t/T)) * T / rows, in the student's dtype (grad may be NULL: loss only). One pass to reduce each
 * row (online max and sum), one to write the gradient; a row stays in shared memory between the two when
 * it fits. row_loss is a float32 workspace of `rows` elements; *loss (device float32) gets the mean. */
int mp_kd_loss(int device, const void* student, const void* teacher, int dtype, int64_t rows, int64_t vocab,
               float temperature, void* grad, float* row_loss, float* loss, cudaStream_t stream);

/* Bytes of device workspace mp_kmeans_1d needs. */
int64_t mp_kmeans_1d_workspace_bytes(void);

/* 1-D k-means (Lloyd) of n values, k <= 256: `centroids` (device float32 [k], sorted ascending) is the
 * start and receives the result. Each iteration assigns every value to its nearest centroid (midpoints;
 * a value on a midpoint goes to the lower centroid), moves each non-empty centroid to the mean of its
 * values and sorts them; it stops early once no centroid moves. Then, when labels (uint8 [n]) is not
 * NULL, writes the final assignment, and when inertia is not NULL the sum of squared distances. */
int mp_kmeans_1d(int device, const void* values, int dtype, int64_t n, float* centroids, int k, int iterations,
                 void* workspace, int64_t workspace_bytes, uint8_t* labels, float* inertia, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* MODELPRESS_KERNELS_H */
