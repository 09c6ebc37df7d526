// Autograd for the fastbn operators, registered in C++ so that a call costs no
// Python: the forward kernels run below autograd and the backward calls
// fastbn::batch_norm_backward through the dispatcher (so fake tensors and
// torch.compile see it like any other op). Double backward is refused with a
// clear error.
#include "op_handles.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

namespace fastbn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd edges exist only for the tensors given: this maps input, weight
// and bias to their edge indices (weight and bias may be absent).
std::array<bool, 3> grads_needed(AutogradContext* ctx, bool has_weight, bool has_bias) {
  std::array<bool, 3> mask{ctx->needs_input_grad(0), false, false};
  size_t edge = 1;
  if (has_weight) {
    mask[1] = ctx->needs_input_grad(edge++);
  }
  if (has_bias) {
    mask[2] = ctx->needs_input_grad(edge);
  }
  return mask;
}

OptTensor optional_of(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

variable_list backward_result(
    const std::tuple<OptTensor, OptTensor, OptTensor>& grads, size_t num_forward_args) {
  variable_list out(num_forward_args);
  out[0] = std::get<0>(grads).value_or(Tensor());
  out[1] = std::get<1>(grads).value_or(Tensor());
  out[2] = std::get<2>(grads).value_or(Tensor());
  return out;
}

// The kernels run below ADInplaceOrView, so their in-place writes to the
// running statistics are recorded here.
void bump_running_versions(const OptTensor& running_mean, const OptTensor& running_var) {
  for (const OptTensor* running : {&running_mean, &running_var}) {
    if (const Tensor* t = get_if_defined(*running)) {
      torch::autograd::increment_version(*t);
    }
  }
}

struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
      const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
    Tensor out, save_mean, save_invstd;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, save_mean, save_invstd) =
          train_op().call(input, weight, bias, running_mean, running_var, momentum, eps);
    }
    bump_running_versions(running_mean, running_var);
    const Tensor* w = get_if_defined(weight);
    ctx->save_for_backward({input, w ? *w : Tensor(), save_mean, save_invstd});
    ctx->saved_data["has_bias"] = get_if_defined(bias) != nullptr;
    ctx->mark_non_differentiable({save_mean, save_invstd});
    return {out, save_mean, save_invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) {
      return variable_list(7);
    }
    const std::array<bool, 3> mask =
        grads_needed(ctx, saved[1].defined(), ctx->saved_data["has_bias"].toBool());
    return backward_result(
        backward_op().call(grad_out, saved[0], optional_of(saved[1]), saved[2], saved[3], true, mask),
        7);
  }
};

struct BatchNormEval : public torch::autograd::Function<BatchNormEval> {
  static variable_list forward(
      AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
      const Tensor& running_mean, const Tensor& running_var, double eps) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = eval_op().call(input, running_mean, running_var, weight, bias, eps);
    }
    const Tensor* w = get_if_defined(weight);
    ctx->save_for_backward({input, w ? *w : Tensor(), running_mean, running_var});
    ctx->saved_data["has_bias"] = get_if_defined(bias) != nullptr;
    ctx->saved_data["eps"] = eps;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) {
      return variable_list(6);
    }
    const std::array<bool, 3> mask =
        grads_needed(ctx, saved[1].defined(), ctx->saved_data["has_bias"].toBool());
    const Tensor& input = saved[0];
    const at::ScalarType acc = acc_dtype(input.scalar_type());
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor mean = saved[2].to(acc);
    const Tensor invstd = saved[3].to(acc).add(eps).rsqrt();
    return backward_result(
        backward_op().call(grad_out, input, optional_of(saved[1]), mean, invstd, false, mask), 6);
  }
};

// True when autograd has nothing to record: then the autograd kernels call
// straight through, skipping the graph node's construction.
bool no_grad_needed(const Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  if (!c10::GradMode::is_enabled()) {
    return true;
  }
  const Tensor* w = get_if_defined(weight);
  const Tensor* b = get_if_defined(bias);
  return !input.requires_grad() && !(w && w->requires_grad()) && !(b && b->requires_grad());
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
  if (no_grad_needed(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto result = train_op().call(input, weight, bias, running_mean, running_var, momentum, eps);
    bump_running_versions(running_mean, running_var);
    return result;
  }
  variable_list out =
      BatchNormTrain::apply(input, weight, bias, running_mean, running_var, momentum, eps);
  return {out[0], out[1], out[2]};
}

Tensor batch_norm_eval_autograd(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  if (no_grad_needed(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return eval_op().call(input, running_mean, running_var, weight, bias, eps);
  }
  return BatchNormEval::apply(input, weight, bias, running_mean, running_var, eps)[0];
}

std::tuple<OptTensor, OptTensor, OptTensor> batch_norm_backward_autograd(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
    const Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  const Tensor* w = get_if_defined(weight);
  const bool differentiable_inputs = grad_output.requires_grad() || input.requires_grad() ||
      (w != nullptr && w->requires_grad()) || mean.requires_grad() || invstd.requires_grad();
  TORCH_CHECK(
      !(c10::GradMode::is_enabled() && differentiable_inputs),
      "fastbn.batch_norm does not support double backward (differentiating its gradient, e.g. "
      "backward with create_graph=True); use torch.nn.functional.batch_norm for "
      "higher-order gradients");
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op().call(grad_output, input, weight, mean, invstd, training, output_mask);
}

}  // namespace
}  // namespace fastbn

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) {
  m.impl("batch_norm_train", &fastbn::batch_norm_train_autograd);
  m.impl("batch_norm_eval", &fastbn::batch_norm_eval_autograd);
  m.impl("batch_norm_backward", &fastbn::batch_norm_backward_autograd);
}
