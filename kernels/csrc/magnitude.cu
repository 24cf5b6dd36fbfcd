// Global magnitude threshold by radix select, and N:M masks (see modelpress_kernels.h).
//
// Threshold: |w| as float32 is a non-negative number, and for those the bit pattern orders like the value,
// so the k-th smallest |w| is found digit by digit on the patterns: a histogram of the top 12 bits over all
// tensors, pick the bin that holds rank k, then a histogram of the next 12 bits among the elements with that
// prefix, then the last 8. The state between passes (prefix, remaining rank) lives in device memory, so the
// host never waits. The second pass also copies its matching elements into a candidate buffer; when they
// all fit, the last pass reads only those instead of the tensors again.
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kHistThreads = 512;
constexpr int kUnroll = 4;
constexpr int kPasses = 3;
// Digits of the float32 pattern, most significant first: (shift, width) = (20, 12), (8, 12), (0, 8).
__host__ __device__ constexpr int shift_of(int pass) { return pass == 0 ? 20 : (pass == 1 ? 8 : 0); }
__host__ __device__ constexpr int width_of(int pass) { return pass == 2 ? 8 : 12; }
constexpr int kMaxBins = 1 << 12;

struct SelectState {
    unsigned long long remaining;   // rank (1-based) still to find among the elements matching `prefix`
    unsigned long long candidates;  // elements the second pass matched (and tried to store)
    unsigned long long capacity;    // candidate slots in the workspace
    unsigned int prefix;            // the pattern's bits chosen so far
    unsigned int padding;
};

struct Workspace {
    unsigned long long* hist;  // kMaxBins counts
    SelectState* state;
    unsigned int* candidates;  // state->capacity patterns
};

constexpr int64_t kHistBytes = kMaxBins * sizeof(unsigned long long);
constexpr int64_t kStateBytes = 64;

int64_t candidate_capacity(int64_t total) {
    const int64_t floor = total < (1 << 16) ? total : (1 << 16);
    const int64_t wanted = total / 16;
    return wanted > floor ? wanted : floor;
}

Workspace carve(void* base) {
    auto* bytes = static_cast<unsigned char*>(base);
    return {reinterpret_cast<unsigned long long*>(bytes), reinterpret_cast<SelectState*>(bytes + kHistBytes),
            reinterpret_cast<unsigned int*>(bytes + kHistBytes + kStateBytes)};
}

__device__ __forceinline__ unsigned int magnitude_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__device__ __forceinline__ bool matches(unsigned int bits, unsigned int prefix, int pass) {
    const int high = shift_of(pass) + width_of(pass);
    return high >= 32 || (bits >> high) == (prefix >> high);
}

// Count the digit of `pass` of the elements that match the prefix so far into the global histogram (a
// shared-memory histogram per block, merged with one atomic per non-empty bin). With `collect` (second
// pass) the matching patterns are appended to the candidate buffer, one atomic per warp.
template <typename T>
__global__ void __launch_bounds__(kHistThreads)
    histogram_kernel(const T* __restrict__ values, int64_t n, int pass, bool collect, bool skip_if_candidates,
                     Workspace work) {
    __shared__ unsigned int bins[kMaxBins];
    const SelectState state = *work.state;
    if (skip_if_candidates && state.candidates <= state.capacity) return;  // the candidate pass covers it
    const int width_bins = 1 << width_of(pass);
    for (int b = threadIdx.x; b < width_bins; b += blockDim.x) bins[b] = 0;
    __syncthreads();

    const int lane = threadIdx.x % mp::kWarp;
    const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / mp::kWarp;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / mp::kWarp;
    constexpr int64_t kChunk = mp::kWarp * kUnroll;  // elements a warp reads per step, kUnroll loads in flight
    // The loop bound is warp-uniform (base is the warp's first index), so the whole warp votes together.
    for (int64_t base = warp * kChunk; base < n; base += warps * kChunk) {
        unsigned int bits[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t i = base + u * mp::kWarp + lane;
            bits[u] = i < n ? magnitude_bits(mp::to_float(values[i])) : 0u;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const bool match = base + u * mp::kWarp + lane < n && matches(bits[u], state.prefix, pass);
            if (match) atomicAdd(&bins[(bits[u] >> shift_of(pass)) & (width_bins - 1)], 1u);
            if (collect) {
                const unsigned int voters = __ballot_sync(mp::kFullMask, match);
                if (voters != 0) {
                    unsigned long long first = 0;
                    if (lane == 0) {
                        first = atomicAdd(&work.state->candidates, static_cast<unsigned long long>(__popc(voters)));
                    }
                    first = __shfl_sync(mp::kFullMask, first, 0);
                    if (match) {
                        const unsigned long long slot = first + __popc(voters & ((1u << lane) - 1u));
                        if (slot < state.capacity) work.candidates[slot] = bits[u];
                    }
                }
            }
        }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < width_bins; b += blockDim.x) {
        if (bins[b] != 0) atomicAdd(&work.hist[b], static_cast<unsigned long long>(bins[b]));
    }
}

