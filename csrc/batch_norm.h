// Input validation and layout helpers shared by the CPU and CUDA backends.
//
// Every check runs before any kernel, so a rejected call leaves the running
// statistics untouched. Messages name the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <optional>
#include <sstream>
#include <string>
#include <tuple>

namespace fastbn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Every input is handled as a (N, C, S) problem, S = product of the spatial
// sizes (1 for BatchNorm1d on (N, C)). Two memory layouts are walked directly:
//   kChannelsFirst: element (n, c, s) at (n * C + c) * S + s   (contiguous)
//   kChannelsLast:  element (n, c, s) at (n * S + s) * C + c   (channels_last,
//                   and every (N, C) input, whose rows are C contiguous values)
enum class Layout { kChannelsFirst, kChannelsLast };

struct Geometry {
  int64_t N = 0;
  int64_t C = 0;
  int64_t S = 0;
  Layout layout = Layout::kChannelsFirst;

  int64_t numel() const { return N * C * S; }
  // Number of values reduced into each channel's statistics.
  int64_t reduce_size() const { return N * S; }
  bool channels_last() const { return layout == Layout::kChannelsLast; }
};

inline std::string shape_string(const Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The dtype statistics and reductions accumulate in.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// True when C is the innermost, unit-stride dimension and the other
// dimensions are dense in (N, spatial..., C) order: channels_last for 4-d and
// 5-d tensors, and its analogue for 3-d ones. Size-1 dimensions carry no
// stride information and are skipped.
inline bool is_channels_last_dense(const Tensor& t) {
  const int64_t dim = t.dim();
  if (t.size(1) != 1 && t.stride(1) != 1) {
    return false;
  }
  int64_t expected = t.size(1);
  for (int64_t d = dim - 1; d >= 2; --d) {
    if (t.size(d) != 1) {
      if (t.stride(d) != expected) {
        return false;
      }
      expected *= t.size(d);
    }
  }
  return t.size(0) == 1 || t.stride(0) == expected;
}

inline Geometry geometry_of(const Tensor& t, Layout layout) {
  Geometry g;
  g.N = t.size(0);
  g.C = t.size(1);
  g.S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) {
    g.S *= t.size(d);
  }
  // With one value per (n, c) both layouts are the same memory; rows of C
  // values vectorise far better than rows of one.
  g.layout = g.S == 1 ? Layout::kChannelsLast : layout;
  return g;
}

// The layout a tensor can be walked in without a copy, if any.
inline std::optional<Layout> direct_layout(const Tensor& t) {
  if (t.is_contiguous()) {
    return Layout::kChannelsFirst;
  }
  if (is_channels_last_dense(t)) {
    return Layout::kChannelsLast;
  }
  return std::nullopt;
}

// Returns `t` itself when the kernels can walk it directly, else a copy in
// the memory format PyTorch would pick for it (so that the result, allocated
// with empty_like, has the layout of the copy).
inline Tensor to_walkable(const Tensor& t) {
  if (direct_layout(t)) {
    return t;
  }
  return t.contiguous(t.suggest_memory_format());
}

// Same memory layout as `like` (which is walkable); copies only on mismatch.
inline Tensor to_layout_of(const Tensor& t, const Tensor& like) {
  if (t.strides() == like.strides()) {
    return t;
  }
  Tensor out = at::empty_like(like);
  out.copy_(t);
  return out;
}

inline void check_input(const Tensor& input, const char* op) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  TORCH_CHECK(
      input.dim() >= 2,
      op, ": expected input of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), got ",
      input.dim(), "-d input of shape ", shape_string(input));
  TORCH_CHECK(
      is_supported_dtype(input.scalar_type()),
      op, ": expected input to be float32, float64, float16 or bfloat16, got ",
      input.scalar_type());
}

// Per-channel tensors (weight, bias, running stats, saved statistics) must
// hold C values on the input's device. Their dtype is checked separately.
inline void check_channel_tensor(
    const Tensor& t, const char* name, const Tensor& input, const char* op) {
  const int64_t C = input.size(1);
  TORCH_CHECK(
      t.dim() == 1, op, ": expected ", name, " to be 1-d with one value per channel, shape [", C,
      "] for input of shape ", shape_string(input), ", got shape ", shape_string(t));
  // Framed as torch frames it: the input's channel count is what does not
  // match what the layer (its parameters and buffers) was built for.
  TORCH_CHECK(
      t.size(0) == C, op, ": input has ", C, " channels (input shape ", shape_string(input),
      ") where ", name, " expects ", t.size(0), " (", name, " of shape ", shape_string(t),
      " holds one value per channel)");
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": expected ", name, " on the input's device ", input.device(),
      ", got ", name, " on ", t.device());
}

// weight, bias, running_mean and running_var share one dtype: the input's, or
// float32 when the input is float16/bfloat16 (PyTorch's mixed-precision case).
// Returns that dtype (the input's when no parameter is given).
inline at::ScalarType check_params(
    const Tensor& input,
    std::initializer_list<std::pair<const char*, const OptTensor*>> params,
    const char* op) {
  const at::ScalarType in_type = input.scalar_type();
  std::optional<at::ScalarType> param_type;
  const char* first_name = nullptr;
  for (const auto& [name, opt] : params) {
    if (!opt->has_value() || !(*opt)->defined()) {
      continue;
    }
    const Tensor& t = **opt;
    check_channel_tensor(t, name, input, op);
    const at::ScalarType t_type = t.scalar_type();
    const bool allowed =
        t_type == in_type ||
        (t_type == at::kFloat && (in_type == at::kHalf || in_type == at::kBFloat16));
    TORCH_CHECK(
        allowed, op, ": expected ", name, " to have dtype ", in_type,
        (in_type == at::kHalf || in_type == at::kBFloat16) ? " or Float" : "",
        " (input is ", in_type, "), got ", t_type);
    if (!param_type) {
      param_type = t_type;
      first_name = name;
    } else {
      TORCH_CHECK(
          *param_type == t_type, op, ": expected ", name, " to have the dtype of ",
          first_name, " (", *param_type, "), got ", t_type);
    }
  }
  return param_type.value_or(in_type);
}

