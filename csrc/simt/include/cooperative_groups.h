// SIMT backend: the part of <cooperative_groups.h> the kernels may use.
#pragma once
#include "../simt.h"

namespace cooperative_groups {

class thread_block {
 public:
  void sync() const { __syncthreads(); }
  unsigned long long size() const { return 1ull * blockDim.x * blockDim.y * blockDim.z; }
  unsigned long long thread_rank() const {
    return threadIdx.x + 1ull * blockDim.x * (threadIdx.y + 1ull * blockDim.y * threadIdx.z);
  }
  dim3 group_index() const { return dim3(blockIdx.x, blockIdx.y, blockIdx.z); }
  dim3 thread_index() const { return dim3(threadIdx.x, threadIdx.y, threadIdx.z); }
};

// grid.sync() is a barrier over every thread of a cooperative launch; in any
// other launch it is reported as an error.
class grid_group {
 public:
  void sync() const { ::simt::detail::grid_sync(SIMT_SITE); }
  bool is_valid() const { return true; }
  unsigned long long size() const {
    return thread_block().size() * gridDim.x * gridDim.y * gridDim.z;
  }
  unsigned long long block_rank() const {
    return blockIdx.x + 1ull * gridDim.x * (blockIdx.y + 1ull * gridDim.y * blockIdx.z);
  }
  unsigned long long thread_rank() const {
    return block_rank() * thread_block().size() + thread_block().thread_rank();
  }
};

inline thread_block this_thread_block() { return {}; }
inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups
