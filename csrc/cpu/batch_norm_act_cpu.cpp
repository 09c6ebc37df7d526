// CPU kernels of the fused batch norm + residual add + ReLU operators
// (schemas in csrc/schemas.h):
//   forward:  y = relu((x - mean) * invstd * w + b [+ residual])
//   backward: d = dy * (y > 0) (dy without the ReLU); grad_residual = d;
//             grad_input / grad_weight / grad_bias = batch norm's backward of d.
// The ReLU's mask is read from the saved output y, so no pre-activation
// tensor is kept: y > 0 exactly where the pre-activation is, and an output
// of exactly 0 gets gradient 0, as torch's ReLU backward gives.
//
// Two passes each way. Forward: the per-channel statistics, then one
// elementwise pass that normalises, adds the residual and applies the ReLU.
// Backward: the per-channel sums of d and d * (x - mean), which also writes
// grad_residual, then one elementwise pass for grad_input (reading
// grad_residual back when it was written, one input fewer than dy and y).
//
// Layouts (batch_norm.h): channels-first rows of S values of one channel, or
// channels-last rows of C values (channel = position in the row). Work is cut
// into items whose size depends on the shape only and partial sums are added
// in item order, so results do not depend on the thread count.
#include "../batch_norm_act.h"
#include "output_pool.h"
#include "vec_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <vector>

namespace fastbn::cpu {
namespace {

// Values per parallel work item (about; never less than one row or channel).
constexpr int64_t kItemValues = 1 << 16;
// Outputs of at least this many bytes per thread bypass the caches.
constexpr int64_t kStreamBytesPerThread = int64_t(1) << 20;

template <typename F>
void parallel_items(int64_t items, int64_t values_per_item, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kItemValues / std::max<int64_t>(values_per_item, 1));
  at::parallel_for(0, items, grain, f);
}

template <typename scalar_t>
bool stream_output(const Geometry& g) {
  return g.numel() * static_cast<int64_t>(sizeof(scalar_t)) >=
      kStreamBytesPerThread * at::get_num_threads();
}

auto pooled(at::ScalarType dtype) {
  return [dtype](at::IntArrayRef sizes, at::IntArrayRef strides) {
    return empty_pooled(sizes, strides, dtype);
  };
}

// One acc_t value per channel, padded so that a full vector load at any
// channel stays in bounds (channels-last rows load parameters as vectors).
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> padded(const Tensor& per_channel) {
  using acc_t = at::opmath_type<scalar_t>;
  const Tensor values = per_channel.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  std::vector<acc_t> out(values.numel() + VecIO<scalar_t>::kStep, acc_t(0));
  std::copy_n(values.const_data_ptr<acc_t>(), values.numel(), out.begin());
  return out;
}

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> padded_or(const OptTensor& t, int64_t C, double fill) {
  const Tensor* p = get_if_defined(t);
  return p != nullptr ? padded<scalar_t>(*p)
                      : padded<scalar_t>(at::full({C}, fill, at::TensorOptions().dtype(at::kDouble)));
}

// The inputs of one vector step: kIn pointers, advanced together.
template <typename scalar_t, int kIn>
struct Inputs {
  const scalar_t* p[kIn];
};

// ---------------------------------------------------------------------------
// Elementwise pass: out = op(in..., per-channel parameters...)
// ---------------------------------------------------------------------------
// op(const aVec (&v)[kIn], const aVec (&param)[kParams]) -> aVec, on one
// vector of acc_t (kVecs of them per step for half types).

// Loads step i (n values, n < kStep only for a run's last step) of every input.
template <typename scalar_t, int kIn>
inline void load_step(
    const Inputs<scalar_t, kIn>& in, int64_t i, int64_t n,
    Vectorized<at::opmath_type<scalar_t>> (&v)[kIn][VecIO<scalar_t>::kVecs]) {
  using IO = VecIO<scalar_t>;
  for (int j = 0; j < kIn; ++j) {
    if (n == IO::kStep) {
      IO::load_ahead(in.p[j] + i, v[j]);
    } else {
      IO::load_partial(in.p[j] + i, n, v[j]);
    }
  }
}

template <typename scalar_t>
inline void store_step(
    scalar_t* out, int64_t i, int64_t n, const Vectorized<at::opmath_type<scalar_t>> (&r)[VecIO<scalar_t>::kVecs],
    bool stream) {
  using IO = VecIO<scalar_t>;
  if (n == IO::kStep) {
    IO::store(out + i, r, stream);
  } else {
    IO::store_partial(out + i, n, r);
  }
}

// The `len` values from `offset` (a channels-first row, or a channels-last
// row of C values); param_at(position in the run, acc vector k, param)
// supplies the parameters of the lanes.
template <typename scalar_t, int kIn, int kParams, typename ParamAt, typename Op>
inline void map_run(
    const Inputs<scalar_t, kIn>& in, scalar_t* out, int64_t offset, int64_t len,
    const ParamAt& param_at, const Op& op, bool stream) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  for (int64_t i = 0; i < len; i += IO::kStep) {
    const int64_t n = std::min<int64_t>(IO::kStep, len - i);
    aVec v[kIn][IO::kVecs];
    load_step<scalar_t, kIn>(in, offset + i, n, v);
    aVec r[IO::kVecs];
    for (int k = 0; k < IO::kVecs; ++k) {
      aVec args[kIn], param[kParams];
      for (int j = 0; j < kIn; ++j) args[j] = v[j][k];
      param_at(i, k, param);
      r[k] = op(args, param);
    }
    store_step(out, offset + i, n, r, stream);
  }
}

