// Batching rule of fastbn::batch_norm_backward for torch's legacy vmap
// (torch._vmap_internals, DispatchKey::Batched), which gradcheck's
// batched-gradient checks and torch.autograd.grad(is_grads_batched=True) use;
// torch.func.vmap's rules are in fastbn/batching.py. The same folding: the
// batch dimensions go into the channels, (B, N, C, *) -> (N, B*C, *), so that
// one kernel call handles every (b, c) pair with its own statistics.
#include "op_handles.h"

#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/LegacyVmapTransforms.h>
#include <torch/library.h>

#include <vector>

namespace fastbn {
namespace {

std::tuple<OptTensor, OptTensor, OptTensor> batch_norm_backward_batched(
    const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const Tensor& mean,
    const Tensor& invstd, bool training, std::array<bool, 3> output_mask) {
  const Tensor* w = get_if_defined(weight);
  std::vector<Tensor> logical{grad_output, input, mean, invstd};
  if (w != nullptr) {
    logical.push_back(*w);
  }
  // Batch dimensions in front, aligned to the same vmap levels.
  const auto views = at::MultiBatchVmapTransform::logicalToPhysical(logical);
  const int64_t batch_dims = views[0].numBatchDims();
  std::vector<int64_t> batch_sizes(batch_dims, 1);
  for (const auto& view : views) {
    for (int64_t d = 0; d < batch_dims; ++d) {
      batch_sizes[d] = std::max(batch_sizes[d], view.tensor().size(d));
    }
  }
  const auto expanded = [&](const Tensor& t) {
    std::vector<int64_t> shape(batch_sizes);
    const auto logical_sizes = t.sizes().slice(batch_dims);
    shape.insert(shape.end(), logical_sizes.begin(), logical_sizes.end());
    return t.expand(shape).flatten(0, batch_dims - 1);  // (B, logical...)
  };
  const auto fold_input = [&](const Tensor& t) {  // -> (N, B*C, *)
    TORCH_CHECK(
        t.dim() - batch_dims >= 2,
        "fastbn.batch_norm_backward under vmap: expected input of at least 2 dimensions per batch "
        "element, got ", t.dim() - batch_dims);
    return expanded(t).transpose(0, 1).flatten(1, 2);
  };
  const auto fold_channels = [&](const Tensor& t) { return expanded(t).reshape(-1); };

  const Tensor physical_input = views[1].tensor();
  const int64_t batch = c10::multiply_integers(batch_sizes);
  const int64_t channels = physical_input.size(batch_dims + 1);
  auto [grad_input, grad_weight, grad_bias] = backward_op().call(
      fold_input(views[0].tensor()), fold_input(physical_input),
      w != nullptr ? OptTensor(fold_channels(views[4].tensor())) : std::nullopt,
      fold_channels(views[2].tensor()), fold_channels(views[3].tensor()), training, output_mask);

  const auto to_logical = views[0].getPhysicalToLogicalMap();
  const auto unfold_channels = [&](OptTensor& t) {
    if (t.has_value() && t->defined()) {
      std::vector<int64_t> shape(batch_sizes);
      shape.push_back(channels);
      t = to_logical.apply(t->reshape(shape));
    }
  };
  if (grad_input.has_value() && grad_input->defined()) {
    // (N, B*C, *) -> (B..., N, C, *), the batch dimensions in front in memory
    // too (where the legacy vmap expects them, e.g. for a tangent's as_strided).
    grad_input = to_logical.apply(grad_input->unflatten(1, {batch, channels})
                                      .transpose(0, 1)
                                      .contiguous()
                                      .unflatten(0, batch_sizes));
  }
  unfold_channels(grad_weight);
  unfold_channels(grad_bias);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastbn

TORCH_LIBRARY_IMPL(fastbn, Batched, m) {
  m.impl("batch_norm_backward", &fastbn::batch_norm_backward_batched);
}
