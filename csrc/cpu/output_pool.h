// A pool of large CPU buffers for the kernels' outputs.
//
// glibc serves allocations above 32 MiB with a fresh mmap, so every new
// output of that size pays a page fault per 4 KiB on its first write: about
// 2 GB/s on the machines this was measured on, several times slower than the
// kernel's own memory traffic. Like CUDA's caching allocator, the pool keeps
// freed blocks (2 MiB aligned, transparent huge pages where the kernel allows)
// and hands them out again. Blocks under kMinPooledBytes come from torch's
// CPU allocator. The cache holds at most FASTBN_CPU_CACHE_MB MiB (default
// 1024; 0 disables the pool); fastbn.empty_cache() frees it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include <map>
#include <mutex>

namespace fastbn::cpu {

class OutputPool final : public c10::Allocator {
 public:
  static OutputPool& get();

  c10::DataPtr allocate(size_t nbytes) override;
  void copy_data(void* dest, const void* src, std::size_t count) const override;

  // Frees every cached (unused) block.
  void release_cached();
  size_t cached_bytes();
  size_t limit_bytes() const { return limit_bytes_; }

 private:
  OutputPool();
  static void return_block(void* block);

  std::mutex mutex_;
  std::multimap<size_t, void*> cached_;  // size -> block
  size_t cached_bytes_ = 0;
  size_t limit_bytes_;
};

// An uninitialised CPU tensor with these sizes and strides, from the pool.
at::Tensor empty_pooled(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype);

}  // namespace fastbn::cpu