// Channels [begin, end) of a channels-first tensor, run inline by the caller's
// thread: a pass over them right after another one finds their rows still in
// cache when a channel's values fit (the statistics then the normalisation,
// the gradient sums then grad_input), so the input is read from memory once.
struct ChannelBlock {
  int64_t begin;
  int64_t end;
};

template <typename scalar_t, int kIn, int kParams, typename Op>
void channel_map(
    const Geometry& g, const Inputs<scalar_t, kIn>& in, scalar_t* out,
    const std::vector<at::opmath_type<scalar_t>>* const (&params)[kParams], const Op& op,
    const ChannelBlock* block = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  const bool stream = stream_output<scalar_t>(g);
  if (g.channels_last()) {
    const acc_t* p[kParams];
    for (int j = 0; j < kParams; ++j) p[j] = params[j]->data();
    // Lane c of a row takes channel c's parameters.
    const auto param_at = [&p](int64_t c, int k, aVec (&param)[kParams]) {
      for (int j = 0; j < kParams; ++j) param[j] = aVec::loadu(p[j] + c + k * aVec::size());
    };
    parallel_items(g.N * g.S, g.C, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        map_run<scalar_t, kIn, kParams>(in, out, m * g.C, g.C, param_at, op, stream);
      }
      stream_fence();
    });
  } else {
    const auto map_row = [&](int64_t row) {
      const int64_t c = row % g.C;
      aVec row_param[kParams];
      for (int j = 0; j < kParams; ++j) row_param[j] = aVec((*params[j])[c]);
      const auto param_at = [&row_param](int64_t, int, aVec (&param)[kParams]) {
        for (int j = 0; j < kParams; ++j) param[j] = row_param[j];
      };
      map_run<scalar_t, kIn, kParams>(in, out, row * g.S, g.S, param_at, op, stream);
    };
    if (block != nullptr) {
      for (int64_t n = 0; n < g.N; ++n) {
        for (int64_t c = block->begin; c < block->end; ++c) map_row(n * g.C + c);
      }
      return;
    }
    parallel_items(g.N * g.C, g.S, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) map_row(row);
      stream_fence();
    });
  }
}

// ---------------------------------------------------------------------------
// Per-channel sums: (sum a, sum b) of op(in..., parameters, &a, &b), which
// may also return a value to write (grad_residual), else out is null.
// ---------------------------------------------------------------------------

// Lanes past n of a partial step contribute nothing.
template <typename aVec>
inline aVec first_lanes(const aVec& v, int64_t n) {
  return n >= aVec::size() ? v : aVec::set(aVec(0), v, std::max<int64_t>(n, 0));
}

