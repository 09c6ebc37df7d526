// The elementwise kernels of kernels.h, compiled once per variant.
#include "elementwise.h"
#include "kernels.h"

namespace fastbn::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
void normalize(const Geometry& g, const scalar_t* x, scalar_t* y, const acc_type<scalar_t>* mean,
               const acc_type<scalar_t>* scale, const acc_type<scalar_t>* bias) {
  const scalar_t* in[1] = {x};
  const acc_type<scalar_t>* prm[3] = {mean, scale, bias};
  channel_map<scalar_t, 1, 3>(g, in, y, prm, Normalize{});
}

template <typename scalar_t>
void grad_input_train(const Geometry& g, const scalar_t* dy, const scalar_t* x, scalar_t* dx,
                      const acc_type<scalar_t>* mean, const acc_type<scalar_t>* mean_dy,
                      const acc_type<scalar_t>* xmu_coef, const acc_type<scalar_t>* scale) {
  const scalar_t* in[2] = {dy, x};
  const acc_type<scalar_t>* prm[4] = {mean, mean_dy, xmu_coef, scale};
  channel_map<scalar_t, 2, 4>(g, in, dx, prm, GradInputTrain{});
}

template <typename scalar_t>
void grad_input_eval(const Geometry& g, const scalar_t* dy, scalar_t* dx, const acc_type<scalar_t>* scale) {
  const scalar_t* in[1] = {dy};
  const acc_type<scalar_t>* prm[1] = {scale};
  channel_map<scalar_t, 1, 1>(g, in, dx, prm, GradInputEval{});
}

FASTBN_REGISTER_KERNEL(normalize_kernel, normalize);
FASTBN_REGISTER_KERNEL(grad_input_train_kernel, grad_input_train);
FASTBN_REGISTER_KERNEL(grad_input_eval_kernel, grad_input_eval);

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fastbn::cpu
