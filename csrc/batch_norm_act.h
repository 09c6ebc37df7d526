// Argument checks of the fused batch norm + residual add + activation
// operators, shared by the CPU and CUDA backends (the batch norm arguments go
// through batch_norm.h's checks first). In a header of their own so that the
// fused operators add to batch_norm.h's checks without editing them.
#pragma once

#include "batch_norm.h"

#include <ATen/ops/add.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <optional>

namespace fastbn {

// `t` (the residual, or the saved output in the backward) must have the
// input's shape, dtype and device.
inline void check_like_input(const Tensor& t, const char* name, const Tensor& input, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(
      t.sizes() == input.sizes(), op, ": expected ", name, " of the input's shape ",
      shape_string(input), ", got ", shape_string(t));
  TORCH_CHECK(
      t.scalar_type() == input.scalar_type(), op, ": expected ", name, " of the input's dtype ",
      input.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(
      t.device() == input.device(), op, ": expected ", name, " on the input's device ",
      input.device(), ", got ", name, " on ", t.device());
}

inline at::ScalarType check_act_train_args(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var) {
  const at::ScalarType param_type = check_train_args(input, weight, bias, running_mean, running_var);
  if (const Tensor* r = get_if_defined(residual)) {
    check_like_input(*r, "residual", input, "fastbn.batch_norm_act (training)");
  }
  return param_type;
}

inline at::ScalarType check_act_eval_args(
    const Tensor& input, const OptTensor& residual, const Tensor& running_mean,
    const Tensor& running_var, const OptTensor& weight, const OptTensor& bias) {
  const at::ScalarType param_type = check_eval_args(input, running_mean, running_var, weight, bias);
  if (const Tensor* r = get_if_defined(residual)) {
    check_like_input(*r, "residual", input, "fastbn.batch_norm_act (eval)");
  }
  return param_type;
}

inline at::ScalarType check_act_backward_args(
    const Tensor& grad_output, const OptTensor& output, const Tensor& input,
    const OptTensor& weight, const Tensor& mean, const Tensor& invstd, bool relu) {
  constexpr const char* op = "fastbn.batch_norm_act_backward";
  const at::ScalarType param_type = check_backward_args(grad_output, input, weight, mean, invstd);
  const Tensor* y = get_if_defined(output);
  TORCH_CHECK(
      y != nullptr || !relu, op,
      ": the forward's output is required with relu=True (its sign is the ReLU's mask)");
  if (y != nullptr) {
    check_like_input(*y, "output", input, op);
  }
  return param_type;
}

// The forward's tensors as the kernels walk them: the input (copied to a
// walkable layout when it has none), its geometry, and the residual (if any)
// in the input's layout.
struct ActForwardInputs {
  Tensor x;
  Geometry g;
  Tensor residual;
  ActForwardInputs(const Tensor& input, const OptTensor& residual_arg)
      : x(to_walkable(input)), g(geometry_of(x, *direct_layout(x))) {
    if (const Tensor* r = get_if_defined(residual_arg)) {
      residual = to_layout_of(*r, x);
    }
  }
  template <typename scalar_t>
  const scalar_t* residual_data() const {
    return residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
  }
};

using ActGrads = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor>;

// The backward's results for an input without elements, as torch gives them.
inline ActGrads empty_input_act_grads(
    const Tensor& input, at::ScalarType param_type, std::array<bool, 4> output_mask) {
  const auto param_options = input.options().dtype(param_type);
  const int64_t C = input.size(1);
  return {output_mask[0] ? OptTensor(at::empty_like(input)) : std::nullopt,
          output_mask[1] ? OptTensor(at::empty_like(input)) : std::nullopt,
          output_mask[2] ? OptTensor(at::zeros({C}, param_options)) : std::nullopt,
          output_mask[3] ? OptTensor(at::zeros({C}, param_options)) : std::nullopt};
}

// The result of an output that was asked for (else nullopt), copied over
// from the kernel's scratch buffer where it wrote one.
inline OptTensor finished(std::optional<OutputLike>& out) {
  if (!out) {
    return std::nullopt;
  }
  out->finish();
  return out->result;
}

// running = (1 - momentum) * running + momentum * batch, computed in the
// batch statistic's dtype (acc_t) and stored in the running statistic's.
// Per-channel work on C values: ATen's ops, on either device.
inline void update_running(const Tensor& running, const Tensor& batch, double momentum) {
  running.copy_(running.to(batch.scalar_type()).mul(1.0 - momentum).add(batch, momentum));
}

// The training forward's last steps on either device: the running-stat
// update, the output copied over when the kernel wrote a scratch buffer.
inline std::tuple<Tensor, Tensor, Tensor> finish_act_train(
    OutputLike& out, const Tensor& save_mean, const Tensor& save_invstd, const Tensor& unbiased_var,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum) {
  if (const Tensor* rm = get_if_defined(running_mean)) {
    update_running(*rm, save_mean, momentum);
    update_running(*get_if_defined(running_var), unbiased_var, momentum);
  }
  out.finish();
  return {out.result, save_mean, save_invstd};
}

}  // namespace fastbn