template <typename scalar_t, int kIn, int kParams, typename Op>
inline void sum_step(
    const Inputs<scalar_t, kIn>& in, scalar_t* out, int64_t i, int64_t n,
    const Vectorized<at::opmath_type<scalar_t>> (&param)[VecIO<scalar_t>::kVecs][kParams],
    const Op& op, Vectorized<at::opmath_type<scalar_t>> (&a)[VecIO<scalar_t>::kVecs],
    Vectorized<at::opmath_type<scalar_t>> (&b)[VecIO<scalar_t>::kVecs], bool stream) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  aVec v[kIn][IO::kVecs];
  load_step<scalar_t, kIn>(in, i, n, v);
  aVec r[IO::kVecs];
  for (int k = 0; k < IO::kVecs; ++k) {
    aVec args[kIn];
    for (int j = 0; j < kIn; ++j) args[j] = v[j][k];
    aVec da, db;
    r[k] = op(args, param[k], da, db);
    const int64_t lanes = n - k * IO::kAccLanes;
    a[k] = a[k] + first_lanes(da, lanes);
    b[k] = b[k] + first_lanes(db, lanes);
  }
  if (out != nullptr) {
    store_step(out, i, n, r, stream);
  }
}

template <typename acc_t>
acc_t lane_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto& x, auto& y) { return x + y; }, v);
}

// Fills sum_a[c], sum_b[c] for every channel.
template <typename scalar_t, int kIn, int kParams, typename Op>
void channel_sums(
    const Geometry& g, const Inputs<scalar_t, kIn>& in, scalar_t* out,
    const std::vector<at::opmath_type<scalar_t>>* const (&params)[kParams], const Op& op,
    at::opmath_type<scalar_t>* sum_a, at::opmath_type<scalar_t>* sum_b,
    const ChannelBlock* block = nullptr) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  constexpr int kVecs = IO::kVecs;
  const bool stream = out != nullptr && stream_output<scalar_t>(g);
  if (!g.channels_last()) {
    // One item per channel: its N rows of S values, summed in vectors.
    const auto channels = [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        aVec param[kVecs][kParams];
        for (int k = 0; k < kVecs; ++k)
          for (int j = 0; j < kParams; ++j) param[k][j] = aVec((*params[j])[c]);
        aVec a[kVecs], b[kVecs];
        for (int k = 0; k < kVecs; ++k) a[k] = b[k] = aVec(acc_t(0));
        for (int64_t n = 0; n < g.N; ++n) {
          const int64_t row = (n * g.C + c) * g.S;
          int64_t i = row;
          for (; i + IO::kStep <= row + g.S; i += IO::kStep) {
            sum_step<scalar_t, kIn, kParams>(in, out, i, IO::kStep, param, op, a, b, stream);
          }
          if (i < row + g.S) {
            sum_step<scalar_t, kIn, kParams>(in, out, i, row + g.S - i, param, op, a, b, stream);
          }
        }
        aVec ta = a[0], tb = b[0];
        for (int k = 1; k < kVecs; ++k) {
          ta = ta + a[k];
          tb = tb + b[k];
        }
        sum_a[c] = lane_sum(ta);
        sum_b[c] = lane_sum(tb);
      }
    };
    if (block != nullptr) {
      channels(block->begin, block->end);
      return;
    }
    parallel_items(g.C, g.N * g.S, [&](int64_t begin, int64_t end) {
      channels(begin, end);
      stream_fence();
    });
    return;
  }
  // Channels-last: items of whole rows, each with its own partial sums per
  // channel position, added in item order at the end.
  const int64_t M = g.N * g.S;
  const int64_t C = g.C;
  const int64_t padded_c = (C + IO::kStep - 1) / IO::kStep * IO::kStep;
  const int64_t rows_per_item = std::max<int64_t>(1, kItemValues / C);
  const int64_t items = (M + rows_per_item - 1) / rows_per_item;
  std::vector<acc_t> partial(static_cast<size_t>(items * 2 * padded_c), acc_t(0));
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      acc_t* pa = partial.data() + item * 2 * padded_c;
      acc_t* pb = pa + padded_c;
      const int64_t m1 = std::min(M, (item + 1) * rows_per_item);
      for (int64_t c = 0; c < C; c += IO::kStep) {
        const int64_t n = std::min<int64_t>(IO::kStep, C - c);
        aVec param[kVecs][kParams];
        for (int k = 0; k < kVecs; ++k)
          for (int j = 0; j < kParams; ++j) param[k][j] = aVec::loadu(params[j]->data() + c + k * IO::kAccLanes);
        aVec a[kVecs], b[kVecs];
        for (int k = 0; k < kVecs; ++k) a[k] = b[k] = aVec(acc_t(0));
        for (int64_t m = item * rows_per_item; m < m1; ++m) {
          sum_step<scalar_t, kIn, kParams>(in, out, m * C + c, n, param, op, a, b, stream);
        }
        for (int k = 0; k < kVecs; ++k) {
          a[k].store(pa + c + k * IO::kAccLanes);
          b[k].store(pb + c + k * IO::kAccLanes);
        }
      }
    }
    stream_fence();
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t ta = 0, tb = 0;
    for (int64_t item = 0; item < items; ++item) {
      ta += partial[item * 2 * padded_c + c];
      tb += partial[item * 2 * padded_c + padded_c + c];
    }
    sum_a[c] = ta;
    sum_b[c] = tb;
  }
}

