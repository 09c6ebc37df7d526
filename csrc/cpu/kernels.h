// The interface between the CPU operators' entry points (batch_norm_cpu.cpp,
// compiled once) and the CPU kernels (the *_kernels.cpp files, compiled once
// per instruction-set variant).
//
// A kernel is a function template over the element type (float, double,
// Half, BFloat16) taking pointers, a Geometry and per-channel values; it is
// reached through a KernelStub, which holds one instantiation per element
// type for every variant that was built and hands out the one for the
// variant in use (active_isa(), decided once at load). This is ATen's
// DispatchStub, keyed by element type too:
//
//   // a header: the function type and the stub (an inline variable: one
//   // object however many files include it)
//   template <typename T> using MyFn = void(const Geometry&, const T* x, T* y);
//   FASTBN_DECLARE_KERNEL(my_kernel, MyFn);
//   // a kernel file listed in fastbn/_build.py CPU_KERNEL_SOURCES:
//   namespace fastbn::cpu { inline namespace CPU_CAPABILITY { namespace {
//   template <typename T> void my_kernel_impl(const Geometry& g, const T* x, T* y) {...}
//   FASTBN_REGISTER_KERNEL(my_kernel, my_kernel_impl);
//   }}}
//   // the entry point, inside AT_DISPATCH_FLOATING_TYPES_AND2:
//   my_kernel.get<scalar_t>()(g, x, y);
//
// Everything a kernel file defines must live in the per-variant namespace
// fastbn::cpu::CPU_CAPABILITY (AVX2 for the baseline, AVX512 for the other
// variant), like at::vec's classes: an inline function outside it would be
// compiled once per variant under one name, and the linker could keep the
// AVX-512 copy for baseline callers too.
//
// This header is included before the variant's target options take effect
// (see isa_avx512_begin.h), so what it defines is baseline code everywhere.
#pragma once

#include "../batch_norm.h"

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

// The baseline's namespace name when no CPU_CAPABILITY is set (builds other
// than x86, whose vector code is at::vec's DEFAULT).
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#endif
// Which slot of a KernelStub a kernel file fills: 0 unless the file is
// compiled as another variant (isa_avx512_begin.h sets 1).
#ifndef FASTBN_ISA_INDEX
#define FASTBN_ISA_INDEX 0
#endif

namespace fastbn::cpu {

// ---------------------------------------------------------------------------
// Instruction-set variants and kernel stubs
// ---------------------------------------------------------------------------

// The variants the kernels are compiled for; higher is better.
enum class CpuIsa : int {
  kBaseline = 0,  // what the whole extension targets: x86-64 + AVX2 + FMA + F16C on x86
  kAvx512 = 1,    // AVX512F/BW/VL/DQ (+ BF16 where the compiler has it)
};
constexpr int kCpuIsaCount = 2;

// The variant in use: the best one that was built and that this CPU runs,
// capped by FASTBN_CPU_ISA. Decided on the first call (at load).
CpuIsa active_isa();
// Its name as FASTBN_CPU_ISA and fastbn.build_info() spell it.
const char* isa_name(CpuIsa isa);
// Whether the kernels were compiled for `isa`.
bool isa_built(CpuIsa isa);
// Cache sizes in bytes (0: unknown): L2 per core, and the last level (shared).
struct CacheSizes {
  int64_t l2_per_core = 0;
  int64_t llc = 0;
};
// This machine's, queried once (Linux sysfs, else the C library's cpuid answer).
const CacheSizes& machine_cache_sizes();
// The rule (see streaming.cpp): an elementwise pass that moves at least this
// many bytes (inputs read + output written) on `threads` threads writes its
// output with streaming stores.
int64_t stream_min_bytes(const CacheSizes& caches, int64_t threads);
// The threshold in use: FASTBN_CPU_STREAM_MIN_MB if set, else the rule for
// this machine at the current thread count.
int64_t active_stream_min_bytes();
// Whether a pass moving `bytes_moved` bytes streams its output.
bool stream_pass(int64_t bytes_moved);
// The rule (see streaming.cpp): an elementwise pass that moves at least this
// many bytes prefetches its inputs in software; smaller ones are taken to
// find them in the cache.
int64_t prefetch_min_bytes(const CacheSizes& caches);
// The threshold in use: FASTBN_CPU_PREFETCH_MIN_MB if set, else the rule.
int64_t active_prefetch_min_bytes();
// Whether a pass moving `bytes_moved` bytes prefetches its inputs.
bool prefetch_pass(int64_t bytes_moved);
// Whether the CPU has AVX512_BF16 (the AVX-512 variant uses it only then).
extern const bool cpu_has_avx512_bf16;

template <template <typename> class Fn>
struct KernelStub {
  struct Variant {
    Fn<float>* f32;
    Fn<double>* f64;
    Fn<c10::Half>* f16;
    Fn<c10::BFloat16>* bf16;
  };
  // Zero-initialised (constant initialisation), so registrations that run
  // during the library's dynamic initialisation find it ready.
  Variant variants[kCpuIsaCount];

