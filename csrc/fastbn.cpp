// The fastbn library: its schemas (written once, in schemas.h) and its direct
// Python bindings. The backends register implementations in csrc/cpu and
// csrc/cuda, autograd lives in csrc/autograd.cpp and the fake (meta) kernels
// in fastbn/ops.py.
#include "op_handles.h"
#include "schemas.h"
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
}
