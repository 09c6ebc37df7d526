// Per-channel reductions on the GPU: Welford statistics and the backward's
// gradient sums share one pair of kernels (channels-first, channels-last),
// parameterised by an accumulator type.
//
// P blocks per channel (channels-first) or per tile of 32 channels
// (channels-last) each reduce their share to one partial; the last block of
// each channel group to arrive (an arrival counter per group) merges the
// group's partials in a fixed order and finishes the channel (statistics,
// running-stat update, gradient sums) in the same launch. The only atomic is
// the arrival count, so the result is the same from run to run.
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
    add_value(s, static_cast<acc_t>(x[i]) - static_cast<acc_t>(x[channel * shift_stride]));
  }

  // One shifted value v = x - shift (the single-pass kernels read x once
  // and pass it here).
  __device__ static void add_value(State& s, acc_t v) {
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
    add_values(s, static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]), mean[channel]);
  }

  __device__ static void add_values(State& s, acc_t g, acc_t xv, acc_t channel_mean) {
    s.dy += g;
    s.dy_xmu += g * (xv - channel_mean);
  }

  __device__ static State merge(const State& a, const State& b) {
    return {a.dy + b.dy, a.dy_xmu + b.dy_xmu};
  }
};

// Tree merges in shared memory, in a fixed order (deterministic): the whole
// block into shared[0], or each channel column of a tile into shared[0][x].
// Callers have written their entries and synchronised.
template <typename Acc>
__device__ __forceinline__ void merge_block(typename Acc::State (&shared)[kReduceThreads]) {
  for (int half = kReduceThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      shared[threadIdx.x] = Acc::merge(shared[threadIdx.x], shared[threadIdx.x + half]);
    }
    __syncthreads();
  }
}

template <typename Acc>
__device__ __forceinline__ void merge_tile_rows(typename Acc::State (&shared)[kTileRows][kTileChannels]) {
  for (int half = kTileRows / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) {
      shared[threadIdx.y][threadIdx.x] =
          Acc::merge(shared[threadIdx.y][threadIdx.x], shared[threadIdx.y + half][threadIdx.x]);
    }
    __syncthreads();
  }
}

// Merges one channel's P partials in a fixed order into shared[0]: thread t
// takes p = t, t + 256, ..., then a tree over threads. Every block that
// merges the same partials gets the same bits.
template <typename Acc, typename index_t>
__device__ __forceinline__ void merge_partials(
    typename Acc::State (&shared)[kReduceThreads], const typename Acc::State* partials, index_t P) {
  typename Acc::State s = Acc::identity();
  for (index_t p = threadIdx.x; p < P; p += kReduceThreads) {
    s = Acc::merge(s, partials[p]);
  }
  shared[threadIdx.x] = s;
  __syncthreads();
  merge_block<Acc>(shared);
}

// Arrival protocol shared by both reduction kernels: every block writes its
// partials, fences them and counts itself in on its group's counter; the block
// that arrives last (the counter reads gridsize - 1) owns every partial of the
// group, merges them and calls the finisher, then resets the counter to zero
// for the next launch on the stream. No memset and no host synchronisation
// per call: the counters are zeroed once when their buffer is created.
// Returns true in every thread of the last block.
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned blocks_in_group) {
  __shared__ bool is_last;
  __threadfence();  // this block's partials are visible before it counts itself in
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    is_last = atomicAdd(counter, 1u) == blocks_in_group - 1;
    if (is_last) {
      *counter = 0u;  // every block of the group has arrived: nobody reads it again
    }
  }
  __syncthreads();
  if (is_last) {
    __threadfence();  // other blocks' partials are read after their arrival
  }
  return is_last;
}