inline void check_stat_tensor(
    const Tensor& t, const char* name, const Tensor& input, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  check_channel_tensor(t, name, input, op);
  const at::ScalarType expected = acc_dtype(input.scalar_type());
  TORCH_CHECK(
      t.scalar_type() == expected, op, ": expected ", name, " to have dtype ",
      expected, " (the accumulation type of ", input.scalar_type(), " input), got ",
      t.scalar_type());
}

// PyTorch refuses to compute batch statistics from one value per channel.
inline void check_train_batch(const Tensor& input) {
  const int64_t values_per_channel = input.numel() / std::max<int64_t>(input.size(1), 1);
  TORCH_CHECK_VALUE(
      values_per_channel != 1 || input.numel() == 0,
      "Expected more than 1 value per channel when training, got input size ",
      input.sizes());
}

inline const Tensor* get_if_defined(const OptTensor& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// Checks of each operator's arguments, shared by the backends.

// The input and the optional per-channel tensors of a training step (the
// running statistics given together or not at all), without the batch-size
// check; returns the parameters' shared dtype.
inline at::ScalarType check_train_inputs(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, const char* op) {
  check_input(input, op);
  const at::ScalarType param_type = check_params(
      input,
      {{"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean},
       {"running_var", &running_var}},
      op);
  TORCH_CHECK(
      (get_if_defined(running_mean) == nullptr) == (get_if_defined(running_var) == nullptr), op,
      ": running_mean and running_var must be given together or both be None");
  return param_type;
}

// check_train_args and check_eval_args return the parameters' shared dtype.
inline at::ScalarType check_train_args(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var) {
  const at::ScalarType param_type = check_train_inputs(
      input, weight, bias, running_mean, running_var, "fastbn.batch_norm (training)");
  check_train_batch(input);
  return param_type;
}

inline at::ScalarType check_eval_args(
    const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias) {
  constexpr const char* op = "fastbn.batch_norm (eval)";
  check_input(input, op);
  TORCH_CHECK(
      running_mean.defined() && running_var.defined(), op,
      ": running_mean and running_var are required in evaluation mode");
  const OptTensor rm(running_mean), rv(running_var);
  return check_params(
      input,
      {{"weight", &weight}, {"bias", &bias}, {"running_mean", &rm}, {"running_var", &rv}}, op);
}

// The input, and a grad_output of its shape, dtype and device.
inline void check_grad_output(const Tensor& grad_output, const Tensor& input, const char* op) {
  check_input(input, op);
  TORCH_CHECK(
      grad_output.defined() && grad_output.sizes() == input.sizes(), op,
      ": expected grad_output of the input's shape ", shape_string(input), ", got ",
      grad_output.defined() ? shape_string(grad_output) : std::string("undefined"));
  TORCH_CHECK(
      grad_output.scalar_type() == input.scalar_type(), op, ": expected grad_output of dtype ",
      input.scalar_type(), ", got ", grad_output.scalar_type());
  TORCH_CHECK(
      grad_output.device() == input.device(), op, ": expected grad_output on the input's device ",
      input.device(), ", got grad_output on ", grad_output.device());
}

// Returns the dtype of the weight gradient (the weight's, else the input's).
inline at::ScalarType check_backward_args(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
    const Tensor& invstd) {
  constexpr const char* op = "fastbn.batch_norm_backward";
  check_grad_output(grad_output, input, op);
  const at::ScalarType param_type = check_params(input, {{"weight", &weight}}, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(invstd, "invstd", input, op);
  return param_type;
}

// The output is allocated like the input (PyTorch keeps the memory format);
// when the input had to be copied to a walkable layout that differs from it,
// the kernel writes a scratch tensor that is copied over at the end.
// `empty_strided(sizes, strides)` allocates; the default is at::empty_strided.
struct OutputLike {
  Tensor result;
  Tensor buffer;
  template <typename EmptyStrided>
  OutputLike(const Tensor& input, const Tensor& walkable, const EmptyStrided& empty_strided) {
    if (input.strides() == walkable.strides()) {
      // Walkable inputs are dense, where empty_like keeps their strides.
      result = empty_strided(input.sizes(), input.strides());
    } else {
      result = at::empty_like(input);
    }
    buffer = result.strides() == walkable.strides()
        ? result
        : empty_strided(walkable.sizes(), walkable.strides());
  }
  OutputLike(const Tensor& input, const Tensor& walkable)
      : OutputLike(input, walkable, [&](at::IntArrayRef sizes, at::IntArrayRef strides) {
          return at::empty_strided(sizes, strides, input.options());
        }) {}
  void finish() {
    if (!buffer.is_same(result)) {
      result.copy_(buffer);
    }
  }
};

}  // namespace fastbn