// ---------------------------------------------------------------------------
// The operations
// ---------------------------------------------------------------------------

template <typename aVec, bool kRelu>
inline aVec activation(const aVec& v) {
  if constexpr (kRelu) {
    return at::vec::clamp_min(v, aVec(0));
  } else {
    return v;
  }
}

// Statistics of x - shift[c] (shift = the channel's first value, which keeps
// fp32 sums of squares accurate for inputs with a large offset): a = x - s,
// b = (x - s)^2.
struct ShiftedMoments {
  template <typename aVec>
  aVec operator()(const aVec (&v)[1], const aVec (&p)[1], aVec& a, aVec& b) const {
    a = v[0] - p[0];
    b = a * a;
    return a;
  }
};

// y = act((x - mean) * scale + bias [+ residual]); params mean, scale, bias.
template <int kIn, bool kRelu>
struct NormalizeAct {
  template <typename aVec>
  aVec operator()(const aVec (&v)[kIn], const aVec (&p)[3]) const {
    aVec y = at::vec::fmadd(v[0] - p[0], p[1], p[2]);
    if constexpr (kIn == 2) {
      y = y + v[1];
    }
    return activation<aVec, kRelu>(y);
  }
};

// dy with the ReLU's mask from the output: 0 where y <= 0 (torch's
// threshold_backward). Inputs (dy, y) with the ReLU, (dy) without.
template <bool kRelu, typename aVec, int kIn>
inline aVec masked_grad(const aVec (&v)[kIn]) {
  if constexpr (kRelu) {
    return aVec::blendv(v[0], aVec(0), v[1] <= aVec(0));
  } else {
    return v[0];
  }
}

// Sums of d and d * (x - mean), returning d (grad_residual). Inputs dy[, y], x;
// param mean.
template <bool kRelu>
struct GradSums {
  static constexpr int kIn = kRelu ? 3 : 2;
  template <typename aVec>
  aVec operator()(const aVec (&v)[kIn], const aVec (&p)[1], aVec& a, aVec& b) const {
    const aVec d = masked_grad<kRelu>(v);
    a = d;
    b = d * (v[kIn - 1] - p[0]);
    return d;
  }
};

// Training grad_input: (d - mean_d - (x - mean) * k) * scale; inputs
// d-source (dy[, y]), x; params mean, mean_d, k, scale.
template <bool kRelu>
struct GradInputTrain {
  static constexpr int kIn = kRelu ? 3 : 2;
  template <typename aVec>
  aVec operator()(const aVec (&v)[kIn], const aVec (&p)[4]) const {
    const aVec d = masked_grad<kRelu>(v);
    return (d - p[1] - (v[kIn - 1] - p[0]) * p[2]) * p[3];
  }
};

