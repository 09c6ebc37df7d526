// Autograd for the fastbn operators, registered in C++ so that a call costs no
// Python: the forward kernels run below autograd and the backward calls
// fastbn::batch_norm_backward through the dispatcher (so fake tensors and
// torch.compile see it like any other op).
//
// Every order of differentiation keeps the kernels' first-order values:
// - reverse mode: BatchNormBackward, whose backward is the backward kernel;
// - double backward: batch_norm_backward has its own autograd
//   (BatchNormBackwardBackward), the Hessian-vector product of
//   L = <grad_output, y(input, weight, bias)> (the backward computes L's
//   gradient) written as a composite of ATen ops (second_order.h);
// - forward mode: the output tangent is the Jacobian of the op applied to the
//   input tangents, set on the output as ATen's generated kernels do. The
//   normalisation's Jacobian with respect to the input is symmetric, so that
//   share is the backward kernel applied to the input's tangent.
// Tangents are read at forward-AD level 0, the level that both
// torch.autograd.forward_ad and torch.func.jvp present to a kernel.
#include "op_handles.h"
#include "second_order.h"

#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <type_traits>

namespace fastbn {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

constexpr uint64_t kForwardLevel = 0;

bool has_tangent(const Tensor& t) {
  return t.defined() && t._fw_grad(kForwardLevel).defined();
}
bool has_tangent(const OptTensor& t) {
  return t.has_value() && has_tangent(*t);
}
Tensor tangent_of(const Tensor& t) {
  return has_tangent(t) ? t._fw_grad(kForwardLevel) : Tensor();
}
Tensor tangent_of(const OptTensor& t) {
  return t.has_value() ? tangent_of(*t) : Tensor();
}
// The value without its tangent (a view that keeps the reverse-mode graph).
Tensor primal_of(const Tensor& t) {
  return has_tangent(t) ? t._fw_primal(kForwardLevel) : t;
}
bool requires_grad(const Tensor& t) {
  return t.defined() && t.requires_grad();
}
bool requires_grad(const OptTensor& t) {
  return t.has_value() && requires_grad(*t);
}

OptTensor optional_of(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

Tensor defined_or_empty(const OptTensor& t) {
  return t.has_value() ? *t : Tensor();
}

variable_list as_list(const std::tuple<OptTensor, OptTensor, OptTensor>& grads) {
  return {defined_or_empty(std::get<0>(grads)), defined_or_empty(std::get<1>(grads)),
          defined_or_empty(std::get<2>(grads))};
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

// As torch's batch norm: the running statistics are not differentiable.
// One that requires grad is refused (its gradient would be missing), and so
// is one that carries a forward-mode tangent (its tangent would be dropped,
// and in training the in-place update would leave a stale one).
void check_running_stats_not_differentiable(
    const OptTensor& running_mean, const OptTensor& running_var) {
  for (const auto& [name, t] : {std::pair<const char*, const OptTensor*>{"running_mean", &running_mean},
                                {"running_var", &running_var}}) {
    TORCH_CHECK(
        !(c10::GradMode::is_enabled() && requires_grad(*t)),
        "fastbn.batch_norm is not differentiable with respect to argument '", name,
        "'. This input cannot have requires_grad True.");
    TORCH_CHECK(
        !has_tangent(*t),
        "fastbn.batch_norm is not differentiable with respect to running_mean and running_var: "
        "they cannot have a forward-mode tangent (forward grad) defined, got one on ", name);
  }
}

void set_tangent(const Tensor& output, const Tensor& tangent) {
  if (output.defined() && tangent.defined()) {
    output._set_fw_grad(tangent, kForwardLevel, /*is_inplace_op=*/false);
  }
}

// Graph nodes are written like the ones ATen's generated autograd kernels
// build (torch::autograd::Function cannot be used under torch.func's
// transforms). torch 2.14 holds nodes in c10::intrusive_ptr, older versions
// in std::shared_ptr: make_node follows the type Tensor::grad_fn() returns.
using NodePtr = std::decay_t<decltype(std::declval<const at::TensorBase&>().grad_fn())>;

template <typename N>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::shared_ptr<N>(new N());
  } else {
    return c10::make_intrusive<N>();
  }
}

// Backward of either forward. Edges: input, weight, bias (an absent weight
// or bias has an invalid edge, so its gradient is never asked for). The
// statistics saved are save_mean / save_invstd in training and the running
// statistics (turned into mean / invstd here) in evaluation.
struct BatchNormBackward : public Node {
  SavedVariable input_, weight_, first_stat_, second_stat_;
  bool training_ = true;
  double eps_ = 0;

