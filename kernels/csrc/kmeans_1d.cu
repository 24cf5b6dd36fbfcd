// 1-D k-means (Lloyd) for weight clustering, k <= 256 (see modelpress_kernels.h).
//
// One iteration is two launches: an assignment pass that streams the values once, finds each one's
// centroid by binary search over the k - 1 midpoints (in shared memory) and accumulates residuals
// (value - centroid) and counts per centroid, privately per warp in shared memory, then once per block into
// double / 64-bit global sums; and a one-block update that moves, sorts and checks the centroids. Residuals
// rather than values are summed so that float32 partial sums lose nothing that matters. A converged flag in
// device memory makes the remaining iterations return at once, so the host never waits.
#include "common.cuh"

namespace {

constexpr int kMaxK = 256;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / mp::kWarp;

struct KmeansWork {
    double residual[kMaxK];
    unsigned long long count[kMaxK];
    double inertia;
    int converged;
    int padding;
};

// The centroid a value belongs to: how many midpoints lie strictly below it (a value on a midpoint goes to
// the lower centroid, as numpy's searchsorted(side="left") places it).
__device__ __forceinline__ int nearest(const float* mids, int k, float v) {
    int lo = 0, hi = k - 1;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (mids[mid] < v) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

__device__ __forceinline__ void load_centroids(const float* __restrict__ centroids, int k, float* c, float* mids) {
    for (int i = threadIdx.x; i < k; i += blockDim.x) c[i] = centroids[i];
    __syncthreads();
    for (int i = threadIdx.x; i < k - 1; i += blockDim.x) mids[i] = __fmul_rn(__fadd_rn(c[i], c[i + 1]), 0.5f);
    __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) assign_kernel(const T* __restrict__ values, int64_t n,
                                                          const float* __restrict__ centroids, int k,
                                                          KmeansWork* __restrict__ work) {
    __shared__ float c[kMaxK];
    __shared__ float mids[kMaxK];
    __shared__ float residual[kWarps][kMaxK];
    __shared__ unsigned int count[kWarps][kMaxK];
    if (work->converged) return;  // uniform across the grid
    load_centroids(centroids, k, c, mids);
    const int warp = threadIdx.x / mp::kWarp;
    for (int i = threadIdx.x; i < kWarps * kMaxK; i += blockDim.x) {
        residual[i / kMaxK][i % kMaxK] = 0.0f;
        count[i / kMaxK][i % kMaxK] = 0u;
    }
    __syncthreads();
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const float v = mp::to_float(values[i]);
        const int label = nearest(mids, k, v);
        atomicAdd(&residual[warp][label], __fsub_rn(v, c[label]));
        atomicAdd(&count[warp][label], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < k; b += blockDim.x) {
        double r = 0.0;
        unsigned long long total = 0;
        for (int w = 0; w < kWarps; ++w) {
            r += residual[w][b];
            total += count[w][b];
        }
        if (total != 0) {
            atomicAdd(&work->residual[b], r);
            atomicAdd(&work->count[b], total);
        }
    }
}

// One block of kMaxK threads: move each centroid by its mean residual (an empty one stays), sort, and stop
// when nothing moved (the moved values are then not taken, as the reference does). Clears the sums.
__global__ void __launch_bounds__(kMaxK) update_kernel(float* __restrict__ centroids, int k,
                                                      KmeansWork* __restrict__ work) {
    __shared__ float moved[kMaxK];
    __shared__ float old[kMaxK];
    if (work->converged) return;
    const int i = threadIdx.x;
    if (i < k) {
        old[i] = centroids[i];
        const unsigned long long cnt = work->count[i];
        moved[i] = cnt != 0 ? static_cast<float>(static_cast<double>(old[i]) + work->residual[i] / static_cast<double>(cnt))
                            : old[i];
        work->residual[i] = 0.0;
        work->count[i] = 0;
    }
    __syncthreads();
    float mine = 0.0f;
    int rank = 0;
    if (i < k) {
        mine = moved[i];
        for (int j = 0; j < k; ++j) rank += (moved[j] < mine) || (moved[j] == mine && j < i);
    }
    __syncthreads();
    if (i < k) moved[rank] = mine;  // ranks are a permutation: each slot written once
    __syncthreads();
    const bool changed = i < k && fabsf(moved[i] - old[i]) > 1e-12f;
    if (__syncthreads_or(changed)) {
        if (i < k) centroids[i] = moved[i];
    } else if (i == 0) {
        work->converged = 1;
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) label_kernel(const T* __restrict__ values, int64_t n,
                                                         const float* __restrict__ centroids, int k,
                                                         uint8_t* __restrict__ labels, KmeansWork* __restrict__ work,
                                                         bool want_inertia) {
    __shared__ float c[kMaxK];
    __shared__ float mids[kMaxK];
    __shared__ double scratch[mp::kWarp];
    load_centroids(centroids, k, c, mids);
    double squares = 0.0;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const float v = mp::to_float(values[i]);
        const int label = nearest(mids, k, v);
        if (labels != nullptr) labels[i] = static_cast<uint8_t>(label);
        const double d = static_cast<double>(v) - static_cast<double>(c[label]);
        squares += d * d;
    }
    if (want_inertia) {
        squares = mp::block_sum(squares, scratch);
        if (threadIdx.x == 0) atomicAdd(&work->inertia, squares);
    }
}

__global__ void inertia_kernel(const KmeansWork* __restrict__ work, float* __restrict__ inertia) {
    *inertia = static_cast<float>(work->inertia);
}

template <typename T>
cudaError_t launch_kmeans(const void* values, int64_t n, float* centroids, int k, int iterations, KmeansWork* work,
                          uint8_t* labels, float* inertia, int device, cudaStream_t stream) {
    const T* v = static_cast<const T*>(values);
    cudaError_t status = cudaMemsetAsync(work, 0, sizeof(KmeansWork), stream);
    if (status != cudaSuccess) return status;
    const int grid = mp::grid_for(n, kThreads, device, 4);
    for (int it = 0; it < iterations; ++it) {
        assign_kernel<T><<<grid, kThreads, 0, stream>>>(v, n, centroids, k, work);
        update_kernel<<<1, kMaxK, 0, stream>>>(centroids, k, work);
    }
    if (labels != nullptr || inertia != nullptr) {
        label_kernel<T><<<grid, kThreads, 0, stream>>>(v, n, centroids, k, labels, work, inertia != nullptr);
        if (inertia != nullptr) inertia_kernel<<<1, 1, 0, stream>>>(work, inertia);
    }
    return cudaGetLastError();
}

}  // namespace

extern "C" int64_t mp_kmeans_1d_workspace_bytes(void) { return static_cast<int64_t>(sizeof(KmeansWork)); }

extern "C" int mp_kmeans_1d(int device, const void* values, int dtype, int64_t n, float* centroids, int k,
                            int iterations, void* workspace, int64_t workspace_bytes, uint8_t* labels, float* inertia,
                            cudaStream_t stream) {
    if (values == nullptr || centroids == nullptr || workspace == nullptr || n <= 0 || k < 1 || k > kMaxK ||
        iterations < 0 || workspace_bytes < static_cast<int64_t>(sizeof(KmeansWork)) || !mp::valid_dtype(dtype)) {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    cudaError_t status = mp::enter(device);
    if (status != cudaSuccess) return static_cast<int>(status);
    auto* work = static_cast<KmeansWork*>(workspace);
    MP_DISPATCH_DTYPE(dtype, T, {
        status = launch_kmeans<T>(values, n, centroids, k, iterations, work, labels, inertia, device, stream);
    });
    return static_cast<int>(status);
}
