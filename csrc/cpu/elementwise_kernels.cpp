// The elementwise kernels of kernels.h, compiled once per variant.
#include "elementwise.h"
#include "kernels.h"

#include <vector>

namespace fastbn::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
void normalize(const Geometry& g, const scalar_t* x, const scalar_t* residual, scalar_t* y, Epilogue epilogue,
               const acc_type<scalar_t>* mean, const acc_type<scalar_t>* scale, const acc_type<scalar_t>* bias) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kParams = kNormalizeParams<scalar_t>;
  // Per-channel arrays in the form the formula takes (see normalize_params).
  std::vector<acc_t> arrays[kParams];
  const acc_t* prm[kParams];
  if constexpr (kParams == 3) {
    prm[0] = mean;
    prm[1] = scale;
    prm[2] = bias;
  } else {
    for (auto& a : arrays) {
      a.resize(g.C);
    }
    for (int64_t c = 0; c < g.C; ++c) {
      acc_t values[kParams];
      normalize_params<scalar_t>(mean[c], scale[c], bias[c], values);
      for (int i = 0; i < kParams; ++i) {
        arrays[i][c] = values[i];
      }
    }
    for (int i = 0; i < kParams; ++i) {
      prm[i] = arrays[i].data();
    }
  }
  dispatch_bool(epilogue.relu, [&](auto relu) {
    constexpr bool kRelu = decltype(relu)::value;
    if (residual != nullptr) {
      const scalar_t* in[2] = {x, residual};
      channel_map<scalar_t, 2, kParams>(g, in, y, prm, NormalizeAct<2, kRelu, kParams>{});
    } else {
      const scalar_t* in[1] = {x};
      channel_map<scalar_t, 1, kParams>(g, in, y, prm, NormalizeAct<1, kRelu, kParams>{});
    }
  });
}

template <typename scalar_t>
void grad_input_train(const Geometry& g, const GradInput<scalar_t>& d, const scalar_t* x, scalar_t* dx,
                      const acc_type<scalar_t>* mean, const acc_type<scalar_t>* mean_dy,
                      const acc_type<scalar_t>* xmu_coef, const acc_type<scalar_t>* scale) {
  const acc_type<scalar_t>* prm[4] = {mean, mean_dy, xmu_coef, scale};
  if (d.y != nullptr) {
    const scalar_t* in[3] = {d.dy, d.y, x};
    channel_map<scalar_t, 3, 4>(g, in, dx, prm, GradInputTrain<true>{});
  } else {
    const scalar_t* in[2] = {d.dy, x};
    channel_map<scalar_t, 2, 4>(g, in, dx, prm, GradInputTrain<false>{});
  }
}

template <typename scalar_t>
void grad_input_eval(const Geometry& g, const GradInput<scalar_t>& d, scalar_t* dx, const acc_type<scalar_t>* scale) {
  const acc_type<scalar_t>* prm[1] = {scale};
  if (d.y != nullptr) {
    const scalar_t* in[2] = {d.dy, d.y};
    channel_map<scalar_t, 2, 1>(g, in, dx, prm, GradInputEval<true>{});
  } else {
    const scalar_t* in[1] = {d.dy};
    channel_map<scalar_t, 1, 1>(g, in, dx, prm, GradInputEval<false>{});
  }
}

FASTBN_REGISTER_KERNEL(normalize_kernel, normalize);
FASTBN_REGISTER_KERNEL(grad_input_train_kernel, grad_input_train);
FASTBN_REGISTER_KERNEL(grad_input_eval_kernel, grad_input_eval);

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fastbn::cpu