  std::string name() const override {
    return training_ ? "fastbn::BatchNormTrainBackward" : "fastbn::BatchNormEvalBackward";
  }
  void release_variables() override {
    input_.reset_data();
    weight_.reset_data();
    first_stat_.reset_data();
    second_stat_.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) {
      return variable_list(3);
    }
    const auto self = getptr();
    const Tensor input = input_.unpack(self);
    Tensor mean = first_stat_.unpack(self), invstd = second_stat_.unpack(self);
    if (!training_) {
      std::tie(mean, invstd) = eval_statistics(input, mean, invstd, eps_);
    }
    const std::array<bool, 3> mask{
        should_compute_output(0), should_compute_output(1), should_compute_output(2)};
    // Through the dispatcher with autograd: differentiable again under create_graph.
    return as_list(backward_op().call(
        grad_out, input, optional_of(weight_.unpack(self)), mean, invstd, training_, mask));
  }
};

// Records `out` as the output of a BatchNormBackward node.
void record_forward(
    const Tensor& out, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const Tensor& first_stat, const Tensor& second_stat, bool training, double eps) {
  auto node = make_node<BatchNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  node->input_ = SavedVariable(input, false);
  node->weight_ = SavedVariable(defined_or_empty(weight), false);
  node->first_stat_ = SavedVariable(first_stat, false);
  node->second_stat_ = SavedVariable(second_stat, false);
  node->training_ = training;
  node->eps_ = eps;
  torch::autograd::set_history(out, node);
}

// Backward of the backward op: the double backward. Edges: grad_output,
// input, weight. In training, mean and invstd are taken to be the input's
// batch statistics (as the forward saved them), so their dependence on the
// input is part of the formula; they get no gradient of their own.
struct BatchNormBackwardBackward : public Node {
  SavedVariable grad_output_, input_, weight_, mean_, invstd_;
  bool training_ = true;

  std::string name() const override { return "fastbn::BatchNormBackwardBackward"; }
  void release_variables() override {
    grad_output_.reset_data();
    input_.reset_data();
    weight_.reset_data();
    mean_.reset_data();
    invstd_.reset_data();
  }
  // grads: of grad_input, grad_weight, grad_bias (any may be undefined).
  variable_list apply(variable_list&& grads) override {
    const auto self = getptr();
    const Tensor input = input_.unpack(self), weight = weight_.unpack(self);
    const Channelwise stats{mean_.unpack(self), invstd_.unpack(self), training_};
    variable_list out(3);
    if (should_compute_output(0)) {
      out[0] = jacobian_product(input, weight, stats, grads[0], grads[1], grads[2]);
    }
    const bool input_grad = should_compute_output(1);
    const bool weight_grad = should_compute_output(2);
    if (input_grad || weight_grad) {
      std::tie(out[1], out[2]) = hessian_product(
          grad_output_.unpack(self), input, weight, stats, grads[0],
          weight.defined() ? grads[1] : Tensor(), input_grad, weight_grad);
    }
    return out;
  }
};

// True when autograd has nothing to record and no tangent to carry: then the
// autograd kernels call straight through, skipping the graph node's
// construction. Takes the op's tensor arguments (Tensor or optional).
template <typename... Tensors>
bool plain_call(const Tensors&... tensors) {
  if ((has_tangent(tensors) || ...)) {
    return false;
  }
  return !c10::GradMode::is_enabled() || !(requires_grad(tensors) || ...);
}