  template <typename scalar_t>
  static Fn<scalar_t>* pick(const Variant& v) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return v.f32;
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      return v.f64;
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      return v.f16;
    } else {
      static_assert(std::is_same_v<scalar_t, c10::BFloat16>, "unsupported element type");
      return v.bf16;
    }
  }

  // The kernel for scalar_t of the active variant, or of the best lower one
  // that was built (a file the compiler could not build for a variant).
  template <typename scalar_t>
  Fn<scalar_t>* get() const {
    for (int isa = static_cast<int>(active_isa()); isa >= 0; --isa) {
      if (Fn<scalar_t>* f = pick<scalar_t>(variants[isa])) {
        return f;
      }
    }
    TORCH_CHECK(false, "fastbn: a CPU kernel was not registered (its file is missing from CPU_KERNEL_SOURCES)");
  }
};

template <template <typename> class Fn>
bool register_kernel(KernelStub<Fn>& stub, int isa, const typename KernelStub<Fn>::Variant* variant) {
  stub.variants[isa] = *variant;
  return true;
}

}  // namespace fastbn::cpu

#define FASTBN_DECLARE_KERNEL(name, fn_type) inline ::fastbn::cpu::KernelStub<fn_type> name{}

#define FASTBN_KERNEL_CAT_(a, b) a##b
#define FASTBN_KERNEL_CAT(a, b) FASTBN_KERNEL_CAT_(a, b)
// Fills this variant's slot of `stub` with the four instantiations of the
// function template `kernel`, at load. Use inside the per-variant namespace.
// The table is a constant; the load-time code only copies it.
#define FASTBN_REGISTER_KERNEL(stub, kernel)                                                      \
  constexpr typename std::remove_reference_t<decltype(stub)>::Variant FASTBN_KERNEL_CAT(          \
      kernel_variant_, __LINE__){&kernel<float>, &kernel<double>, &kernel<c10::Half>,               \
                                 &kernel<c10::BFloat16>};                                          \
  const bool FASTBN_KERNEL_CAT(kernel_registered_, __LINE__) =                                     \
      ::fastbn::cpu::register_kernel(stub, FASTBN_ISA_INDEX, &FASTBN_KERNEL_CAT(kernel_variant_, __LINE__))

namespace fastbn::cpu {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// Running (count, mean, M2) of a set of values.
template <typename acc_t>
struct WelfordStat {
  int64_t n = 0;
  acc_t mean = 0;
  acc_t m2 = 0;