// Evaluation grad_input: d * scale; inputs dy[, y]; param scale.
template <bool kRelu>
struct GradInputEval {
  static constexpr int kIn = kRelu ? 2 : 1;
  template <typename aVec>
  aVec operator()(const aVec (&v)[kIn], const aVec (&p)[1]) const {
    return masked_grad<kRelu>(v) * p[0];
  }
};

// grad_residual alone: the masked dy.
template <bool kRelu>
struct MaskedGrad {
  static constexpr int kIn = kRelu ? 2 : 1;
  template <typename aVec>
  aVec operator()(const aVec (&v)[kIn], const aVec (&)[1]) const {
    return masked_grad<kRelu>(v);
  }
};

// run(block) for blocks of channels in parallel (channels-first: the passes
// of a block follow each other while its rows are in cache), or run(nullptr)
// once, every pass parallel on its own (channels-last).
template <typename Run>
void run_by_channel_blocks(const Geometry& g, const Run& run) {
  if (g.channels_last()) {
    run(nullptr);
    return;
  }
  parallel_items(g.C, g.N * g.S, [&](int64_t begin, int64_t end) {
    const ChannelBlock block{begin, end};
    run(&block);
    stream_fence();
  });
}

// Calls f(std::integral_constant<bool, relu>).
template <typename F>
void dispatch_relu(bool relu, const F& f) {
  if (relu) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The forward's elementwise pass (both modes), from per-channel mean, scale
// and bias.
template <typename scalar_t>
void normalize_act(
    const Geometry& g, const scalar_t* x, const scalar_t* residual, scalar_t* y, bool relu,
    const std::vector<at::opmath_type<scalar_t>>& mean,
    const std::vector<at::opmath_type<scalar_t>>& scale,
    const std::vector<at::opmath_type<scalar_t>>& bias, const ChannelBlock* block = nullptr) {
  const std::vector<at::opmath_type<scalar_t>>* params[3] = {&mean, &scale, &bias};
  dispatch_relu(relu, [&](auto relu_tag) {
    constexpr bool kRelu = decltype(relu_tag)::value;
    if (residual != nullptr) {
      channel_map<scalar_t, 2, 3>(g, Inputs<scalar_t, 2>{{x, residual}}, y, params, NormalizeAct<2, kRelu>{}, block);
    } else {
      channel_map<scalar_t, 1, 3>(g, Inputs<scalar_t, 1>{{x}}, y, params, NormalizeAct<1, kRelu>{}, block);
    }
  });
}


// Per-channel acc_t values of a (C)-tensor of acc_t.
template <typename acc_t>
Tensor channel_tensor(const std::vector<acc_t>& values, int64_t C, const Tensor& like) {
  Tensor t = at::empty({C}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  std::copy_n(values.data(), C, t.mutable_data_ptr<acc_t>());
  return t;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_act_train_cpu(
    const Tensor& input, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, double momentum, double eps,
    bool relu) {
  check_act_train_args(input, residual, weight, bias, running_mean, running_var);
  const int64_t C = input.size(1);
  const auto stat_options = input.options().dtype(acc_dtype(input.scalar_type()));
  if (input.numel() == 0) {
    return {at::empty_like(input), at::zeros({C}, stat_options), at::zeros({C}, stat_options)};
  }
  const ActForwardInputs in(input, residual);
  const Tensor& x = in.x;
  const Geometry& g = in.g;
  OutputLike out(input, x, pooled(input.scalar_type()));
  Tensor save_mean, save_invstd, unbiased_var;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_act_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    std::vector<acc_t> shift(C + VecIO<scalar_t>::kStep, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      shift[c] = static_cast<acc_t>(x_ptr[g.channels_last() ? c : c * g.S]);
    }
    std::vector<acc_t> s1(C), s2(C);
    const std::vector<acc_t>* shift_param[1] = {&shift};
    const acc_t n = static_cast<acc_t>(g.reduce_size());
    std::vector<acc_t> w = padded_or<scalar_t>(weight, C, 1.0), b = padded_or<scalar_t>(bias, C, 0.0);
    std::vector<acc_t> mean(C + VecIO<scalar_t>::kStep), scale(mean.size()), invstd(C), unbiased(C);
    // Statistics, then the output, of the channels in `block` (all with none).
    const auto run = [&](const ChannelBlock* block) {
      channel_sums<scalar_t, 1, 1>(g, Inputs<scalar_t, 1>{{x_ptr}}, nullptr, shift_param, ShiftedMoments{},
                                   s1.data(), s2.data(), block);
      for (int64_t c = block ? block->begin : 0; c < (block ? block->end : C); ++c) {
        const acc_t shifted_mean = s1[c] / n;
        const acc_t var = std::max(acc_t(0), (s2[c] - s1[c] * shifted_mean) / n);
        mean[c] = shift[c] + shifted_mean;
        invstd[c] = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
        unbiased[c] = var * n / (n - acc_t(1));
        scale[c] = invstd[c] * w[c];
      }
      normalize_act<scalar_t>(
          g, x_ptr, in.residual_data<scalar_t>(), out.buffer.mutable_data_ptr<scalar_t>(), relu, mean,
          scale, b, block);
    };
    run_by_channel_blocks(g, run);
    save_mean = channel_tensor(mean, C, input);
    save_invstd = channel_tensor(invstd, C, input);
    unbiased_var = channel_tensor(unbiased, C, input);
  });
  return finish_act_train(out, save_mean, save_invstd, unbiased_var, running_mean, running_var, momentum);
}

Tensor batch_norm_act_eval_cpu(
    const Tensor& input, const OptTensor& residual, const Tensor& running_mean,
    const Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps, bool relu) {
  check_act_eval_args(input, residual, running_mean, running_var, weight, bias);
  if (input.numel() == 0) {
    return at::empty_like(input);
  }
  const ActForwardInputs in(input, residual);
  const Tensor& x = in.x;
  const Geometry& g = in.g;
  OutputLike out(input, x, pooled(input.scalar_type()));
  const int64_t C = g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_act_eval_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> mean = padded<scalar_t>(running_mean);
    std::vector<acc_t> scale = padded<scalar_t>(running_var);
    const std::vector<acc_t> w = padded_or<scalar_t>(weight, C, 1.0);
    const std::vector<acc_t> b = padded_or<scalar_t>(bias, C, 0.0);
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = w[c] / std::sqrt(scale[c] + static_cast<acc_t>(eps));
    }
    normalize_act<scalar_t>(
        g, x.const_data_ptr<scalar_t>(), in.residual_data<scalar_t>(),
        out.buffer.mutable_data_ptr<scalar_t>(), relu, mean, scale, b);
  });
  out.finish();
  return out.result;
}

