// The CPU operators' entry points, of batch norm and of the fused batch norm
// + residual add + ReLU (y = act(batch_norm(x) + residual), whose backward
// takes the ReLU's mask from the saved output y: no pre-activation tensor is
// kept): argument checks, output allocation,
// per-channel parameters and running statistics; the work itself is done by
// the kernels of kernels.h (compiled once per instruction-set variant, the
// one in use chosen at load). Compiled once.
#include "../batch_norm.h"
#include "../batch_norm_act.h"
#include "kernels.h"
#include "output_pool.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace fastbn::cpu {
namespace {

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Output allocation from the pool (see output_pool.h).
auto pooled_like(const Tensor& input) {
  return [dtype = input.scalar_type()](at::IntArrayRef sizes, at::IntArrayRef strides) {
    return empty_pooled(sizes, strides, dtype);
  };
}

// Copies a per-channel tensor (any float dtype, any stride) into acc_t values;
// `fill` when the tensor is absent.
template <typename acc_t>
std::vector<acc_t> channel_values(const Tensor* t, int64_t C, acc_t fill) {
  std::vector<acc_t> out(C, fill);
  if (t == nullptr) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t->scalar_type(), "fastbn_read", [&] {
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->stride(0);
    for (int64_t c = 0; c < C; ++c) {
      out[c] = static_cast<acc_t>(p[c * stride]);
    }
  });
  return out;
}

// running = (1 - momentum) * running + momentum * value, in place.
template <typename acc_t>
void blend_into(const Tensor& running, const std::vector<acc_t>& value, double momentum) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "fastbn_running", [&] {
    scalar_t* p = running.mutable_data_ptr<scalar_t>();
    const int64_t stride = running.stride(0);
    const acc_t m = static_cast<acc_t>(momentum);
    for (size_t c = 0; c < value.size(); ++c) {
      const acc_t old = static_cast<acc_t>(p[c * stride]);
      p[c * stride] = static_cast<scalar_t>((acc_t(1) - m) * old + m * value[c]);
    }
  });
}

template <typename acc_t>
void write_channel_values(const Tensor& t, const std::vector<acc_t>& values) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "fastbn_write", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < values.size(); ++c) {
      p[c] = static_cast<scalar_t>(values[c]);
    }
  });
}
// The residual (if any) in the layout of the walkable input x.
Tensor residual_like(const OptTensor& residual, const Tensor& x) {
  const Tensor* r = get_if_defined(residual);
  return r != nullptr ? to_layout_of(*r, x) : Tensor();
}

template <typename scalar_t>
const scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

// The training forward of batch norm and of the fused operators (the
// arguments checked): y = act(batch_norm(x) + residual), the batch
// statistics, the running statistics updated.
std::tuple<Tensor, Tensor, Tensor> train_forward(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
    Epilogue epilogue) {
  const Tensor* rm = get_if_defined(running_mean);
  const Tensor* rv = get_if_defined(running_var);

  const int64_t C = input.size(1);
  const auto stat_options = input.options().dtype(acc_dtype(input.scalar_type()));
  if (input.numel() == 0) {
    // PyTorch returns an empty output and leaves the running statistics alone.
    return {at::empty_like(input), at::zeros({C}, stat_options), at::zeros({C}, stat_options)};
  }
  const Tensor x = to_walkable(input);
  const Tensor res = residual_like(residual, x);
  const Geometry g = geometry_of(x, *direct_layout(x));
  OutputLike out(input, x, pooled_like(input));
  Tensor save_mean = at::empty({C}, stat_options);
  Tensor save_invstd = at::empty({C}, stat_options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* res_ptr = data_or_null<scalar_t>(res);
    scalar_t* y_ptr = out.buffer.mutable_data_ptr<scalar_t>();
    const int64_t n = g.reduce_size();
    const std::vector<acc_t> w = channel_values<acc_t>(get_if_defined(weight), C, acc_t(1));
    const std::vector<acc_t> b = channel_values<acc_t>(get_if_defined(bias), C, acc_t(0));
    std::vector<acc_t> mean(C), invstd(C), unbiased(C);
    if (!train_fused_kernel.get<scalar_t>()(g, x_ptr, res_ptr, y_ptr, epilogue, w.data(), b.data(), eps,
                                            mean.data(), invstd.data(), unbiased.data())) {
      std::vector<WelfordStat<acc_t>> stats(C);
      batch_stats_kernel.get<scalar_t>()(x_ptr, g, stats.data());
      finish_stats_kernel.get<scalar_t>()(stats.data(), C, n, eps, mean.data(), invstd.data(), unbiased.data());
      std::vector<acc_t> scale(C);
      for (int64_t c = 0; c < C; ++c) {
        scale[c] = invstd[c] * w[c];
      }
      normalize_kernel.get<scalar_t>()(g, x_ptr, res_ptr, y_ptr, epilogue, mean.data(), scale.data(), b.data());
    }
    write_channel_values(save_mean, mean);
    write_channel_values(save_invstd, invstd);
    if (rm != nullptr) {
      blend_into(*rm, mean, momentum);
      blend_into(*rv, unbiased, momentum);
    }
  });
  out.finish();
  return {out.result, save_mean, save_invstd};
}

