// Typed dispatcher handles on the fastbn operators, looked up once.
#pragma once

#include "batch_norm.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>

namespace fastbn {

using TrainSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    double, double);
using EvalSig = Tensor(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double);
using BackwardSig = std::tuple<OptTensor, OptTensor, OptTensor>(
    const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, bool,
    std::array<bool, 3>);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

inline const c10::TypedOperatorHandle<TrainSig>& train_op() {
  static const auto handle = find_op<TrainSig>("fastbn::batch_norm_train");
  return handle;
}
inline const c10::TypedOperatorHandle<EvalSig>& eval_op() {
  static const auto handle = find_op<EvalSig>("fastbn::batch_norm_eval");
  return handle;
}
inline const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto handle = find_op<BackwardSig>("fastbn::batch_norm_backward");
  return handle;
}

}  // namespace fastbn
