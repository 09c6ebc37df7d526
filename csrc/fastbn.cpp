// The fastbn operator schemas. This is the only place they are declared; the
// backends register implementations in csrc/cpu and csrc/cuda, autograd lives
// in csrc/autograd.cpp and the fake (meta) kernels in fastbn/ops.py.
#include "op_handles.h"
#include "cpu/output_pool.h"

#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastbn, m) {
  // Training forward: normalises with the batch statistics and, when given,
  // updates running_mean / running_var in place:
  //   running = (1 - momentum) * running + momentum * batch   (unbiased var).
  // Returns (output, save_mean, save_invstd); the statistics are float32 for
  // half/bfloat16/float32 inputs and float64 for float64 inputs.
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  // Evaluation forward with the running statistics.
  m.def(
      "batch_norm_eval(Tensor input, Tensor running_mean, Tensor running_var, "
      "Tensor? weight, Tensor? bias, float eps) -> Tensor");
  // Backward of either forward. `mean` / `invstd` are the statistics the
  // forward normalised with (save_mean / save_invstd in training, the running
  // statistics in evaluation); output_mask selects which of
  // (grad_input, grad_weight, grad_bias) are computed, the others are None.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor invstd, bool training, bool[3] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?)");
}

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