// The last pass over the candidates, when the second pass stored all of them.
__global__ void __launch_bounds__(kThreads) candidate_histogram_kernel(Workspace work) {
    __shared__ unsigned int bins[1 << width_of(kPasses - 1)];
    const SelectState state = *work.state;
    if (state.candidates > state.capacity) return;  // overflowed: the tensors are read again instead
    constexpr int pass = kPasses - 1;
    constexpr int width_bins = 1 << width_of(pass);
    for (int b = threadIdx.x; b < width_bins; b += blockDim.x) bins[b] = 0;
    __syncthreads();
    const int64_t n = static_cast<int64_t>(state.candidates);
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const unsigned int bits = work.candidates[i];
        if (matches(bits, state.prefix, pass)) atomicAdd(&bins[(bits >> shift_of(pass)) & (width_bins - 1)], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < width_bins; b += blockDim.x) {
        if (bins[b] != 0) atomicAdd(&work.hist[b], static_cast<unsigned long long>(bins[b]));
    }
}

__global__ void init_kernel(Workspace work, unsigned long long k, unsigned long long capacity) {
    work.state->remaining = k;
    work.state->candidates = 0;
    work.state->capacity = capacity;
    work.state->prefix = 0;
    work.state->padding = 0;
}

// One block of kThreads: find the bin where the running count reaches `remaining`, fold it into the
// prefix, and clear the histogram for the next pass. After the last pass, write the value.
__global__ void __launch_bounds__(kThreads) select_kernel(Workspace work, int pass, float* result) {
    __shared__ unsigned long long partial[kThreads];
    __shared__ int chosen_thread;
    __shared__ unsigned long long before_chosen;
    const int bins = 1 << width_of(pass);
    const int per_thread = (bins + kThreads - 1) / kThreads;
    const int t = threadIdx.x;
    const unsigned long long remaining = work.state->remaining;

    unsigned long long sum = 0;
    for (int b = t * per_thread; b < (t + 1) * per_thread && b < bins; ++b) sum += work.hist[b];
    partial[t] = sum;
    __syncthreads();
    if (t == 0) {
        // kThreads sums from shared memory: a serial scan is short and needs no care.
        unsigned long long running = 0;
        int owner = kThreads - 1;
        for (int u = 0; u < kThreads; ++u) {
            if (running + partial[u] >= remaining) {
                owner = u;
                break;
            }
            running += partial[u];
        }
        chosen_thread = owner;
        before_chosen = running;
    }
    __syncthreads();
    if (t == chosen_thread) {
        unsigned long long running = before_chosen;
        int digit = t * per_thread;
        const int end = (t + 1) * per_thread < bins ? (t + 1) * per_thread : bins;
        for (int b = t * per_thread; b < end; ++b) {
            digit = b;
            if (running + work.hist[b] >= remaining) break;
            running += work.hist[b];
        }
        const unsigned int prefix = work.state->prefix | (static_cast<unsigned int>(digit) << shift_of(pass));
        work.state->prefix = prefix;
        work.state->remaining = remaining - running;
        if (pass == kPasses - 1) *result = __uint_as_float(prefix);
    }
    __syncthreads();  // the chosen thread has read the histogram
    for (int b = t; b < bins; b += kThreads) work.hist[b] = 0;
}

