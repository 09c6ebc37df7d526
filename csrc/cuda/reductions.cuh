// Per-channel reductions on the GPU: Welford statistics and the backward's
// gradient sums share one pair of kernels (channels-first, channels-last),
// parameterised by an accumulator type.
//
// Stage 1 (these kernels): P blocks per channel (channels-first) or per tile
// of 32 channels (channels-last) each reduce their share to one partial.
// Stage 2 (finalize kernels in batch_norm_cuda.cu): one thread per channel
// merges that channel's P partials in block order. No atomics: the result is
// the same from run to run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastbn::cuda {

constexpr int kReduceThreads = 256;      // channels-first block (1-d)
constexpr int kTileChannels = 32;        // channels-last block: 32 channels x
constexpr int kTileRows = 8;             //                      8 rows

// Welford state. Counts are held in acc_t: exact up to 2^24 values in fp32;
// above that (a whole large channel in one block) they round, a relative
// error of about 1e-7 in the merge weights.
template <typename acc_t>
struct WelfordState {
  acc_t mean;
  acc_t m2;
  acc_t n;
};

// Accumulates x - shift[c], shift[c] = x[c * shift_stride] (the channel's
// first value): with a large offset the updates to a running mean of x itself
// fall below fp32 resolution; the shifted values keep them. The finalize
// kernel adds the shift back to the mean.
template <typename scalar_t, typename acc_t>
struct WelfordAccumulator {
  using State = WelfordState<acc_t>;
  const scalar_t* x;
  int64_t shift_stride;

  __device__ static State identity() { return {acc_t(0), acc_t(0), acc_t(0)}; }

  template <typename index_t>
  __device__ void add(State& s, index_t i, index_t channel) const {
    const acc_t v = static_cast<acc_t>(x[i]) - static_cast<acc_t>(x[channel * shift_stride]);
    s.n += acc_t(1);
    const acc_t d = v - s.mean;
    s.mean += d / s.n;
    s.m2 += d * (v - s.mean);
  }

  // Chan et al.'s merge of two partial results.
  __device__ static State merge(const State& a, const State& b) {
    // Empty sides return the other exactly (and avoid 0 * inf for huge deltas).
    if (b.n == acc_t(0)) {
      return a;
    }
    if (a.n == acc_t(0)) {
      return b;
    }
    const acc_t n = a.n + b.n;
    const acc_t b_frac = b.n / n;
    const acc_t delta = b.mean - a.mean;
    return {a.mean + delta * b_frac, a.m2 + b.m2 + delta * delta * a.n * b_frac, n};
  }
};

template <typename acc_t>
struct GradSums {
  acc_t dy;      // sum(dy)
  acc_t dy_xmu;  // sum(dy * (x - mean))
};

template <typename scalar_t, typename acc_t>
struct GradSumAccumulator {
  using State = GradSums<acc_t>;
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* mean;

  __device__ static State identity() { return {acc_t(0), acc_t(0)}; }

  template <typename index_t>
  __device__ void add(State& s, index_t i, index_t channel) const {
    const acc_t g = static_cast<acc_t>(dy[i]);
    s.dy += g;
    s.dy_xmu += g * (static_cast<acc_t>(x[i]) - mean[channel]);
  }

  __device__ static State merge(const State& a, const State& b) {
    return {a.dy + b.dy, a.dy_xmu + b.dy_xmu};
  }
};

// Channels-first: grid (P, channels); element (n, c, s) at (n * C + c) * S + s.
// partial[c * P + p] receives block p's result for channel c.
template <typename Acc, typename index_t>
__global__ void reduce_channels_first_kernel(
    Acc acc, typename Acc::State* partial, index_t N, index_t C, index_t S) {
  using State = typename Acc::State;
  __shared__ State shared[kReduceThreads];
  const index_t reduce_size = N * S;
  const index_t stride = static_cast<index_t>(gridDim.x) * kReduceThreads;
  for (index_t c = blockIdx.y; c < C; c += gridDim.y) {
    State s = Acc::identity();
    for (index_t j = static_cast<index_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
         j < reduce_size; j += stride) {
      const index_t n = j / S;
      acc.add(s, (n * C + c) * S + (j - n * S), c);
    }
    shared[threadIdx.x] = s;
    __syncthreads();
    for (int half = kReduceThreads / 2; half > 0; half >>= 1) {
      if (threadIdx.x < half) {
        shared[threadIdx.x] = Acc::merge(shared[threadIdx.x], shared[threadIdx.x + half]);
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      partial[c * gridDim.x + blockIdx.x] = shared[0];
    }
    __syncthreads();  // shared is reused by the next channel
  }
}

// Channels-last: block (32 channels, 8 rows), grid (channel tiles, P);
// element (m, c) at m * C + c, m = n * S + s. Warps read 32 consecutive
// channels of a row (coalesced).
template <typename Acc, typename index_t>
__global__ void reduce_channels_last_kernel(
    Acc acc, typename Acc::State* partial, index_t M, index_t C) {
  using State = typename Acc::State;
  __shared__ State shared[kTileRows][kTileChannels];
  const index_t c = static_cast<index_t>(blockIdx.x) * kTileChannels + threadIdx.x;
  const index_t stride = static_cast<index_t>(gridDim.y) * kTileRows;
  State s = Acc::identity();
  if (c < C) {
    for (index_t m = static_cast<index_t>(blockIdx.y) * kTileRows + threadIdx.y; m < M; m += stride) {
      acc.add(s, m * C + c, c);
    }
  }
  shared[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  for (int half = kTileRows / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
      shared[threadIdx.y][threadIdx.x] =
          Acc::merge(shared[threadIdx.y][threadIdx.x], shared[threadIdx.y + half][threadIdx.x]);
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) {
    partial[c * gridDim.y + blockIdx.y] = shared[0][threadIdx.x];
  }
}

}  // namespace fastbn::cuda