// The evaluation forward of batch norm and of the fused operators (the
// arguments checked).
Tensor eval_forward(
    const Tensor& input, const OptTensor& residual, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps, Epilogue epilogue) {
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const Tensor x = to_walkable(input);
  const Tensor res = residual_like(residual, x);
  const Geometry g = geometry_of(x, *direct_layout(x));
  OutputLike out(input, x, pooled_like(input));
  const int64_t C = g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_eval_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> mean = channel_values<acc_t>(&running_mean, C, acc_t(0));
    std::vector<acc_t> scale = channel_values<acc_t>(&running_var, C, acc_t(0));
    const std::vector<acc_t> w = channel_values<acc_t>(get_if_defined(weight), C, acc_t(1));
    const std::vector<acc_t> b = channel_values<acc_t>(get_if_defined(bias), C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = w[c] / std::sqrt(scale[c] + static_cast<acc_t>(eps));
    }
    normalize_kernel.get<scalar_t>()(g, x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(res),
                                     out.buffer.mutable_data_ptr<scalar_t>(), epilogue, mean.data(),
                                     scale.data(), b.data());
  });
  out.finish();
  return out.result;
}

// Which gradients the backward computes.
struct GradMask {
  bool input = false;
  bool residual = false;  // the fused residual add's: d itself
  bool weight = false;
  bool bias = false;
};

// The backward of batch norm and of the fused operators (the arguments
// checked): d = dy, masked by the saved output y > 0 after a ReLU
// (`output`); grad_residual = d; grad_input, grad_weight, grad_bias of
// batch norm from d. Returns {grad_input, grad_residual, grad_weight, grad_bias}.
ActGrads backward(
    const Tensor& grad_output, const Tensor* output, const Tensor& input, const OptTensor& weight,
    const Tensor& mean, const Tensor& invstd, bool training, GradMask mask, at::ScalarType param_type) {
  if (input.numel() == 0) {
    return empty_input_act_grads(input, param_type, {mask.input, mask.residual, mask.weight, mask.bias});
  }
  const int64_t C = input.size(1);
  const auto param_options = input.options().dtype(param_type);
  const Tensor x = to_walkable(input);
  const Tensor dy = to_layout_of(grad_output, x);
  const Tensor y = output != nullptr ? to_layout_of(*output, x) : Tensor();
  const Geometry g = geometry_of(x, *direct_layout(x));
  const bool need_sums = mask.weight || mask.bias || (training && mask.input);

  std::optional<OutputLike> dx_out, dres_out;
  if (mask.input) {
    dx_out.emplace(input, x, pooled_like(input));
  }
  if (mask.residual) {
    dres_out.emplace(input, x, pooled_like(input));
  }
  OptTensor grad_weight, grad_bias;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    scalar_t* dx_ptr = dx_out ? dx_out->buffer.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* dres_ptr = dres_out ? dres_out->buffer.mutable_data_ptr<scalar_t>() : nullptr;
    // d's inputs; with grad_residual written, later passes read d from it.
    const GradInput<scalar_t> d{dy.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(y), dres_ptr};
    const GradInput<scalar_t> d_written =
        dres_ptr != nullptr ? GradInput<scalar_t>{dres_ptr} : GradInput<scalar_t>{d.dy, d.y};
    const std::vector<acc_t> mu = channel_values<acc_t>(&mean, C, acc_t(0));
    const std::vector<acc_t> inv = channel_values<acc_t>(&invstd, C, acc_t(0));
    const std::vector<acc_t> w = channel_values<acc_t>(get_if_defined(weight), C, acc_t(1));
    std::vector<acc_t> sum_dy(C, acc_t(0)), sum_dy_xmu(C, acc_t(0));
    bool dx_done = false;
    if (need_sums) {
      dx_done = backward_fused_kernel.get<scalar_t>()(
          g, d, x_ptr, dx_ptr, training, mu.data(), inv.data(), w.data(), sum_dy.data(), sum_dy_xmu.data());
      if (!dx_done) {
        grad_sums_kernel.get<scalar_t>()(d, x_ptr, g, mu.data(), sum_dy.data(), sum_dy_xmu.data());
      }
    } else if (dres_ptr != nullptr) {
      // grad_residual alone (no sums): d = d * 1.
      const std::vector<acc_t> ones(C, acc_t(1));
      grad_input_eval_kernel.get<scalar_t>()(g, GradInput<scalar_t>{d.dy, d.y}, dres_ptr, ones.data());
    }
    if (dx_ptr != nullptr && !dx_done) {
      // grad_input's per-channel parameters (see kernels.h).
      const acc_t inv_n = acc_t(1) / static_cast<acc_t>(g.reduce_size());
      std::vector<acc_t> mean_dy(C), xmu_coef(C), scale(C);
      for (int64_t c = 0; c < C; ++c) {
        mean_dy[c] = sum_dy[c] * inv_n;
        xmu_coef[c] = inv[c] * inv[c] * sum_dy_xmu[c] * inv_n;
        scale[c] = inv[c] * w[c];
      }
      if (training) {
        grad_input_train_kernel.get<scalar_t>()(g, d_written, x_ptr, dx_ptr, mu.data(), mean_dy.data(),
                                                xmu_coef.data(), scale.data());
      } else {
        grad_input_eval_kernel.get<scalar_t>()(g, d_written, dx_ptr, scale.data());
      }
    }
    if (mask.weight) {
      std::vector<acc_t> gw(C);
      for (int64_t c = 0; c < C; ++c) gw[c] = sum_dy_xmu[c] * inv[c];
      grad_weight = at::empty({C}, param_options);
      write_channel_values(*grad_weight, gw);
    }
    if (mask.bias) {
      grad_bias = at::empty({C}, param_options);
      write_channel_values(*grad_bias, sum_dy);
    }
  });
  return {finished(dx_out), finished(dres_out), grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------
// The operators
// ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cpu(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps) {
  check_train_args(input, weight, bias, running_mean, running_var);
  return train_forward(input, std::nullopt, weight, bias, running_mean, running_var, momentum, eps, Epilogue{});
}