template <typename T>
cudaError_t launch_histogram(const void* values, int64_t n, int pass, bool collect, bool skip_if_candidates,
                             Workspace work, int device, cudaStream_t stream) {
    // 4 blocks of 512 per multiprocessor: full occupancy, and few blocks to merge their histograms.
    const int grid = mp::grid_for((n + kUnroll - 1) / kUnroll, kHistThreads, device, 4);
    histogram_kernel<T><<<grid, kHistThreads, 0, stream>>>(static_cast<const T*>(values), n, pass, collect,
                                                        skip_if_candidates, work);
    return cudaGetLastError();
}

// ---- N:M masks ------------------------------------------------------------------------------------

template <typename T, int M>
__device__ __forceinline__ void load_group(const T* __restrict__ p, bool vector_ok, float (&out)[M]) {
    constexpr int kBytes = M * static_cast<int>(sizeof(T));
    if constexpr (kBytes % 16 == 0) {
        if (vector_ok) {
            union {
                uint4 raw[kBytes / 16];
                T items[M];
            } buffer;
#pragma unroll
            for (int r = 0; r < kBytes / 16; ++r) buffer.raw[r] = reinterpret_cast<const uint4*>(p)[r];
#pragma unroll
            for (int j = 0; j < M; ++j) out[j] = mp::to_float(buffer.items[j]);
            return;
        }
    } else if constexpr (kBytes == 8) {
        if (vector_ok) {
            union {
                uint2 raw;
                T items[M];
            } buffer;
            buffer.raw = *reinterpret_cast<const uint2*>(p);
#pragma unroll
            for (int j = 0; j < M; ++j) out[j] = mp::to_float(buffer.items[j]);
            return;
        }
    }
#pragma unroll
    for (int j = 0; j < M; ++j) out[j] = mp::to_float(p[j]);
}

// One thread per group of M consecutive elements: rank each by how many beat it (larger, or equal at a lower
// index) and keep the N best. The M mask bytes are written as one vector.
template <typename T, int M>
__global__ void __launch_bounds__(kThreads) nm_mask_kernel(const T* __restrict__ weight, int64_t groups, int keep,
                                                           bool vector_ok, uint8_t* __restrict__ mask) {
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        float a[M];
        load_group<T, M>(weight + g * M, vector_ok, a);
#pragma unroll
        for (int j = 0; j < M; ++j) a[j] = fabsf(a[j]);
        uint32_t words[(M + 3) / 4];
#pragma unroll
        for (int w = 0; w < (M + 3) / 4; ++w) words[w] = 0;
#pragma unroll
        for (int i = 0; i < M; ++i) {
            int rank = 0;
#pragma unroll
            for (int j = 0; j < M; ++j) rank += (a[j] > a[i]) || (j < i && a[j] == a[i]);
            if (rank < keep) words[i / 4] |= 1u << ((i % 4) * 8);
        }
        uint8_t* out = mask + g * M;  // M-byte aligned: the mask is a fresh allocation
        if constexpr (M == 4) {
            *reinterpret_cast<uint32_t*>(out) = words[0];
        } else if constexpr (M == 8) {
            *reinterpret_cast<uint2*>(out) = make_uint2(words[0], words[1]);
        } else {
            *reinterpret_cast<uint4*>(out) = make_uint4(words[0], words[1], words[2], words[3]);
        }
    }
}

