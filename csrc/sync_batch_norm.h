// Argument checks of the SyncBatchNorm operators (schemas.h), shared by the
// CPU and CUDA backends. Like batch_norm.h's, they run before any kernel and
// before anything is written.
#pragma once

#include "batch_norm.h"

namespace fastbn {

// Rows of the packed tensors exchanged between processes.
constexpr int64_t kStatsRows = 3;  // count, mean, M2
constexpr int64_t kSumsRows = 2;   // sum(dy), sum(dy * (x - mean))

// Runs f(param_t{}) with param_t the type of `param` as check_params allowed
// it: the input's scalar_t, or its acc_t (float32 parameters of a half input).
template <typename scalar_t, typename F>
void dispatch_param(const Tensor* param, const F& f) {
  if (param != nullptr && param->scalar_type() != c10::CppTypeToScalarType<scalar_t>::value) {
    f(at::opmath_type<scalar_t>{});
  } else {
    f(scalar_t{});
  }
}

// sync_batch_norm_stats validates the whole step's arguments, so that a bad
// call fails on its own rank before the collective.
inline void check_sync_stats_args(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var) {
  check_train_inputs(input, weight, bias, running_mean, running_var, "fastbn.SyncBatchNorm (statistics)");
}

// Returns the number of channels.
inline int64_t check_sync_gather_args(
    const Tensor& stats, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked) {
  constexpr const char* op = "fastbn.SyncBatchNorm (merge of gathered statistics)";
  TORCH_CHECK(stats.defined(), op, ": stats is undefined");
  TORCH_CHECK(
      stats.dim() == 3 && stats.size(1) == kStatsRows, op,
      ": expected stats of shape [world_size, 3, C] (count, mean, M2 of each process), got shape ",
      shape_string(stats));
  TORCH_CHECK(
      stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble, op,
      ": expected stats of dtype float32 or float64, got ", stats.scalar_type());
  const int64_t C = stats.size(2);
  const Tensor* rm = get_if_defined(running_mean);
  const Tensor* rv = get_if_defined(running_var);
  TORCH_CHECK(
      (rm == nullptr) == (rv == nullptr), op,
      ": running_mean and running_var must be given together or both be None");
  for (const auto& [name, t] : {std::pair{"running_mean", rm}, std::pair{"running_var", rv}}) {
    if (t == nullptr) {
      continue;
    }
    TORCH_CHECK(
        t->dim() == 1 && t->size(0) == C, op, ": expected ", name, " of shape [", C,
        "] (one value per channel of stats ", shape_string(stats), "), got shape ",
        shape_string(*t));
    TORCH_CHECK(
        t->device() == stats.device(), op, ": expected ", name, " on the stats' device ",
        stats.device(), ", got ", name, " on ", t->device());
    const at::ScalarType type = t->scalar_type();
    const bool allowed = stats.scalar_type() == at::kDouble
        ? type == at::kDouble
        : (type == at::kFloat || type == at::kHalf || type == at::kBFloat16);
    TORCH_CHECK(
        allowed, op, ": expected ", name, " of dtype ",
        stats.scalar_type() == at::kDouble ? "float64" : "float32, float16 or bfloat16",
        " for ", stats.scalar_type(), " stats, got ", type);
    TORCH_CHECK(
        type == rm->scalar_type(), op, ": expected running_var to have the dtype of running_mean (",
        rm->scalar_type(), "), got ", type);
  }
  if (const Tensor* nbt = get_if_defined(num_batches_tracked)) {
    TORCH_CHECK(
        nbt->numel() == 1 && nbt->scalar_type() == at::kLong, op,
        ": expected num_batches_tracked to be one int64 value, got ", nbt->scalar_type(),
        " of shape ", shape_string(*nbt));
    TORCH_CHECK(
        nbt->device() == stats.device(), op, ": expected num_batches_tracked on the stats' device ",
        stats.device(), ", got it on ", nbt->device());
  }
  return C;
}

inline void check_sync_elemt_args(
    const Tensor& input, const OptTensor& weight, const OptTensor& bias, const Tensor& mean,
    const Tensor& invstd) {
  constexpr const char* op = "fastbn.SyncBatchNorm (normalisation)";
  check_input(input, op);
  check_params(input, {{"weight", &weight}, {"bias", &bias}}, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(invstd, "invstd", input, op);
}

inline void check_sync_backward_reduce_args(
    const Tensor& grad_output, const Tensor& input, const Tensor& mean) {
  constexpr const char* op = "fastbn.SyncBatchNorm (backward sums)";
  check_grad_output(grad_output, input, op);
  check_stat_tensor(mean, "mean", input, op);
}

inline void check_sync_backward_elemt_args(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
    const Tensor& invstd, const Tensor& sums, const Tensor& count) {
  constexpr const char* op = "fastbn.SyncBatchNorm (grad_input)";
  check_grad_output(grad_output, input, op);
  check_params(input, {{"weight", &weight}}, op);
  check_stat_tensor(mean, "mean", input, op);
  check_stat_tensor(invstd, "invstd", input, op);
  check_stat_tensor(count, "count", input, op);
  const int64_t C = input.size(1);
  TORCH_CHECK(
      sums.defined() && sums.dim() == 2 && sums.size(0) == kSumsRows && sums.size(1) == C, op,
      ": expected sums of shape [2, ", C, "] (sum(dy), sum(dy * (x - mean)) per channel), got ",
      sums.defined() ? shape_string(sums) : std::string("undefined"));
  TORCH_CHECK(
      sums.scalar_type() == acc_dtype(input.scalar_type()), op, ": expected sums of dtype ",
      acc_dtype(input.scalar_type()), ", got ", sums.scalar_type());
  TORCH_CHECK(
      sums.device() == input.device(), op, ": expected sums on the input's device ",
      input.device(), ", got sums on ", sums.device());
}

}  // namespace fastbn