Tensor batch_norm_eval_cpu(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  check_eval_args(input, running_mean, running_var, weight, bias);
  return eval_forward(input, std::nullopt, running_mean, running_var, weight, bias, eps, Epilogue{});
}

std::tuple<OptTensor, OptTensor, OptTensor> batch_norm_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight,
    const Tensor& mean, const Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  const at::ScalarType param_type = check_backward_args(grad_output, input, weight, mean, invstd);
  auto [dx, dres, dw, db] = backward(grad_output, nullptr, input, weight, mean, invstd, training,
                                     GradMask{output_mask[0], false, output_mask[1], output_mask[2]}, param_type);
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_train_cpu(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
    bool relu) {
  check_act_train_args(input, residual, weight, bias, running_mean, running_var);
  return train_forward(input, residual, weight, bias, running_mean, running_var, momentum, eps, Epilogue{relu});
}

Tensor batch_norm_act_eval_cpu(
    const Tensor& input, const OptTensor& residual, const Tensor& running_mean,
    const Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps, bool relu) {
  check_act_eval_args(input, residual, running_mean, running_var, weight, bias);
  return eval_forward(input, residual, running_mean, running_var, weight, bias, eps, Epilogue{relu});
}

ActGrads batch_norm_act_backward_cpu(
    const Tensor& grad_output, const OptTensor& output, const Tensor& input,
    const OptTensor& weight, const Tensor& mean, const Tensor& invstd, bool training, bool relu,
    std::array<bool, 4> output_mask) {
  const at::ScalarType param_type =
      check_act_backward_args(grad_output, output, input, weight, mean, invstd, relu);
  return backward(grad_output, relu ? get_if_defined(output) : nullptr, input, weight, mean, invstd, training,
                  GradMask{output_mask[0], output_mask[1], output_mask[2], output_mask[3]}, param_type);
}

}  // namespace
}  // namespace fastbn::cpu

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("batch_norm_train", &fastbn::cpu::batch_norm_train_cpu);
  m.impl("batch_norm_eval", &fastbn::cpu::batch_norm_eval_cpu);
  m.impl("batch_norm_backward", &fastbn::cpu::batch_norm_backward_cpu);
  m.impl("batch_norm_act_train", &fastbn::cpu::batch_norm_act_train_cpu);
  m.impl("batch_norm_act_eval", &fastbn::cpu::batch_norm_act_eval_cpu);
  m.impl("batch_norm_act_backward", &fastbn::cpu::batch_norm_act_backward_cpu);
}