template <typename T>
cudaError_t launch_nm(const void* weight, int64_t numel, int n, int m, uint8_t* mask, int device,
                      cudaStream_t stream) {
    const int64_t groups = numel / m;
    const int grid = mp::grid_for(groups, kThreads, device);
    const bool vector_ok = reinterpret_cast<uintptr_t>(weight) % 16 == 0;
    const T* w = static_cast<const T*>(weight);
    switch (m) {
        case 4:
            nm_mask_kernel<T, 4><<<grid, kThreads, 0, stream>>>(w, groups, n, vector_ok, mask);
            break;
        case 8:
            nm_mask_kernel<T, 8><<<grid, kThreads, 0, stream>>>(w, groups, n, vector_ok, mask);
            break;
        case 16:
            nm_mask_kernel<T, 16><<<grid, kThreads, 0, stream>>>(w, groups, n, vector_ok, mask);
            break;
        default:
            return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

}  // namespace

extern "C" int64_t mp_magnitude_threshold_workspace_bytes(int64_t total) {
    if (total < 0) return 0;
    return kHistBytes + kStateBytes + candidate_capacity(total) * static_cast<int64_t>(sizeof(unsigned int));
}

extern "C" int mp_magnitude_threshold(int device, const void* const* tensors, const int64_t* numels,
                                      const int* dtypes, int count, int64_t k, void* workspace,
                                      int64_t workspace_bytes, float* result, cudaStream_t stream) {
    if (tensors == nullptr || numels == nullptr || dtypes == nullptr || count <= 0 || workspace == nullptr ||
        result == nullptr) {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    int64_t total = 0;
    for (int i = 0; i < count; ++i) {
        if (numels[i] < 0 || (numels[i] > 0 && tensors[i] == nullptr) || !mp::valid_dtype(dtypes[i])) {
            return static_cast<int>(cudaErrorInvalidValue);
        }
        total += numels[i];
    }
    if (k < 1 || k > total || workspace_bytes < mp_magnitude_threshold_workspace_bytes(total)) {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    cudaError_t status = mp::enter(device);
    if (status != cudaSuccess) return static_cast<int>(status);

    const Workspace work = carve(workspace);
    status = cudaMemsetAsync(work.hist, 0, kHistBytes, stream);
    if (status != cudaSuccess) return static_cast<int>(status);
    init_kernel<<<1, 1, 0, stream>>>(work, static_cast<unsigned long long>(k),
                                     static_cast<unsigned long long>(candidate_capacity(total)));
    for (int pass = 0; pass < kPasses; ++pass) {
        const bool last = pass == kPasses - 1;
        if (last) {
            candidate_histogram_kernel<<<mp::grid_for(candidate_capacity(total), kThreads, device), kThreads, 0,
                                         stream>>>(work);
        }
        for (int i = 0; i < count; ++i) {
            if (numels[i] == 0) continue;
            MP_DISPATCH_DTYPE(dtypes[i], T, {
                status = launch_histogram<T>(tensors[i], numels[i], pass, pass == 1, last, work, device, stream);
            });
            if (status != cudaSuccess) return static_cast<int>(status);
        }
        select_kernel<<<1, kThreads, 0, stream>>>(work, pass, result);
    }
    return static_cast<int>(cudaGetLastError());
}

extern "C" int mp_nm_mask(int device, const void* weight, int dtype, int64_t numel, int n, int m, uint8_t* mask,
                          cudaStream_t stream) {
    if (weight == nullptr || mask == nullptr || numel <= 0 || (m != 4 && m != 8 && m != 16) || n <= 0 || n >= m ||
        numel % m != 0 || !mp::valid_dtype(dtype)) {
        return static_cast<int>(cudaErrorInvalidValue);
    }
    cudaError_t status = mp::enter(device);
    if (status != cudaSuccess) return static_cast<int>(status);
    MP_DISPATCH_DTYPE(dtype, T, { status = launch_nm<T>(weight, numel, n, m, mask, device, stream); });
    return static_cast<int>(status);
}