ActGrads batch_norm_act_backward_cpu(
    const Tensor& grad_output, const OptTensor& output, const Tensor& input,
    const OptTensor& weight, const Tensor& mean, const Tensor& invstd, bool training, bool relu,
    std::array<bool, 4> output_mask) {
  const at::ScalarType param_type =
      check_act_backward_args(grad_output, output, input, weight, mean, invstd, relu);
  const int64_t C = input.size(1);
  if (input.numel() == 0) {
    return empty_input_act_grads(input, param_type, output_mask);
  }
  OptTensor grad_weight, grad_bias;
  const Tensor x = to_walkable(input);
  const Tensor dy = to_layout_of(grad_output, x);
  const Tensor y = relu ? to_layout_of(*output, x) : Tensor();
  const Geometry g = geometry_of(x, *direct_layout(x));
  const bool need_sums = output_mask[2] || output_mask[3] || (training && output_mask[0]);
  std::optional<OutputLike> dx, dres;
  if (output_mask[0]) dx.emplace(input, x, pooled(input.scalar_type()));
  if (output_mask[1]) dres.emplace(input, x, pooled(input.scalar_type()));
  Tensor sum_d_t, sum_dxmu_t;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbn_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = std::vector<acc_t>;
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
    const scalar_t* y_ptr = relu ? y.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dres_ptr = dres ? dres->buffer.mutable_data_ptr<scalar_t>() : nullptr;
    const Vec mu = padded<scalar_t>(mean), inv = padded<scalar_t>(invstd);
    const Vec w = padded_or<scalar_t>(weight, C, 1.0);
    Vec sum_d(C, acc_t(0)), sum_dxmu(C, acc_t(0));
    const Vec* mean_param[1] = {&mu};
    dispatch_relu(relu, [&](auto relu_tag) {
      constexpr bool kRelu = decltype(relu_tag)::value;
      // The d-source inputs (dy, and y with the ReLU), then x.
      Inputs<scalar_t, GradSums<kRelu>::kIn> sources_x{};
      Inputs<scalar_t, GradInputEval<kRelu>::kIn> sources{};
      sources_x.p[0] = sources.p[0] = dy_ptr;
      if constexpr (kRelu) sources_x.p[1] = sources.p[1] = y_ptr;
      sources_x.p[GradSums<kRelu>::kIn - 1] = x_ptr;
      scalar_t* dx_ptr = dx ? dx->buffer.mutable_data_ptr<scalar_t>() : nullptr;
      const acc_t inv_n = acc_t(1) / static_cast<acc_t>(g.reduce_size());
      Vec scale(mu.size(), acc_t(0)), mean_d(mu.size(), acc_t(0)), xmu_factor(mu.size(), acc_t(0));
      // The sums (and grad_residual), then grad_input, of the channels in
      // `block` (all with none).
      const auto run = [&](const ChannelBlock* block) {
        if (need_sums) {
          channel_sums<scalar_t, GradSums<kRelu>::kIn, 1>(
              g, sources_x, dres_ptr, mean_param, GradSums<kRelu>{}, sum_d.data(), sum_dxmu.data(), block);
        } else if (dres_ptr != nullptr) {
          channel_map<scalar_t, MaskedGrad<kRelu>::kIn, 1>(g, sources, dres_ptr, mean_param, MaskedGrad<kRelu>{}, block);
        }
        if (dx_ptr == nullptr) {
          return;
        }
        for (int64_t c = block ? block->begin : 0; c < (block ? block->end : C); ++c) {
          scale[c] = inv[c] * w[c];
          mean_d[c] = sum_d[c] * inv_n;
          xmu_factor[c] = inv[c] * inv[c] * sum_dxmu[c] * inv_n;
        }
        // With grad_residual written, it is the masked gradient: read it
        // instead of dy and y.
        if (training) {
          const Vec* params[4] = {&mu, &mean_d, &xmu_factor, &scale};
          if (dres_ptr != nullptr) {
            channel_map<scalar_t, 2, 4>(g, Inputs<scalar_t, 2>{{dres_ptr, x_ptr}}, dx_ptr, params,
                                        GradInputTrain<false>{}, block);
          } else {
            channel_map<scalar_t, GradInputTrain<kRelu>::kIn, 4>(g, sources_x, dx_ptr, params,
                                                                 GradInputTrain<kRelu>{}, block);
          }
        } else {
          const Vec* params[1] = {&scale};
          if (dres_ptr != nullptr) {
            channel_map<scalar_t, 1, 1>(g, Inputs<scalar_t, 1>{{dres_ptr}}, dx_ptr, params, GradInputEval<false>{}, block);
          } else {
            channel_map<scalar_t, GradInputEval<kRelu>::kIn, 1>(g, sources, dx_ptr, params, GradInputEval<kRelu>{}, block);
          }
        }
      };
      if (need_sums) {
        run_by_channel_blocks(g, run);
      } else {
        run(nullptr);
      }
    });
    sum_d_t = channel_tensor(sum_d, C, input);
    Vec dw(C);
    for (int64_t c = 0; c < C; ++c) dw[c] = sum_dxmu[c] * inv[c];
    sum_dxmu_t = channel_tensor(dw, C, input);
  });
  if (output_mask[2]) grad_weight = sum_dxmu_t.to(param_type);
  if (output_mask[3]) grad_bias = sum_d_t.to(param_type);
  return {finished(dx), finished(dres), grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastbn::cpu

TORCH_LIBRARY_IMPL(fastbn, CPU, m) {
  m.impl("batch_norm_act_train", &fastbn::cpu::batch_norm_act_train_cpu);
  m.impl("batch_norm_act_eval", &fastbn::cpu::batch_norm_act_eval_cpu);
  m.impl("batch_norm_act_backward", &fastbn::cpu::batch_norm_act_backward_cpu);
}