// True when a call on these primals must be recorded for reverse mode.
template <typename... Tensors>
bool graph_needed(const Tensors&... tensors) {
  return c10::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
  if (plain_call(input, weight, bias, running_mean, running_var)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto result = train_op().call(input, weight, bias, running_mean, running_var, momentum, eps);
    bump_running_versions(running_mean, running_var);
    return result;
  }
  check_running_stats_not_differentiable(running_mean, running_var);
  Tensor out, save_mean, save_invstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, save_mean, save_invstd) =
        train_op().call(input, weight, bias, running_mean, running_var, momentum, eps);
  }
  bump_running_versions(running_mean, running_var);
  if (graph_needed(input, weight, bias)) {
    record_forward(out, input, weight, bias, save_mean, save_invstd, /*training=*/true, eps);
  }
  const Tensor input_t = tangent_of(input), weight_t = tangent_of(weight), bias_t = tangent_of(bias);
  if (input_t.defined() || weight_t.defined() || bias_t.defined()) {
    const Channelwise stats{save_mean, save_invstd, /*training=*/true};
    set_tangent(
        out, jacobian_product(primal_of(input), primal_of(defined_or_empty(weight)), stats, input_t,
                              weight_t, bias_t));
  }
  return {out, save_mean, save_invstd};
}

Tensor batch_norm_eval_autograd(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  if (plain_call(input, weight, bias, running_mean, running_var)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return eval_op().call(input, running_mean, running_var, weight, bias, eps);
  }
  check_running_stats_not_differentiable(running_mean, running_var);
  Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = eval_op().call(input, running_mean, running_var, weight, bias, eps);
  }
  if (graph_needed(input, weight, bias)) {
    record_forward(out, input, weight, bias, running_mean, running_var, /*training=*/false, eps);
  }
  const Tensor input_t = tangent_of(input), weight_t = tangent_of(weight), bias_t = tangent_of(bias);
  if (input_t.defined() || weight_t.defined() || bias_t.defined()) {
    const Tensor input_p = primal_of(input);
    const auto [mean, invstd] = eval_statistics(input_p, running_mean, running_var, eps);
    const Channelwise stats{mean, invstd, /*training=*/false};
    set_tangent(
        out, jacobian_product(input_p, primal_of(defined_or_empty(weight)), stats, input_t,
                              weight_t, bias_t));
  }
  return out;
}

std::tuple<OptTensor, OptTensor, OptTensor> batch_norm_backward_autograd(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
    const Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  if (plain_call(grad_output, input, weight, mean, invstd)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return backward_op().call(grad_output, input, weight, mean, invstd, training, output_mask);
  }
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"mean", &mean}, {"invstd", &invstd}}) {
    TORCH_CHECK(
        !(c10::GradMode::is_enabled() && t->requires_grad()) && !has_tangent(*t),
        "fastbn.batch_norm_backward is not differentiable with respect to '", name,
        "' (the statistics are functions of the input); it cannot require grad or carry a "
        "forward-mode tangent");
  }
  OptTensor grad_input, grad_weight, grad_bias;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(grad_input, grad_weight, grad_bias) =
        backward_op().call(grad_output, input, weight, mean, invstd, training, output_mask);
  }
  if (graph_needed(grad_output, input, weight)) {
    auto node = make_node<BatchNormBackwardBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(grad_output, input, weight));
    node->grad_output_ = SavedVariable(grad_output, false);
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(defined_or_empty(weight), false);
    node->mean_ = SavedVariable(mean, false);
    node->invstd_ = SavedVariable(invstd, false);
    node->training_ = training;
    torch::autograd::set_history(
        {defined_or_empty(grad_input), defined_or_empty(grad_weight), defined_or_empty(grad_bias)},
        node);
  }
  const Tensor grad_output_t = tangent_of(grad_output), input_t = tangent_of(input),
               weight_t = tangent_of(weight);
  if (grad_output_t.defined() || input_t.defined() || weight_t.defined()) {
    // The op is linear in grad_output (the kernel applied to its tangent) and
    // its (input, weight) derivative is L's Hessian.
    const Tensor input_p = primal_of(input), weight_p = primal_of(defined_or_empty(weight));
    const Channelwise stats{mean, invstd, training};
    std::array<Tensor, 3> tangents;
    if (grad_output_t.defined()) {
      const auto linear = backward_op().call(
          grad_output_t, input_p, optional_of(weight_p), mean, invstd, training, output_mask);
      tangents = {defined_or_empty(std::get<0>(linear)), defined_or_empty(std::get<1>(linear)),
                  defined_or_empty(std::get<2>(linear))};
    }
    if (input_t.defined() || weight_t.defined()) {
      const auto [h_input, h_weight] = hessian_product(
          primal_of(grad_output), input_p, weight_p, stats, input_t, weight_t, output_mask[0],
          output_mask[1] && weight_p.defined());
      tangents[0] = add_defined(tangents[0], h_input);
      tangents[1] = add_defined(tangents[1], h_weight);
    }
    set_tangent(defined_or_empty(grad_input), tangents[0]);
    set_tangent(defined_or_empty(grad_weight), tangents[1]);
    set_tangent(defined_or_empty(grad_bias), tangents[2]);
  }
  return {grad_input, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------
// Fused batch norm + residual add + ReLU (batch_norm_act_*): first-order
// reverse mode only. The backward reads the forward's output for the ReLU's
// mask, so nothing else is kept; double backward and forward-mode AD are
// refused with an error rather than given wrong values.
// ---------------------------------------------------------------------------

using ActTrainSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, double, double, bool);
using ActEvalSig = Tensor(
    const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, double, bool);
