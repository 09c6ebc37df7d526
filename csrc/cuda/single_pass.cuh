// Single-pass (cooperative, persistent) kernels: one launch for a training
// forward or a training backward whose data fits on chip.
//
// Every block of a cooperative launch (all resident at once) takes one part of
// each of its channels (channels-first) or channel tiles (channels-last),
// reads it once from global memory into dynamic shared memory while reducing
// it (Welford, or the gradient sums), and writes its partial per channel.
// After a grid-wide synchronisation each block merges its channels' partials
// itself, in the same fixed order as every other block of the channel (so the
// constants agree bitwise and the result does not depend on scheduling); the
// block holding part 0 writes the channel's outputs (statistics and running
// statistics, or the parameter gradients). Then each block applies the
// elementwise formula to the data still in shared memory: the input crosses
// DRAM once (2N bytes forward, 3N backward).
//
// An Op supplies the reduction and the formula (batch_norm_cuda.cu):
//   scalar_t, acc_t, State, Acc (identity, merge), Channel, kInputs (1 or 2);
//   in0, in1, out: the tensors;
//   channel_pre(c): a per-channel value the accumulation needs (shift, mean);
//   add(state, pre, v0, v1): accumulate one element;
//   finish(c, merged, owner): the channel's constants (owner: write outputs);
//   apply(constants, v0, v1): one output element.
#pragma once

#include "reductions.cuh"

#include <cooperative_groups.h>