  inline void add(acc_t x) {
    ++n;
    const acc_t d = x - mean;
    mean += d / static_cast<acc_t>(n);
    m2 += d * (x - mean);
  }
  // Chan et al.'s parallel merge of two partial results.
  inline void merge(const WelfordStat& o) {
    if (o.n == 0) {
      return;
    }
    if (n == 0) {
      *this = o;
      return;
    }
    const int64_t total = n + o.n;
    const acc_t o_frac = static_cast<acc_t>(o.n) / static_cast<acc_t>(total);
    const acc_t delta = o.mean - mean;
    mean += delta * o_frac;
    m2 += o.m2 + delta * delta * static_cast<acc_t>(n) * o_frac;
    n = total;
  }
};

// ---------------------------------------------------------------------------
// Per-channel statistics (statistics_kernels.cpp). x and dy are walked in
// g's layout; per-channel arrays hold g.C values of the accumulation type.
// Results do not depend on the number of threads.
// ---------------------------------------------------------------------------

// out[c] = Welford state (count, mean, M2) of channel c over N and S.
template <typename T>
using BatchStatsFn = void(const T* x, const Geometry& g, WelfordStat<acc_type<T>>* out);
FASTBN_DECLARE_KERNEL(batch_stats_kernel, BatchStatsFn);

// The gradient d the backward reduces: dy for batch norm; after the fused
// ReLU, dy where the saved output y > 0 and 0 elsewhere. `d_out`, when not
// null, receives d (grad_residual of the fused residual add).
template <typename T>
struct GradInput {
  const T* dy;
  const T* y = nullptr;  // the saved output: d is masked by y > 0 when set
  T* d_out = nullptr;    // where d is written, when set
};

// sum_dy[c] = sum(d), sum_dy_xmu[c] = sum(d * (x - mean[c])) over channel c.
template <typename T>
using GradSumsFn = void(const GradInput<T>& d, const T* x, const Geometry& g, const acc_type<T>* mean,
                        acc_type<T>* sum_dy, acc_type<T>* sum_dy_xmu);
FASTBN_DECLARE_KERNEL(grad_sums_kernel, GradSumsFn);

// From Welford states of n values each: mean, invstd = 1 / sqrt(M2 / n + eps)
// and the unbiased variance M2 / (n - 1), for C channels.
template <typename T>
using FinishStatsFn = void(const WelfordStat<acc_type<T>>* stats, int64_t C, int64_t n, double eps,
                           acc_type<T>* mean, acc_type<T>* invstd, acc_type<T>* unbiased);
FASTBN_DECLARE_KERNEL(finish_stats_kernel, FinishStatsFn);

// ---------------------------------------------------------------------------
// Elementwise passes (elementwise_kernels.cpp); new formulas go through
// channel_map in elementwise.h.
// ---------------------------------------------------------------------------

// The forward's epilogue: y = act(batch_norm(x) + residual), act in
// {identity, relu}, the residual optional (null).
struct Epilogue {
  bool relu = false;
};

// y = act((x - mean[c]) * scale[c] + bias[c] [+ residual])
template <typename T>
using NormalizeFn = void(const Geometry& g, const T* x, const T* residual, T* y, Epilogue epilogue,
                         const acc_type<T>* mean, const acc_type<T>* scale, const acc_type<T>* bias);
FASTBN_DECLARE_KERNEL(normalize_kernel, NormalizeFn);

// Training backward: dx = (dy - (mean_dy[c] + (x - mean[c]) * xmu_coef[c])) * scale[c]
// (mean_dy = sum(dy) / n, xmu_coef = invstd^2 * sum(dy * (x - mean)) / n,
// scale = invstd * weight).
// dy stands for d (see GradInput; its d_out is not used).
template <typename T>
using GradInputTrainFn = void(const Geometry& g, const GradInput<T>& d, const T* x, T* dx,
                              const acc_type<T>* mean, const acc_type<T>* mean_dy,
                              const acc_type<T>* xmu_coef, const acc_type<T>* scale);
FASTBN_DECLARE_KERNEL(grad_input_train_kernel, GradInputTrainFn);

// Evaluation backward: dx = d * scale[c] (scale = invstd * weight).
template <typename T>
using GradInputEvalFn = void(const Geometry& g, const GradInput<T>& d, T* dx, const acc_type<T>* scale);
FASTBN_DECLARE_KERNEL(grad_input_eval_kernel, GradInputEvalFn);

// ---------------------------------------------------------------------------
// Fused reduce-then-transform for channels-first tensors with long rows and
// small channels (fused_kernels.cpp). Each returns false, having done
// nothing, for a shape that does not take this path.
// ---------------------------------------------------------------------------

// Training forward: the statistics (mean, invstd, unbiased as
// FinishStatsFn) and y = act((x - mean) * invstd * weight + bias [+ residual])
// as NormalizeFn.
template <typename T>
using TrainFusedFn = bool(const Geometry& g, const T* x, const T* residual, T* y, Epilogue epilogue,
                          const acc_type<T>* weight, const acc_type<T>* bias, double eps,
                          acc_type<T>* mean, acc_type<T>* invstd, acc_type<T>* unbiased);
FASTBN_DECLARE_KERNEL(train_fused_kernel, TrainFusedFn);

// Backward: the sums of GradSumsFn (writing d where d.d_out is set) and,
// when dx is not null, grad_input as GradInputTrainFn (training) or
// GradInputEvalFn computes it from them.
template <typename T>
using BackwardFusedFn = bool(const Geometry& g, const GradInput<T>& d, const T* x, T* dx, bool training,
                             const acc_type<T>* mean, const acc_type<T>* invstd,
                             const acc_type<T>* weight, acc_type<T>* sum_dy, acc_type<T>* sum_dy_xmu);
FASTBN_DECLARE_KERNEL(backward_fused_kernel, BackwardFusedFn);

}  // namespace fastbn::cpu