using ActBackwardSig = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor>(
    const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
    bool, bool, std::array<bool, 4>);

const c10::TypedOperatorHandle<ActTrainSig>& act_train_op() {
  static const auto handle = find_op<ActTrainSig>("fastbn::batch_norm_act_train");
  return handle;
}
const c10::TypedOperatorHandle<ActEvalSig>& act_eval_op() {
  static const auto handle = find_op<ActEvalSig>("fastbn::batch_norm_act_eval");
  return handle;
}
const c10::TypedOperatorHandle<ActBackwardSig>& act_backward_op() {
  static const auto handle = find_op<ActBackwardSig>("fastbn::batch_norm_act_backward");
  return handle;
}

template <typename... Tensors>
void check_no_tangents(const Tensors&... tensors) {
  TORCH_CHECK(
      !(has_tangent(tensors) || ...),
      "fastbn.batch_norm_act does not support forward-mode AD (torch.func.jvp, "
      "torch.autograd.forward_ad); use fastbn.batch_norm followed by torch.relu");
}

// Edges: input, residual, weight, bias.
struct BatchNormActBackward : public Node {
  SavedVariable input_, weight_, output_, first_stat_, second_stat_;
  bool training_ = true;
  bool relu_ = true;
  double eps_ = 0;

  std::string name() const override {
    return training_ ? "fastbn::BatchNormActTrainBackward" : "fastbn::BatchNormActEvalBackward";
  }
  void release_variables() override {
    input_.reset_data();
    weight_.reset_data();
    output_.reset_data();
    first_stat_.reset_data();
    second_stat_.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    const Tensor& grad_out = grads[0];
    if (!grad_out.defined()) {
      return variable_list(4);
    }
    const auto self = getptr();
    const Tensor input = input_.unpack(self);
    Tensor mean = first_stat_.unpack(self), invstd = second_stat_.unpack(self);
    if (!training_) {
      std::tie(mean, invstd) = eval_statistics(input, mean, invstd, eps_);
    }
    const std::array<bool, 4> mask{
        should_compute_output(0), should_compute_output(1), should_compute_output(2),
        should_compute_output(3)};
    const auto [grad_input, grad_residual, grad_weight, grad_bias] = act_backward_op().call(
        grad_out, relu_ ? optional_of(output_.unpack(self)) : std::nullopt, input,
        optional_of(weight_.unpack(self)), mean, invstd, training_, relu_, mask);
    return {defined_or_empty(grad_input), defined_or_empty(grad_residual),
            defined_or_empty(grad_weight), defined_or_empty(grad_bias)};
  }
};