namespace fastbn::cuda {

// Bytes of dynamic shared memory ahead of the cached data: one State per
// thread for the block's tree merges, rounded up to 16 bytes.
template <typename State>
constexpr size_t single_pass_merge_bytes() {
  return (sizeof(State) * kReduceThreads + 15) / 16 * 16;
}

__device__ __forceinline__ unsigned char* single_pass_shared() {
  extern __shared__ __align__(16) unsigned char single_pass_smem[];
  return single_pass_smem;
}

// Channels-first: grid (P parts, G channel groups), 256 threads. Block (p, g)
// takes channels c = g, g + G, ... (the k-th of them cached at k * part_len)
// and, of each, values j in [p * part_len, (p + 1) * part_len) of its N * S.
template <typename Op, typename index_t>
__global__ void single_pass_channels_first_kernel(
    Op op, typename Op::State* partial, index_t N, index_t C, index_t S, index_t part_len,
    index_t cache_len) {
  using State = typename Op::State;
  using Acc = typename Op::Acc;
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  unsigned char* smem = single_pass_shared();
  auto& merge = *reinterpret_cast<State(*)[kReduceThreads]>(smem);
  scalar_t* cache0 = reinterpret_cast<scalar_t*>(smem + single_pass_merge_bytes<State>());
  scalar_t* cache1 = cache0 + cache_len;
  const index_t reduce_size = N * S;
  const index_t p = blockIdx.x;
  const index_t P = gridDim.x;
  const index_t begin = p * part_len < reduce_size ? p * part_len : reduce_size;
  const index_t end = reduce_size - begin < part_len ? reduce_size : begin + part_len;
  const index_t first = begin + static_cast<index_t>(threadIdx.x);

  index_t k = 0;
  for (index_t c = blockIdx.y; c < C; c += gridDim.y, ++k) {
    const acc_t pre = op.channel_pre(c);
    scalar_t* slot0 = cache0 + k * part_len - begin;
    scalar_t* slot1 = cache1 + k * part_len - begin;
    State s = Acc::identity();
    walk_channel<index_t>(first, end, kReduceThreads, S, [&](index_t j, index_t n, index_t sp) {
      const index_t i = (n * C + c) * S + sp;
      const scalar_t v0 = op.in0[i];
      slot0[j] = v0;
      scalar_t v1 = v0;
      if constexpr (Op::kInputs == 2) {
        v1 = op.in1[i];
        slot1[j] = v1;
      }
      op.add(s, pre, static_cast<acc_t>(v0), static_cast<acc_t>(v1));
    });
    merge[threadIdx.x] = s;
    __syncthreads();
    merge_block<Acc>(merge);
    if (threadIdx.x == 0) {
      partial[c * P + p] = merge[0];
    }
    __syncthreads();  // merge is reused by the next channel
  }

  cooperative_groups::this_grid().sync();

  k = 0;
  for (index_t c = blockIdx.y; c < C; c += gridDim.y, ++k) {
    merge_partials<Acc>(merge, partial + c * P, P);
    const typename Op::Channel constants = op.finish(c, merge[0], p == 0 && threadIdx.x == 0);
    __syncthreads();  // every thread has read merge[0]
    const scalar_t* slot0 = cache0 + k * part_len - begin;
    const scalar_t* slot1 = cache1 + k * part_len - begin;
    walk_channel<index_t>(first, end, kReduceThreads, S, [&](index_t j, index_t n, index_t sp) {
      const acc_t v1 = Op::kInputs == 2 ? static_cast<acc_t>(slot1[j]) : acc_t(0);
      op.out[(n * C + c) * S + sp] = static_cast<scalar_t>(op.apply(constants, static_cast<acc_t>(slot0[j]), v1));
    });
  }
}

// Channels-last: grid (G tile groups, P parts), block (32 channels, 8 rows).
// Block (g, p) takes channel tiles t = g, g + G, ... (the k-th cached at
// k * part_len * 32) and, of each, rows m in [p * part_len, (p + 1) * part_len).
template <typename Op, typename index_t>
__global__ void single_pass_channels_last_kernel(
    Op op, typename Op::State* partial, index_t M, index_t C, index_t part_len, index_t cache_len) {
  using State = typename Op::State;
  using Acc = typename Op::Acc;
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  unsigned char* smem = single_pass_shared();
  auto& merge = *reinterpret_cast<State(*)[kTileRows][kTileChannels]>(smem);
  scalar_t* cache0 = reinterpret_cast<scalar_t*>(smem + single_pass_merge_bytes<State>());
  scalar_t* cache1 = cache0 + cache_len;
  const index_t tiles = (C + kTileChannels - 1) / kTileChannels;
  const index_t p = blockIdx.y;
  const index_t P = gridDim.y;
  const index_t begin = p * part_len < M ? p * part_len : M;
  const index_t end = M - begin < part_len ? M : begin + part_len;
  const index_t tx = threadIdx.x;
  const index_t first = begin + static_cast<index_t>(threadIdx.y);

  index_t k = 0;
  for (index_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++k) {
    const index_t c = tile * kTileChannels + tx;
    // Row m of this tile is cached at ((k * part_len) + m - begin) * 32 + tx.
    const index_t slot = (k * part_len - begin) * kTileChannels + tx;
    State s = Acc::identity();
    if (c < C) {
      const acc_t pre = op.channel_pre(c);
      for (index_t m = first; m < end; m += kTileRows) {
        const index_t i = m * C + c;
        const scalar_t v0 = op.in0[i];
        cache0[slot + m * kTileChannels] = v0;
        scalar_t v1 = v0;
        if constexpr (Op::kInputs == 2) {
          v1 = op.in1[i];
          cache1[slot + m * kTileChannels] = v1;
        }
        op.add(s, pre, static_cast<acc_t>(v0), static_cast<acc_t>(v1));
      }
    }
    merge[threadIdx.y][tx] = s;
    __syncthreads();
    merge_tile_rows<Acc>(merge);
    if (threadIdx.y == 0 && c < C) {
      partial[c * P + p] = merge[0][tx];
    }
    __syncthreads();  // merge is reused by the next tile
  }

  cooperative_groups::this_grid().sync();

  k = 0;
  for (index_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++k) {
    const index_t c = tile * kTileChannels + tx;
    const index_t slot = (k * part_len - begin) * kTileChannels + tx;
    State s = Acc::identity();
    if (c < C) {
      for (index_t q = threadIdx.y; q < P; q += kTileRows) {
        s = Acc::merge(s, partial[c * P + q]);
      }
    }
    merge[threadIdx.y][tx] = s;
    __syncthreads();
    merge_tile_rows<Acc>(merge);
    if (c < C) {
      const typename Op::Channel constants = op.finish(c, merge[0][tx], p == 0 && threadIdx.y == 0);
      for (index_t m = first; m < end; m += kTileRows) {
        const acc_t v1 = Op::kInputs == 2 ? static_cast<acc_t>(cache1[slot + m * kTileChannels]) : acc_t(0);
        op.out[m * C + c] =
            static_cast<scalar_t>(op.apply(constants, static_cast<acc_t>(cache0[slot + m * kTileChannels]), v1));
      }
    }
    __syncthreads();  // every thread has read merge[0] before the next tile writes it
  }
}

}  // namespace fastbn::cuda
