// Test-only CUDA kernels that exercise each built-in the SIMT backend
// supplies (warp shuffles and votes, atomics, dynamic shared memory, 3-d
// grids, cooperative launches with grid.sync, the launch limits), so the
// suite can check the emulator against plain torch computations.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <string>

namespace fastbn_features {
namespace {

namespace cg = cooperative_groups;

// out[w] = sum of warp w's 32 values, by __shfl_down_sync; out_xor[w] the
// same by __shfl_xor_sync (every lane ends with the total).
__global__ void warp_sum_kernel(const float* x, float* out_down, float* out_xor) {
  const int lane = threadIdx.x % 32;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  float down = v;
  for (int offset = 16; offset > 0; offset /= 2) down += __shfl_down_sync(0xffffffffu, down, offset);
  float all = v;
  for (int mask = 16; mask > 0; mask /= 2) all += __shfl_xor_sync(0xffffffffu, all, mask);
  if (lane == 0) out_down[warp] = down;
  if (lane == 31) out_xor[warp] = all;
}

// Inclusive prefix sum within each warp (__shfl_up_sync), and lane 5's value
// broadcast to the warp (__shfl_sync).
__global__ void warp_scan_kernel(const float* x, float* scan, float* broadcast) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  float v = x[i];
  for (int d = 1; d < 32; d *= 2) {
    const float up = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += up;
  }
  scan[i] = v;
  broadcast[i] = __shfl_sync(0xffffffffu, x[i], 5);
}

// Per warp: ballot of x > 0, and whether all / any are.
__global__ void warp_vote_kernel(const float* x, int* ballot, int* all, int* any) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const bool p = x[i] > 0.f;
  const unsigned b = __ballot_sync(0xffffffffu, p);
  const int a = __all_sync(0xffffffffu, p);
  const int y = __any_sync(0xffffffffu, p);
  if (threadIdx.x % 32 == 0) {
    ballot[i / 32] = static_cast<int>(b);
    all[i / 32] = a;
    any[i / 32] = y;
  }
}

// Histogram of x into `bins` bins over [-4, 4): shared-memory atomics per
// block, then global atomics.
__global__ void histogram_kernel(const float* x, int n, int* counts, int bins) {
  extern __shared__ int local[];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    int b = static_cast<int>((x[i] + 4.f) / 8.f * bins);
    b = b < 0 ? 0 : (b >= bins ? bins - 1 : b);
    atomicAdd(&local[b], 1);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) atomicAdd(&counts[b], local[b]);
}

// Every (block, thread) of a 3-d grid of 3-d blocks writes its linear id.
__global__ void index_kernel(int* out) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int threads = blockDim.x * blockDim.y * blockDim.z;
  out[block * threads + thread] = block * 10000 + thread;
}

// Sum in one cooperative launch: block partials, grid.sync(), block 0 adds
// them in order.
__global__ void cooperative_sum_kernel(const float* x, int n, float* partial, float* out) {
  __shared__ float buffer[128];
  float s = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) s += x[i];
  buffer[threadIdx.x] = s;
  __syncthreads();
  for (int half = 64; half > 0; half /= 2) {
    if (threadIdx.x < half) buffer[threadIdx.x] += buffer[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = buffer[0];
  cg::this_grid().sync();
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    float total = 0.f;
    for (unsigned b = 0; b < gridDim.x; ++b) total += partial[b];
    out[0] = total;
  }
}

__global__ void noop_kernel(int) {}

at::Tensor run(const std::string& feature, const at::Tensor& x, int64_t arg) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = x.options();
  const auto i32 = x.options().dtype(at::kInt);
  const int n = static_cast<int>(x.numel());
  if (feature == "warp_sum") {
    at::Tensor out = at::empty({2, n / 32}, f32);
    warp_sum_kernel<<<n / 128, 128, 0, stream>>>(
        x.const_data_ptr<float>(), out[0].mutable_data_ptr<float>(), out[1].mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (feature == "warp_scan") {
    at::Tensor out = at::empty({2, n}, f32);
    warp_scan_kernel<<<n / 64, 64, 0, stream>>>(
        x.const_data_ptr<float>(), out[0].mutable_data_ptr<float>(), out[1].mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (feature == "warp_vote") {
    at::Tensor out = at::empty({3, n / 32}, i32);
    warp_vote_kernel<<<n / 64, 64, 0, stream>>>(
        x.const_data_ptr<float>(), out[0].mutable_data_ptr<int>(), out[1].mutable_data_ptr<int>(),
        out[2].mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (feature == "histogram") {
    const int bins = static_cast<int>(arg);
    at::Tensor counts = at::zeros({bins}, i32);
    if (bins * sizeof(int) > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(
          histogram_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bins * sizeof(int))));
    }
    histogram_kernel<<<8, 96, bins * sizeof(int), stream>>>(
        x.const_data_ptr<float>(), n, counts.mutable_data_ptr<int>(), bins);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return counts;
  }
  if (feature == "index_3d") {
    const dim3 grid(3, 2, 4), block(5, 4, 3);
    at::Tensor out = at::empty({3 * 2 * 4 * 5 * 4 * 3}, i32);
    index_kernel<<<grid, block, 0, stream>>>(out.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (feature == "cooperative_sum") {
    // arg: blocks per SM to ask for (0 = what the occupancy allows).
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, cooperative_sum_kernel, 128, 0));
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int blocks = sms * static_cast<int>(arg > 0 ? arg : per_sm);
    at::Tensor partial = at::empty({blocks}, f32);
    at::Tensor out = at::empty({1}, f32);
    const float* xp = x.const_data_ptr<float>();
    float* pp = partial.mutable_data_ptr<float>();
    float* op = out.mutable_data_ptr<float>();
    void* args[] = {&xp, const_cast<int*>(&n), &pp, &op};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(cooperative_sum_kernel, dim3(blocks), dim3(128), args, 0, stream));
    return out;
  }
  if (feature == "block_of") {
    // A launch of `arg` threads in one block (the limit is 1024).
    noop_kernel<<<1, static_cast<unsigned>(arg), 0, stream>>>(0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return x;
  }
  if (feature == "grid_z_of") {
    noop_kernel<<<dim3(1, 1, static_cast<unsigned>(arg)), 1, 0, stream>>>(0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return x;
  }
  if (feature == "dynamic_smem_of") {
    // `arg` bytes of dynamic shared memory without raising the kernel's limit.
    noop_kernel<<<1, 32, static_cast<size_t>(arg), stream>>>(0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return x;
  }
  TORCH_CHECK_VALUE(false, "unknown feature '", feature, "'");
}

}  // namespace
}  // namespace fastbn_features

TORCH_LIBRARY(fastbn_features, m) { m.def("run(str feature, Tensor input, int arg) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastbn_features, CUDA, m) { m.impl("run", &fastbn_features::run); }
