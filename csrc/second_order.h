// The derivative terms beyond the kernels' first order, as composites of ATen
// ops (differentiable in turn, and batched by vmap like any ATen op).
//
// With x̂ = (x - mean) * invstd and y = weight * x̂ + bias, the backward op
// computes the gradient of L = <grad_output, y> with respect to
// (input, weight, bias). Then
// - the output's tangent for tangents (v_x, v_w, v_b) is J v: the backward
//   kernel applied to v_x (the input Jacobian is symmetric) plus
//   x̂ v_w + v_b (jacobian_product);
// - the double backward, and the backward op's own tangent, need L's Hessian
//   with respect to (input, weight) applied to a vector (hessian_product).
//   Derivation, per channel of n values (means over the n values), in
//   training, with g = invstd * (dy - mean(dy) - x̂ m), m = mean(dy x̂):
//     H_xx v = -weight invstd^2 (a (dy - mean(dy) - x̂ m) + u m + x̂ mean(dy u)),
//       a = mean(x̂ v),  u = v - mean(v) - x̂ a
//     H_xw v_w = v_w g,   H_wx v = sum(v g);
//   in evaluation g = invstd * dy and H_xx = 0.
#pragma once

#include "op_handles.h"

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace fastbn {

// The statistics a forward normalised with: the batch's (training; then they
// are functions of the input) or the running ones (evaluation).
struct Channelwise {
  Tensor mean;
  Tensor invstd;
  bool training;
};

// Evaluation normalises with running_mean and 1 / sqrt(running_var + eps).
inline std::pair<Tensor, Tensor> eval_statistics(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var, double eps) {
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  return {running_mean.to(acc), running_var.to(acc).add(eps).rsqrt()};
}

inline Tensor add_defined(const Tensor& a, const Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

// Every dimension but the channel one.
inline std::vector<int64_t> non_channel_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

// A (C,) tensor shaped (1, C, 1, ...) to broadcast against x.
inline Tensor channel_column(const Tensor& values, const Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return values.reshape(shape);
}

// mean and invstd as columns in x's dtype. In training they equal the given
// statistics in value and have the batch statistics' derivatives with respect
// to x, so that a composite built on them stays right when differentiated
// again (eps, which the backward op is not given, is recovered from invstd).
inline std::pair<Tensor, Tensor> statistics_of(const Tensor& x, const Channelwise& stats) {
  Tensor mean = channel_column(stats.mean.to(x.scalar_type()), x);
  Tensor invstd = channel_column(stats.invstd.to(x.scalar_type()), x);
  if (!stats.training) {
    return {mean, invstd};
  }
  const std::vector<int64_t> dims = non_channel_dims(x);
  const Tensor batch_mean = x.mean(dims, /*keepdim=*/true);
  const Tensor batch_var = (x - batch_mean).square().mean(dims, /*keepdim=*/true);
  const Tensor eps = (invstd.pow(-2) - batch_var).detach();
  const Tensor batch_invstd = (batch_var + eps).rsqrt();
  return {mean + (batch_mean - batch_mean.detach()), invstd + (batch_invstd - batch_invstd.detach())};
}

// J v: the tangent of the forward's output for input/weight/bias tangents
// (any may be undefined; undefined when all are).
inline Tensor jacobian_product(
    const Tensor& input, const Tensor& weight, const Channelwise& stats, const Tensor& v_input,
    const Tensor& v_weight, const Tensor& v_bias) {
  Tensor out;
  if (v_input.defined()) {
    const OptTensor w = weight.defined() ? OptTensor(weight) : std::nullopt;
    out = *std::get<0>(backward_op().call(
        v_input, input, w, stats.mean, stats.invstd, stats.training, {true, false, false}));
  }
  if (v_weight.defined() || v_bias.defined()) {
    const Tensor x = input.to(acc_dtype(input.scalar_type()));
    Tensor affine;
    if (v_weight.defined()) {
      const auto [mean, invstd] = statistics_of(x, stats);
      affine = (x - mean) * invstd * channel_column(v_weight.to(x.scalar_type()), x);
    }
    if (v_bias.defined()) {
      const Tensor bias_term = channel_column(v_bias.to(x.scalar_type()), x);
      affine = affine.defined() ? affine + bias_term : bias_term.expand(x.sizes());
    }
    out = add_defined(out, affine.to(input.scalar_type()));
  }
  return out;
}

// (H_xx v_input + H_xw v_weight, H_wx v_input) of L (see the top of the file);
// each undefined when not wanted or zero. weight and v_weight may be undefined.
inline std::pair<Tensor, Tensor> hessian_product(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Channelwise& stats,
    const Tensor& v_input, const Tensor& v_weight, bool want_input, bool want_weight) {
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const Tensor x = input.to(acc);
  const Tensor dy = grad_output.to(acc);
  const std::vector<int64_t> dims = non_channel_dims(x);
  const auto [mean, invstd] = statistics_of(x, stats);
  const Tensor x_hat = (x - mean) * invstd;
  // dy - mean(dy) - x̂ m, and g (the input gradient for weight 1).
  Tensor centred_dy, dy_x_hat_mean;
  if (stats.training) {
    dy_x_hat_mean = (dy * x_hat).mean(dims, /*keepdim=*/true);
    centred_dy = dy - dy.mean(dims, /*keepdim=*/true) - x_hat * dy_x_hat_mean;
  } else {
    centred_dy = dy;
  }
  const Tensor unit_grad = invstd * centred_dy;

  Tensor h_input, h_weight;
  if (v_input.defined()) {
    const Tensor v = v_input.to(acc);
    if (want_weight && weight.defined()) {
      h_weight = (v * unit_grad).sum(dims).to(weight.scalar_type());
    }
    if (want_input && stats.training) {
      const Tensor a = (x_hat * v).mean(dims, /*keepdim=*/true);
      const Tensor u = v - v.mean(dims, /*keepdim=*/true) - x_hat * a;
      h_input = -(invstd * invstd) *
          (a * centred_dy + u * dy_x_hat_mean + x_hat * (dy * u).mean(dims, /*keepdim=*/true));
      if (weight.defined()) {
        h_input = h_input * channel_column(weight.to(acc), x);
      }
    }
  }
  if (want_input && v_weight.defined()) {
    h_input = add_defined(h_input, channel_column(v_weight.to(acc), x) * unit_grad);
  }
  if (h_input.defined()) {
    h_input = h_input.to(input.scalar_type());
  }
  return {h_input, h_weight};
}

}  // namespace fastbn
