// Fused distillation loss and its gradient wrt the student logits (see modelpress_kernels.h).
//
// One block per row (grid-stride over rows). Pass 1 reads the row once and keeps, per thread, an online
// (max, sum of exp) pair for s/T and for t/T; a block reduction gives both log-sum-exps. Pass 2 computes
// log p_s and log p_t element by element, as log_softmax does, accumulates p_t * (log p_t - log p_s) and
// writes (p_s - p_t) * T / rows. Nothing of size [rows, vocab] is kept but the gradient itself. When the row
// fits in shared memory, pass 1 leaves it there and pass 2 reads it back instead of reading global memory
// again. The per-row losses are summed by a second, one-block kernel in a fixed order (deterministic).
#include <math.h>

#include "common.cuh"

namespace {

constexpr int kMaxThreads = 1024;
constexpr int kUnroll = 4;

struct MaxSum {
    float max;
    float sum;  // sum of exp(x - max)
};

__device__ __forceinline__ void online_add(MaxSum& acc, float x) {
    if (x > acc.max) {
        acc.sum = acc.sum * expf(acc.max - x) + 1.0f;  // exp(-inf) = 0 for the first element
        acc.max = x;
    } else {
        acc.sum += expf(x - acc.max);
    }
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
    if (b.max == -INFINITY) return a;  // an empty side: avoids exp(-inf - -inf) = NaN
    if (a.max == -INFINITY) return b;
    const float m = fmaxf(a.max, b.max);
    return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum v) {
    for (int offset = mp::kWarp / 2; offset > 0; offset /= 2) {
        MaxSum other{__shfl_xor_sync(mp::kFullMask, v.max, offset), __shfl_xor_sync(mp::kFullMask, v.sum, offset)};
        v = combine(v, other);
    }
    return v;
}

// Block-wide combine of two pairs at once, the result returned to every thread.
__device__ __forceinline__ void block_combine(MaxSum& a, MaxSum& b, MaxSum (*scratch)[mp::kWarp]) {
    const int lane = threadIdx.x % mp::kWarp;
    const int warp = threadIdx.x / mp::kWarp;
    const int warps = blockDim.x / mp::kWarp;
    a = warp_combine(a);
    b = warp_combine(b);
    __syncthreads();  // earlier readers of scratch are done
    if (lane == 0) {
        scratch[0][warp] = a;
        scratch[1][warp] = b;
    }
    __syncthreads();
    const MaxSum empty{-INFINITY, 0.0f};
    a = warp_combine(lane < warps ? scratch[0][lane] : empty);
    b = warp_combine(lane < warps ? scratch[1][lane] : empty);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    kd_loss_rows_kernel(const T* __restrict__ student, const T* __restrict__ teacher, int64_t rows, int64_t vocab,
                        float temperature, float grad_scale, T* __restrict__ grad, float* __restrict__ row_loss,
                        bool cache_student, bool cache_teacher) {
    extern __shared__ __align__(16) unsigned char cache_bytes[];
    T* cached_s = reinterpret_cast<T*>(cache_bytes);
    T* cached_t = cached_s + (cache_student ? vocab : 0);
    __shared__ MaxSum scratch[2][mp::kWarp];
    __shared__ float sum_scratch[mp::kWarp];

    const int64_t step = blockDim.x;
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* s_row = student + row * vocab;
        const T* t_row = teacher + row * vocab;

        MaxSum acc_s{-INFINITY, 0.0f};
        MaxSum acc_t{-INFINITY, 0.0f};
        int64_t j = threadIdx.x;
        for (; j + (kUnroll - 1) * step < vocab; j += kUnroll * step) {
            T s_raw[kUnroll], t_raw[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll requests in flight per thread
                s_raw[u] = s_row[j + u * step];
                t_raw[u] = t_row[j + u * step];
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                if (cache_student) cached_s[j + u * step] = s_raw[u];
                if (cache_teacher) cached_t[j + u * step] = t_raw[u];
                online_add(acc_s, __fdiv_rn(mp::to_float(s_raw[u]), temperature));
                online_add(acc_t, __fdiv_rn(mp::to_float(t_raw[u]), temperature));
            }
        }
        for (; j < vocab; j += step) {
            const T s_raw = s_row[j];
            const T t_raw = t_row[j];
            if (cache_student) cached_s[j] = s_raw;
            if (cache_teacher) cached_t[j] = t_raw;
            online_add(acc_s, __fdiv_rn(mp::to_float(s_raw), temperature));
            online_add(acc_t, __fdiv_rn(mp::to_float(t_raw), temperature));
        }
        block_combine(acc_s, acc_t, scratch);
        // log_softmax's own order, (x - max) - log(sum), loses less than x - (max + log(sum)) for large logits
        const float log_sum_s = logf(acc_s.sum);
        const float log_sum_t = logf(acc_t.sum);

        // Each thread reads back only the cache slots it wrote itself: no barrier needed for the cache.
        float kl = 0.0f;
        for (j = threadIdx.x; j < vocab; j += step) {
            const float s = mp::to_float(cache_student ? cached_s[j] : s_row[j]);
            const float t = mp::to_float(cache_teacher ? cached_t[j] : t_row[j]);
            const float log_ps = __fsub_rn(__fsub_rn(__fdiv_rn(s, temperature), acc_s.max), log_sum_s);
            const float log_pt = __fsub_rn(__fsub_rn(__fdiv_rn(t, temperature), acc_t.max), log_sum_t);
            const float pt = expf(log_pt);
            kl += pt * (log_pt - log_ps);
            if (grad != nullptr) grad[row * vocab + j] = mp::from_float<T>((expf(log_ps) - pt) * grad_scale);
        }
        kl = mp::block_sum(kl, sum_scratch);
        if (threadIdx.x == 0) row_loss[row] = kl;
        // The next row's pass 1 overwrites cache slots only this thread reads, and block_combine starts
        // with a barrier before it touches scratch: nothing else to wait for.
    }
}

// loss = sum(row_loss) * scale, summed in double in a fixed order.
__global__ void __launch_bounds__(256) kd_loss_total_kernel(const float* __restrict__ row_loss, int64_t rows,
                                                            double scale, float* __restrict__ loss) {
    __shared__ double scratch[mp::kWarp];
    double sum = 0.0;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) sum += row_loss[r];
    sum = mp::block_sum(sum, scratch);
    if (threadIdx.x == 0) *loss = static_cast<float>(sum * scale);
}

