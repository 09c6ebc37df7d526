// The fastbn library: its schemas (written once, in schemas.h) and its direct
// Python bindings. The backends register implementations in csrc/cpu and
// csrc/cuda, autograd lives in csrc/autograd.cpp and the fake (meta) kernels
// in fastbn/ops.py.
#include "op_handles.h"
#include "schemas.h"
#include "cpu/kernels.h"
#include "cpu/output_pool.h"

#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastbn, m) { fastbn::define_schemas(m); }

// Direct Python bindings of the same operators (through the dispatcher, so
// autograd and every backend apply). Eager calls use them because a pybind
// call costs a few microseconds less than torch.ops' boxed call; traced and
// compiled code uses torch.ops.fastbn.*.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "batch_norm_train",
      [](const fastbn::Tensor& input, const fastbn::OptTensor& weight,
         const fastbn::OptTensor& bias, const fastbn::OptTensor& running_mean,
         const fastbn::OptTensor& running_var, double momentum, double eps) {
        return fastbn::train_op().call(input, weight, bias, running_mean, running_var, momentum, eps);
      });
  m.def(
      "batch_norm_eval",
      [](const fastbn::Tensor& input, const fastbn::Tensor& running_mean,
         const fastbn::Tensor& running_var, const fastbn::OptTensor& weight,
         const fastbn::OptTensor& bias, double eps) {
        return fastbn::eval_op().call(input, running_mean, running_var, weight, bias, eps);
      });
  m.def(
      "cpu_cache_release", [] { fastbn::cpu::OutputPool::get().release_cached(); },
      "Frees the CPU output pool's cached blocks.");
  m.def(
      "cpu_cache_info",
      [] {
        auto& pool = fastbn::cpu::OutputPool::get();
        return std::make_pair(pool.cached_bytes(), pool.limit_bytes());
      },
      "(cached bytes, limit bytes) of the CPU output pool.");
  m.def(
      "cpu_isa",
      [] {
        std::vector<std::string> built;
        for (int i = 0; i < fastbn::cpu::kCpuIsaCount; ++i) {
          const auto isa = static_cast<fastbn::cpu::CpuIsa>(i);
          if (fastbn::cpu::isa_built(isa)) {
            built.emplace_back(fastbn::cpu::isa_name(isa));
          }
        }
        return std::make_pair(std::string(fastbn::cpu::isa_name(fastbn::cpu::active_isa())), built);
      },
      "(the CPU kernel variant in use, the variants built).");
  m.def(
      "cpu_caches",
      [] {
        const auto& caches = fastbn::cpu::machine_cache_sizes();
        return std::make_tuple(caches.l2_per_core, caches.llc, fastbn::cpu::active_stream_min_bytes(),
                               fastbn::cpu::active_prefetch_min_bytes());
      },
      "(L2 bytes per core, last-level cache bytes, streaming threshold in bytes moved per pass now, "
      "software-prefetch threshold in bytes moved per pass now).");
  m.def(
      "stream_min_bytes",
      [](int64_t l2_per_core, int64_t llc, int64_t threads) {
        return fastbn::cpu::stream_min_bytes(fastbn::cpu::CacheSizes{l2_per_core, llc}, threads);
      },
      "The streaming rule for the given cache sizes and thread count (tests).");
  m.def(
      "prefetch_min_bytes",
      [](int64_t l2_per_core, int64_t llc) {
        return fastbn::cpu::prefetch_min_bytes(fastbn::cpu::CacheSizes{l2_per_core, llc});
      },
      "The software-prefetch rule for the given cache sizes (tests).");
}
