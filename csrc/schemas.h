// The fastbn operator schemas, defined once. The library `fastbn` declares
// them (csrc/fastbn.cpp); the test-only SIMT backend declares the same
// schemas for its library `fastbn_simt` (csrc/simt/module.cpp), so the
// emulated CUDA kernels can never be mistaken for the CPU ones.
#pragma once

#include <torch/library.h>

namespace fastbn {

inline void define_schemas(torch::Library& m) {
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
  // SyncBatchNorm (fastbn/sync.py), one training step across processes:
  //   stats = sync_batch_norm_stats(input, ...)     this process's statistics
  //   all_gather(stats)                               -> [world, 3, C]
  //   mean, invstd, count = sync_batch_norm_gather_stats(gathered, ...)
  //   output = sync_batch_norm_elemt(input, ...)
  // and backward:
  //   sums = sync_batch_norm_backward_reduce(...)   this process's sums
  //   all_reduce(sums)
  //   grad_input = sync_batch_norm_backward_elemt(...)
  //
  // Per-channel (count, mean, M2) of the input, packed as one [3, C] tensor
  // in the accumulation dtype (float32, or float64 for float64 input); an
  // empty input gives count 0, mean 0, M2 0. weight, bias and the running
  // statistics are only checked (the layer's whole step is validated before
  // any collective, so bad input fails on its own rank without a deadlock).
  m.def(
      "sync_batch_norm_stats(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor? running_mean, Tensor? running_var) -> Tensor");
  // Merges gathered [world, 3, C] statistics with Chan's formula in rank
  // order (every rank gets bitwise the same result) and updates running_mean
  // / running_var in place with the global unbiased variance, by `momentum`,
  // or, when num_batches_tracked is given, by 1 / (num_batches_tracked + 1)
  // read on the device (momentum=None: no host synchronisation). Returns the
  // global (mean, invstd, count), each [C] in the stats' dtype. The count is
  // not checked here (it lives on the device): callers reject count <= 1.
  m.def(
      "sync_batch_norm_gather_stats(Tensor stats, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor? num_batches_tracked, float momentum, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // output = (input - mean) * invstd * weight + bias.
  m.def(
      "sync_batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd) -> Tensor");
  // This process's per-channel (sum(dy), sum(dy * (x - mean))), packed as one
  // [2, C] tensor in the accumulation dtype, ready for all_reduce.
  m.def(
      "sync_batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean) -> Tensor");
  // grad_input from the global sums [2, C] and the global count [C]:
  //   (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count) * invstd * weight.
  m.def(
      "sync_batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor invstd, Tensor sums, Tensor count) -> Tensor");
  // Fused batch norm + residual add + activation:
  //   output = act(batch_norm(input) + residual)
  // residual is optional (None adds nothing) and act is ReLU when `relu`,
  // else the identity. Statistics and running-stat updates as in
  // batch_norm_train / batch_norm_eval.
  m.def(
      "batch_norm_act_train(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, float momentum, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_act_eval(Tensor input, Tensor? residual, Tensor running_mean, "
      "Tensor running_var, Tensor? weight, Tensor? bias, float eps, bool relu) -> Tensor");
  // Backward of either fused forward. `output` is the forward's output, whose
  // sign is the ReLU's mask (no pre-activation tensor is kept; required with
  // relu, unused without); with relu, the
  // gradient at an output of exactly 0 is 0, as torch's ReLU backward gives.
  // output_mask selects (grad_input, grad_residual, grad_weight, grad_bias);
  // grad_residual is the gradient that reaches the add.
  m.def(
      "batch_norm_act_backward(Tensor grad_output, Tensor? output, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor invstd, bool training, bool relu, bool[4] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?)");
}

}  // namespace fastbn