int threads_for(int64_t vocab) {
    // About kUnroll elements per thread per row, in whole warps, at most kMaxThreads.
    int64_t threads = (vocab + kUnroll - 1) / kUnroll;
    threads = (threads + mp::kWarp - 1) / mp::kWarp * mp::kWarp;
    if (threads < mp::kWarp) threads = mp::kWarp;
    if (threads > kMaxThreads) threads = kMaxThreads;
    return static_cast<int>(threads);
}

template <typename T>
cudaError_t launch_kd(const void* student, const void* teacher, int64_t rows, int64_t vocab, float temperature,
                      void* grad, float* row_loss, float* loss, int device, cudaStream_t stream) {
    const int threads = threads_for(vocab);
    // Keep rows in shared memory when that still lets two blocks share a multiprocessor (the student first:
    // the teacher is then read twice, the second time mostly from L2). A student row too large for that but
    // within one block's opt-in limit is cached at one block per multiprocessor.
    auto kernel = kd_loss_rows_kernel<T>;
    cudaFuncAttributes attributes{};
    cudaError_t status = cudaFuncGetAttributes(&attributes, kernel);
    if (status != cudaSuccess) return status;
    int optin = 0, per_sm_bytes = 0, sms = 0;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) optin = 0;
    if (cudaDeviceGetAttribute(&per_sm_bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess) {
        per_sm_bytes = 0;
    }
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 80;
    const int64_t static_bytes = static_cast<int64_t>(attributes.sharedSizeBytes);
    const int64_t max_dynamic = static_cast<int64_t>(optin) - static_bytes;
    const int64_t reserved = 1024 + static_bytes;  // the runtime reserves 1 KiB of shared memory per block
    const int64_t one_block = (max_dynamic < per_sm_bytes - reserved ? max_dynamic : per_sm_bytes - reserved);
    const int64_t two_blocks = per_sm_bytes / 2 - reserved;
    const int64_t row_bytes = vocab * static_cast<int64_t>(sizeof(T));
    bool cache_student = row_bytes <= two_blocks;
    const bool cache_teacher = 2 * row_bytes <= two_blocks;
    int blocks_per_sm = 2048 / threads;
    if (cache_student) {
        blocks_per_sm = 2;
    } else if (row_bytes <= one_block) {
        cache_student = true;
        blocks_per_sm = 1;
    }
    const size_t dynamic = static_cast<size_t>((cache_student ? row_bytes : 0) + (cache_teacher ? row_bytes : 0));
    if (dynamic > 0) {
        // Always the same value (the most this kernel may ask for), so concurrent callers cannot undo each other.
        status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(max_dynamic));
        if (status != cudaSuccess) return status;
    }
    const int64_t wanted = static_cast<int64_t>(sms) * blocks_per_sm;
    const int grid = static_cast<int>(rows < wanted ? rows : wanted);
    const float grad_scale = static_cast<float>(static_cast<double>(temperature) / static_cast<double>(rows));
    kernel<<<grid, threads, dynamic, stream>>>(static_cast<const T*>(student), static_cast<const T*>(teacher), rows,
                                               vocab, temperature, grad_scale, static_cast<T*>(grad), row_loss,
                                               cache_student, cache_teacher);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    const double scale = static_cast<double>(temperature) * temperature / static_cast<double>(rows);
    kd_loss_total_kernel<<<1, 256, 0, stream>>>(row_loss, rows, scale, loss);
    return cudaGetLastError();
}

}  // namespace

extern "C" int mp_kd_loss(int device, const void* student, const void* teacher, int dtype, int64_t rows,
                          int64_t vocab, float temperature, void* grad, float* row_loss, float* loss,
                          cudaStream_t stream) {
    if (student == nullptr || teacher == nullptr || row_loss == nullptr || loss == nullptr || rows <= 0 ||
        vocab <= 0 || !(temperature > 0.0f) || !isfinite(temperature) || !mp::valid_dtype(dtype)) {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    cudaError_t status = mp::enter(device);
    if (status != cudaSuccess) return static_cast<int>(status);
    MP_DISPATCH_DTYPE(dtype, T, {
        status = launch_kd<T>(student, teacher, rows, vocab, temperature, grad, row_loss, loss, device, stream);
    });
    return static_cast<int>(status);
}