// Calls f(j, n, s) for j = first, first + step, ... below last, where j
// indexes one channel's N * S values (rows of S: j = n * S + s). (n, s) is
// carried from one j to the next (two divisions per call, none per element).
template <typename index_t, typename F>
__device__ __forceinline__ void walk_channel(index_t first, index_t last, index_t step, index_t S, const F& f) {
  if (first >= last) {
    return;
  }
  index_t n = first / S;
  index_t s = first - n * S;
  const index_t step_n = step / S;
  const index_t step_s = step - step_n * S;
  for (index_t j = first; j < last; j += step) {
    f(j, n, s);
    n += step_n;
    s += step_s;
    if (s >= S) {
      s -= S;
      ++n;
    }
  }
}

// Channels-first: grid (P, channel groups); element (n, c, s) at
// (n * C + c) * S + s. partial[c * P + p] receives block p's result for
// channel c; the last block of a channel group (blockIdx.y) merges each of its
// channels' P partials in a fixed order (thread t takes p = t, t + 256, ...,
// then a tree over threads) and hands the result to fin(c, state).
template <typename Acc, typename Fin, typename index_t>
__global__ void reduce_channels_first_kernel(
    Acc acc, Fin fin, typename Acc::State* partial, unsigned* counters, index_t N, index_t C,
    index_t S) {
  using State = typename Acc::State;
  __shared__ State shared[kReduceThreads];
  const index_t reduce_size = N * S;
  const index_t stride = static_cast<index_t>(gridDim.x) * kReduceThreads;
  for (index_t c = blockIdx.y; c < C; c += gridDim.y) {
    State s = Acc::identity();
    walk_channel<index_t>(
        static_cast<index_t>(blockIdx.x) * kReduceThreads + threadIdx.x, reduce_size, stride, S,
        [&](index_t, index_t n, index_t sp) { acc.add(s, (n * C + c) * S + sp, c); });
    shared[threadIdx.x] = s;
    __syncthreads();
    merge_block<Acc>(shared);
    if (threadIdx.x == 0) {
      partial[c * gridDim.x + blockIdx.x] = shared[0];
    }
    __syncthreads();  // shared is reused by the next channel
  }
  if (!arrive_last(&counters[blockIdx.y], gridDim.x)) {
    return;
  }
  const index_t P = gridDim.x;
  for (index_t c = blockIdx.y; c < C; c += gridDim.y) {
    merge_partials<Acc>(shared, partial + c * P, P);
    if (threadIdx.x == 0) {
      fin(static_cast<int64_t>(c), shared[0]);
    }
    __syncthreads();
  }
}

// Channels-last: block (32 channels, 8 rows), grid (channel tiles, P);
// element (m, c) at m * C + c, m = n * S + s. Warps read 32 consecutive
// channels of a row (coalesced). The last block of a tile (blockIdx.x)
// merges the tile's partials: row ty takes p = ty, ty + 8, ..., then a tree
// over rows.
template <typename Acc, typename Fin, typename index_t>
__global__ void reduce_channels_last_kernel(
    Acc acc, Fin fin, typename Acc::State* partial, unsigned* counters, index_t M, index_t C) {
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
  merge_tile_rows<Acc>(shared);
  if (threadIdx.y == 0 && c < C) {
    partial[c * gridDim.y + blockIdx.y] = shared[0][threadIdx.x];
  }
  if (!arrive_last(&counters[blockIdx.x], gridDim.y)) {
    return;
  }
  const index_t P = gridDim.y;
  State merged = Acc::identity();
  if (c < C) {
    for (index_t p = threadIdx.y; p < P; p += kTileRows) {
      merged = Acc::merge(merged, partial[c * P + p]);
    }
  }
  __syncthreads();  // the tree above has finished reading shared in every thread
  shared[threadIdx.y][threadIdx.x] = merged;
  __syncthreads();
  merge_tile_rows<Acc>(shared);
  if (threadIdx.y == 0 && c < C) {
    fin(static_cast<int64_t>(c), shared[0][threadIdx.x]);
  }
}

}  // namespace fastbn::cuda
