// Test-only CUDA kernels with planted bugs, built only into the SIMT backend
// (tests/simt_backend.py): the suite proves each bug is caught, and that the
// same kernel without the bug passes. Each `planted` flag switches one bug on.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

namespace fastbn_planted {
namespace {

constexpr int kThreads = 256;

// One block sums x; the tree reduction's first barrier can be left out.
__global__ void block_sum_kernel(const float* x, float* out, int n, bool skip_first_barrier,
                                 bool leave_last_slot_unwritten) {
  __shared__ float partial[kThreads];
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  if (!leave_last_slot_unwritten || threadIdx.x + 1 < blockDim.x) {
    partial[threadIdx.x] = s;
  }
  if (!skip_first_barrier) {
    __syncthreads();
  }
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = partial[0];
}

// Stage 1 of a two-stage sum: block b writes partial[b] (or, planted, b + 1).
__global__ void partial_sum_kernel(const float* x, float* partial, int n, int offset) {
  __shared__ float buffer[kThreads];
  float s = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) s += x[i];
  buffer[threadIdx.x] = s;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) buffer[threadIdx.x] += buffer[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x + offset] = buffer[0];
}

__global__ void finish_sum_kernel(const float* partial, float* out, int count) {
  float s = 0.f;
  for (int i = 0; i < count; ++i) s += partial[i];
  out[0] = s;
}

// y = 2x; `last` is one past the last element written.
__global__ void scale_kernel(const float* x, float* y, int last) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < last) y[i] = 2.f * x[i];
}

// Rows of x (rows, cols) summed, one row per blockIdx.y step.
__global__ void row_sum_kernel(const float* x, float* out, int rows, int cols) {
  for (int r = blockIdx.y; r < rows; r += gridDim.y) {
    if (threadIdx.x == 0) {
      float s = 0.f;
      for (int c = 0; c < cols; ++c) s += x[r * cols + c];
      out[r] = s;
    }
  }
}

// Sum of x[0..last): with last = n + 1 the tail thread reads past the input.
__global__ void tail_sum_kernel(const float* x, float* out, int last) {
  __shared__ float partial[kThreads];
  float s = 0.f;
  for (int i = threadIdx.x; i < last; i += blockDim.x) s += x[i];
  partial[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int t = 0; t < kThreads; ++t) total += partial[t];
    out[0] = total;
  }
}

// A barrier only some threads reach.
__global__ void divergent_barrier_kernel(const float* x, float* y, int n, bool divergent) {
  const int i = threadIdx.x;
  if (!divergent || i < 16) {
    __syncthreads();
  }
  if (i < n) y[i] = x[i];
}

at::Tensor run(const std::string& bug, const at::Tensor& input, bool planted) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.is_contiguous() && input.dim() == 1,
              "planted bugs take a contiguous 1-d float32 tensor");
  const int n = static_cast<int>(input.numel());
  const float* x = input.const_data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (bug == "missing_syncthreads" || bug == "unwritten_shared") {
    at::Tensor out = at::empty({1}, input.options());
    block_sum_kernel<<<1, kThreads, 0, stream>>>(
        x, out.mutable_data_ptr<float>(), n, planted && bug == "missing_syncthreads",
        planted && bug == "unwritten_shared");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (bug == "partial_off_by_one") {
    const int blocks = 4;
    at::Tensor partial = at::empty({blocks}, input.options());
    at::Tensor out = at::empty({1}, input.options());
    partial_sum_kernel<<<blocks, kThreads, 0, stream>>>(
        x, partial.mutable_data_ptr<float>(), n, planted ? 1 : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_sum_kernel<<<1, 1, 0, stream>>>(partial.const_data_ptr<float>(), out.mutable_data_ptr<float>(), blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (bug == "unwritten_output") {
    at::Tensor y = at::empty_like(input);
    scale_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        x, y.mutable_data_ptr<float>(), planted ? n - 1 : n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
  }
  if (bug == "grid_y_overflow") {
    // input holds (rows, 2) values: one row per output.
    const int rows = n / 2;
    at::Tensor out = at::empty({rows}, input.options());
    const unsigned grid_y = planted ? static_cast<unsigned>(rows) : std::min(rows, 65535);
    row_sum_kernel<<<dim3(1, grid_y), 32, 0, stream>>>(x, out.mutable_data_ptr<float>(), rows, 2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (bug == "tail_read_past_input") {
    at::Tensor out = at::empty({1}, input.options());
    tail_sum_kernel<<<1, kThreads, 0, stream>>>(x, out.mutable_data_ptr<float>(), planted ? n + 1 : n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (bug == "divergent_barrier") {
    at::Tensor y = at::empty_like(input);
    divergent_barrier_kernel<<<1, 64, 0, stream>>>(x, y.mutable_data_ptr<float>(), n, planted);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
  }
  TORCH_CHECK_VALUE(false, "unknown planted bug '", bug, "'");
}

}  // namespace
}  // namespace fastbn_planted

TORCH_LIBRARY(fastbn_planted, m) { m.def("run(str bug, Tensor input, bool planted) -> Tensor"); }

TORCH_LIBRARY_IMPL(fastbn_planted, CUDA, m) { m.impl("run", &fastbn_planted::run); }