void record_act_forward(
    const Tensor& out, const Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const Tensor& first_stat, const Tensor& second_stat, bool training,
    double eps, bool relu) {
  auto node = make_node<BatchNormActBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, residual, weight, bias));
  node->input_ = SavedVariable(input, false);
  node->weight_ = SavedVariable(defined_or_empty(weight), false);
  node->first_stat_ = SavedVariable(first_stat, false);
  node->second_stat_ = SavedVariable(second_stat, false);
  node->training_ = training;
  node->relu_ = relu;
  node->eps_ = eps;
  torch::autograd::set_history(out, node);
  if (relu) {
    node->output_ = SavedVariable(out, /*is_output=*/true);
  }
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_train_autograd(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
    bool relu) {
  if (!plain_call(input, residual, weight, bias, running_mean, running_var)) {
    check_running_stats_not_differentiable(running_mean, running_var);
    check_no_tangents(input, residual, weight, bias);
  }
  Tensor out, save_mean, save_invstd;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, save_mean, save_invstd) = act_train_op().call(
        input, residual, weight, bias, running_mean, running_var, momentum, eps, relu);
  }
  bump_running_versions(running_mean, running_var);
  if (graph_needed(input, residual, weight, bias)) {
    record_act_forward(
        out, input, residual, weight, bias, save_mean, save_invstd, /*training=*/true, eps, relu);
  }
  return {out, save_mean, save_invstd};
}

Tensor batch_norm_act_eval_autograd(
    const Tensor& input, const OptTensor& residual, const Tensor& running_mean,
    const Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps,
    bool relu) {
  if (!plain_call(input, residual, weight, bias, running_mean, running_var)) {
    check_running_stats_not_differentiable(running_mean, running_var);
    check_no_tangents(input, residual, weight, bias);
  }
  Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = act_eval_op().call(input, residual, running_mean, running_var, weight, bias, eps, relu);
  }
  if (graph_needed(input, residual, weight, bias)) {
    record_act_forward(
        out, input, residual, weight, bias, running_mean, running_var, /*training=*/false, eps, relu);
  }
  return out;
}

// The backward's own backward: refuses to run (first-order gradients under
// create_graph=True are computed; differentiating them is what fails).
struct BatchNormActDoubleBackward : public Node {
  std::string name() const override { return "fastbn::BatchNormActDoubleBackward"; }
  variable_list apply(variable_list&&) override {
    TORCH_CHECK(
        false,
        "fastbn.batch_norm_act: double backward of the fused batch norm + ReLU is not supported "
        "(use fastbn.batch_norm followed by torch.relu where second-order gradients are needed)");
  }
};

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> batch_norm_act_backward_autograd(
    const Tensor& grad_output, const OptTensor& output, const Tensor& input,
    const OptTensor& weight, const Tensor& mean, const Tensor& invstd, bool training, bool relu,
    std::array<bool, 4> output_mask) {
  check_no_tangents(grad_output, output, input, weight, mean, invstd);
  std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> grads;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    grads = act_backward_op().call(
        grad_output, output, input, weight, mean, invstd, training, relu, output_mask);
  }
  if (graph_needed(grad_output, output, input, weight)) {
    auto node = make_node<BatchNormActDoubleBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(grad_output, output, input, weight));
    torch::autograd::set_history(
        {defined_or_empty(std::get<0>(grads)), defined_or_empty(std::get<1>(grads)),
         defined_or_empty(std::get<2>(grads)), defined_or_empty(std::get<3>(grads))},
        node);
  }
  return grads;
}

}  // namespace
}  // namespace fastbn

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) {
  m.impl("batch_norm_train", &fastbn::batch_norm_train_autograd);
  m.impl("batch_norm_eval", &fastbn::batch_norm_eval_autograd);
  m.impl("batch_norm_backward", &fastbn::batch_norm_backward_autograd);
}

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) {
  m.impl("batch_norm_act_train", &fastbn::batch_norm_act_train_autograd);
  m.impl("batch_norm_act_eval", &fastbn::batch_norm_act_eval_autograd);
  m.impl("batch_norm_act_backward", &fastbn::batch_norm_act_backward_autograd);
}
