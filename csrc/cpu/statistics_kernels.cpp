// The statistics kernels of kernels.h, compiled once per variant.
#include "kernels.h"
#include "statistics.h"

namespace fastbn::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
void batch_stats(const scalar_t* x, const Geometry& g, WelfordStat<acc_type<scalar_t>>* out) {
  if (g.channels_last()) {
    batch_stats_channels_last(x, g, out);
  } else {
    batch_stats_channels_first(x, g, out);
  }
}

template <typename scalar_t>
void grad_sums(const GradInput<scalar_t>& d, const scalar_t* x, const Geometry& g,
               const acc_type<scalar_t>* mean, acc_type<scalar_t>* sum_dy, acc_type<scalar_t>* sum_dy_xmu) {
  dispatch_grad_source(GradSource{d.y != nullptr, d.d_out != nullptr}, [&](auto masked, auto write) {
    constexpr bool kMasked = decltype(masked)::value, kWrite = decltype(write)::value;
    if (g.channels_last()) {
      grad_sums_channels_last<scalar_t, kMasked, kWrite>(d.dy, d.y, x, d.d_out, g, mean, sum_dy, sum_dy_xmu);
    } else {
      grad_sums_channels_first<scalar_t, kMasked, kWrite>(d.dy, d.y, x, d.d_out, g, mean, sum_dy, sum_dy_xmu);
    }
  });
}

template <typename scalar_t>
void finish(const WelfordStat<acc_type<scalar_t>>* stats, int64_t C, int64_t n, double eps,
            acc_type<scalar_t>* mean, acc_type<scalar_t>* invstd, acc_type<scalar_t>* unbiased) {
  finish_stats(stats, C, n, eps, mean, invstd, unbiased);
}

FASTBN_REGISTER_KERNEL(batch_stats_kernel, batch_stats);
FASTBN_REGISTER_KERNEL(grad_sums_kernel, grad_sums);
FASTBN_REGISTER_KERNEL(finish_stats_kernel, finish);

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace fastbn::cpu
