// Elementwise passes: out = op(inputs..., per-channel parameters...) over
// a tensor in either layout (channel_map), walking memory in order, with
// streaming stores for large outputs. Per variant (see kernels.h); the
// batch-norm formulas' kernels are in elementwise_kernels.cpp.
//
// A new formula is a functor `V operator()(const V (&in)[kIn], const V
// (&param)[kParams]) const` applied with channel_map<scalar_t, kIn, kParams>.
#pragma once

#include "vec_utils.h"
#include "work_split.h"

#include <numeric>
#include <type_traits>
#include <vector>

namespace fastbn::cpu {
inline namespace CPU_CAPABILITY {
constexpr int64_t kCacheLineBytes = 64;  // every x86 CPU these kernels build for

// ---------------------------------------------------------------------------
// Elementwise: out = f(inputs..., per-channel parameters...)
// ---------------------------------------------------------------------------

// Applies `op(const aVec (&in)[kIn], const aVec (&param)[kParams]) -> aVec`
// to the `len` values starting at `base`; `param_at(offset within the run,
// aVec (&param)[kParams])` supplies the parameter vectors.
// `stream` writes full vectors with non-temporal stores (large outputs).
template <typename scalar_t, int kIn, int kParams, typename ParamAt, typename Op>
inline void map_run(
    const scalar_t* const (&in)[kIn], scalar_t* out, int64_t base, int64_t len,
    const ParamAt& param_at, const Op& op, bool stream) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  const scalar_t* src[kIn];  // a local copy: see map_periods
  for (int i = 0; i < kIn; ++i) {
    src[i] = in[i];
  }
  // The values [j, j + n), n <= kStep.
  const auto apply = [&](int64_t j, int64_t n) {
    aVec v[kIn][IO::kVecs];
    for (int i = 0; i < kIn; ++i) {
      if (n == IO::kStep) {
        IO::load_ahead(src[i] + base + j, v[i]);
      } else {
        IO::load_partial(src[i] + base + j, n, v[i]);
      }
    }
    aVec result[IO::kVecs];
    for (int k = 0; k < IO::kVecs; ++k) {
      aVec args[kIn];
      for (int i = 0; i < kIn; ++i) {
        args[i] = v[i][k];
      }
      aVec prm[kParams];
      param_at(j + k * IO::kAccLanes, prm);
      result[k] = op(args, prm);
    }
    if (n == IO::kStep) {
      IO::store(out + base + j, result, stream);
    } else {
      IO::store_partial(out + base + j, n, result);
    }
  };
  int64_t j = 0;
  if (stream && kStreamAlign != 0) {
    // Streaming stores need aligned addresses (IO::store falls back to plain
    // ones): a partial vector first brings the rest of the run to one. Rows
    // of bf16 28x28 images start misaligned every other row.
    const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + base) % kStreamAlign);
    if (misaligned != 0) {
      j = std::min<int64_t>(len, (kStreamAlign - misaligned) / static_cast<int64_t>(sizeof(scalar_t)));
      apply(0, j);
    }
  }
  for (; j < len; j += IO::kStep) {
    apply(j, std::min<int64_t>(IO::kStep, len - j));
  }
}

// The bytes a pass over g moves when it reads `inputs` tensors and writes one.
template <typename scalar_t>
int64_t pass_bytes_moved(const Geometry& g, int inputs) {
  return (inputs + 1) * g.numel() * static_cast<int64_t>(sizeof(scalar_t));
}

// Whether that pass writes with streaming stores: decided from the machine's
// caches (stream_pass, see streaming.cpp).
template <typename scalar_t>
bool stream_output(const Geometry& g, int inputs = 1) {
  return stream_pass(pass_bytes_moved<scalar_t>(g, inputs));
}

// Whether that pass prefetches its inputs in software (prefetch_pass, see
// streaming.cpp): not when they are likely in the cache already.
//
// The walks take the store kind and the prefetching as template arguments;
// their dispatchers (map_row, map_rows_flat, map_periods) spell the three
// kinds out. Through a generic lambda dispatcher GCC 12 inlined less: the
// bf16 narrowing went out of line, a call per store that clobbers every
// vector register (18% of the samples of a bf16 forward+backward).
template <typename scalar_t>
bool prefetch_input(const Geometry& g, int inputs = 1) {
  return prefetch_pass(pass_bytes_moved<scalar_t>(g, inputs));
}

// The whole steps of kRows rows side by side, each with one set of
// parameters: a loop of its own, everything in registers, the store kind and
// the prefetching fixed.
// Through map_run's per-step parameter callback (whose captures the compiler
// reloads after every vector store) it took about 20 instructions per AVX2
// vector, which made a pass over data in the last-level cache
// instruction-bound: fp32 16x64x16x16 eval 2.5x the time of torch.mul over
// the same bytes.
template <bool kStream, bool kPrefetch, int kRows, typename scalar_t, int kIn, int kParams, typename Op>
inline void map_steps(
    const scalar_t* const (&in)[kRows][kIn], scalar_t* const (&out)[kRows], int64_t steps,
    const Vectorized<at::opmath_type<scalar_t>> (&params)[kRows][kParams], const Op& op) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  // Local copies: vector stores may alias anything reached by reference.
  const scalar_t* src[kRows][kIn];
  scalar_t* dst[kRows];
  aVec prm[kRows][kParams];
  for (int r = 0; r < kRows; ++r) {
    for (int i = 0; i < kIn; ++i) {
      src[r][i] = in[r][i];
    }
    dst[r] = out[r];
    for (int i = 0; i < kParams; ++i) {
      prm[r][i] = params[r][i];
    }
  }
  // Every lane has the same parameters: the lanes may be in any order.
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t j = step * IO::kStep;
    for (int r = 0; r < kRows; ++r) {
      aVec v[kIn][IO::kVecs];
      for (int i = 0; i < kIn; ++i) {
        IO::template load_any_order<kPrefetch>(src[r][i] + j, v[i]);
      }
      aVec result[IO::kVecs];
      for (int k = 0; k < IO::kVecs; ++k) {
        aVec args[kIn];
        for (int i = 0; i < kIn; ++i) {
          args[i] = v[i][k];
        }
        result[k] = op(args, prm[r]);
      }
      if constexpr (kStream) {
        IO::stream_any_order(dst[r] + j, result);
      } else {
        IO::store_any_order(dst[r] + j, result);
      }
    }
  }
}

// The values of a row before its first aligned output, where streaming
// stores need aligned addresses (0 when not streaming).
template <typename scalar_t>
inline int64_t row_head(const scalar_t* out, int64_t len, bool stream) {
  if (!stream || kStreamAlign == 0) {
    return 0;
  }
  const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % kStreamAlign);
  return misaligned == 0 ? 0 : std::min<int64_t>(len, (kStreamAlign - misaligned) / static_cast<int64_t>(sizeof(scalar_t)));
}

// op over kRows channels-first rows of `len` values side by side (the r-th
// from bases[r], with parameters values[r]); `prefetch`: prefetch_input.
// Rows walked side by side are that many streams through memory (see
// part_stride); kRows = 2 needs both rows to have the same head (row_head).
template <int kRows, typename scalar_t, int kIn, int kParams, typename Op>
inline void map_rows_side_by_side(
    const scalar_t* const (&in)[kIn], scalar_t* out, const int64_t (&bases)[kRows], int64_t len,
    const at::opmath_type<scalar_t> (&values)[kRows][kParams], const Op& op, bool stream, bool prefetch) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  aVec prm[kRows][kParams];
  for (int r = 0; r < kRows; ++r) {
    for (int i = 0; i < kParams; ++i) {
      prm[r][i] = aVec(values[r][i]);
    }
  }
  // A partial vector first where streaming stores need the rest aligned.
  const int64_t head = row_head(out + bases[0], len, stream);
  const int64_t steps = (len - head) / IO::kStep;
  const int64_t done = head + steps * IO::kStep;
  const scalar_t* at[kRows][kIn];
  scalar_t* to[kRows];
  for (int r = 0; r < kRows; ++r) {
    const auto param_at = [&prm, r](int64_t, aVec (&p)[kParams]) {
      for (int i = 0; i < kParams; ++i) {
        p[i] = prm[r][i];
      }
    };
    if (head > 0) {
      map_run<scalar_t, kIn, kParams>(in, out, bases[r], head, param_at, op, false);
    }
    if (done < len) {
      map_run<scalar_t, kIn, kParams>(in, out, bases[r] + done, len - done, param_at, op, false);
    }
    for (int i = 0; i < kIn; ++i) {
      at[r][i] = in[i] + bases[r] + head;
    }
    to[r] = out + bases[r] + head;
  }
  // Streaming stores need kStreamAlign-aligned addresses: one vector (AVX2
  // and AVX-512 alike), so after the head every step is aligned.
  if (stream && kStreamAlign == static_cast<int64_t>(IO::kStep * sizeof(scalar_t))) {
    map_steps<true, true, kRows>(at, to, steps, prm, op);
  } else if (prefetch) {
    map_steps<false, true, kRows>(at, to, steps, prm, op);
  } else {
    map_steps<false, false, kRows>(at, to, steps, prm, op);
  }
}

// op over one channels-first row (the `len` values from `base`), whose
// parameters are the same for all its values; `prefetch`: prefetch_input.
template <typename scalar_t, int kIn, int kParams, typename Op>
inline void map_row(
    const scalar_t* const (&in)[kIn], scalar_t* out, int64_t base, int64_t len,
    const at::opmath_type<scalar_t> (&values)[kParams], const Op& op, bool stream, bool prefetch) {
  const int64_t bases[1] = {base};
  at::opmath_type<scalar_t> row_values[1][kParams];
  for (int i = 0; i < kParams; ++i) {
    row_values[0][i] = values[i];
  }
  map_rows_side_by_side<1>(in, out, bases, len, row_values, op, stream, prefetch);
}

// op on the n < kStep values from pos, all with the parameters prm.
template <typename scalar_t, int kIn, int kParams, typename Op>
inline void map_partial_step(
    const scalar_t* const (&in)[kIn], scalar_t* out, int64_t pos, int64_t n,
    const Vectorized<at::opmath_type<scalar_t>> (&prm)[kParams], const Op& op) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  aVec v[kIn][IO::kVecs];
  for (int i = 0; i < kIn; ++i) {
    IO::load_partial(in[i] + pos, n, v[i]);
  }
  aVec result[IO::kVecs];
  for (int k = 0; k < IO::kVecs; ++k) {
    aVec args[kIn];
    for (int i = 0; i < kIn; ++i) {
      args[i] = v[i][k];
    }
    result[k] = op(args, prm);
  }
  IO::store_partial(out + pos, n, result);
}

// op over the channels-first rows r0 <= r < r1 as one flat run of whole
// steps, for short rows (kStep <= S <= kShortRow): a step takes the
// current row's parameters, or, across a row end, a blend of the current
// and the next row's (S >= kStep: at most one row end per step). The state
// lives in locals: no call or partial vector per row. Measured on an AVX2
// machine, bf16 32x2048x7x7 eval: 1100 us with each row's whole steps as a
// map_row call plus one blended step (torch: 760 us); per-step bookkeeping
// through map_run's parameter callback, the first form of this walk, cost
// about 20 instructions per vector.
template <bool kStream, bool kPrefetch, typename scalar_t, int kIn, int kParams, typename Op>
void map_rows_flat_walk(
    const scalar_t* const (&inputs)[kIn], scalar_t* out, int64_t r0, int64_t r1, int64_t S, int64_t C,
    const at::opmath_type<scalar_t>* const (&params)[kParams], const Op& op) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  const scalar_t* in[kIn];  // locals: see map_periods
  for (int i = 0; i < kIn; ++i) {
    in[i] = inputs[i];
  }
  const acc_t* param[kParams];
  for (int i = 0; i < kParams; ++i) {
    param[i] = params[i];
  }
  // The steps' lanes are in load_any_order's order (blends use their positions).
  aVec positions[IO::kVecs];
  for (int k = 0; k < IO::kVecs; ++k) {
    positions[k] = IO::any_order_positions(k);
  }
  int64_t c = r0 % C;
  int64_t c_next = c + 1 == C ? 0 : c + 1;
  aVec cur[kParams], next[kParams];
  for (int i = 0; i < kParams; ++i) {
    cur[i] = aVec(param[i][c]);
    next[i] = aVec(param[i][c_next]);
  }
  const int64_t end = r1 * S;
  int64_t row_end = (r0 + 1) * S;
  int64_t pos = r0 * S;
  if (kStream && kStreamAlign != 0) {
    // Streaming stores need aligned steps: a partial one first (n < kStep <= S).
    const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + pos) % kStreamAlign);
    if (misaligned != 0) {
      const int64_t n = std::min<int64_t>(end - pos, (kStreamAlign - misaligned) / static_cast<int64_t>(sizeof(scalar_t)));
      map_partial_step<scalar_t, kIn, kParams>(in, out, pos, n, cur, op);
      pos += n;
    }
  }
  // Invariant: pos <= row_end (pos == row_end: the next step is all in the next row).
  for (; pos + IO::kStep <= end; pos += IO::kStep) {
    aVec v[kIn][IO::kVecs];
    for (int i = 0; i < kIn; ++i) {
      IO::template load_any_order<kPrefetch>(in[i] + pos, v[i]);
    }
    aVec result[IO::kVecs];
    if (pos + IO::kStep <= row_end) {
      for (int k = 0; k < IO::kVecs; ++k) {
        aVec args[kIn];
        for (int i = 0; i < kIn; ++i) {
          args[i] = v[i][k];
        }
        result[k] = op(args, cur);
      }
    } else {
      const int64_t split = row_end - pos;  // lanes from here on are in the next row
      for (int k = 0; k < IO::kVecs; ++k) {
        const auto in_next = positions[k] >= aVec(static_cast<acc_t>(split));
        aVec args[kIn], prm[kParams];
        for (int i = 0; i < kIn; ++i) {
          args[i] = v[i][k];
        }
        for (int i = 0; i < kParams; ++i) {
          prm[i] = aVec::blendv(cur[i], next[i], in_next);
        }
        result[k] = op(args, prm);
      }
      c = c_next;
      c_next = c + 1 == C ? 0 : c + 1;
      for (int i = 0; i < kParams; ++i) {
        cur[i] = next[i];
        next[i] = aVec(param[i][c_next]);
      }
      row_end += S;
    }
    if (kStream && kStreamAlign != 0 && reinterpret_cast<uintptr_t>(out + pos) % kStreamAlign == 0) {
      IO::stream_any_order(out + pos, result);
    } else {
      IO::store_any_order(out + pos, result);
    }
  }
  if (pos < end) {  // the last row's partial step (row_end == end here)
    map_partial_step<scalar_t, kIn, kParams>(in, out, pos, end - pos, cur, op);
  }
}

template <typename scalar_t, int kIn, int kParams, typename Op>
void map_rows_flat(
    const scalar_t* const (&in)[kIn], scalar_t* out, int64_t r0, int64_t r1, const Geometry& g,
    const at::opmath_type<scalar_t>* const (&params)[kParams], const Op& op, bool stream, bool prefetch) {
  if (stream) {
    map_rows_flat_walk<true, true, scalar_t, kIn, kParams>(in, out, r0, r1, g.S, g.C, params, op);
  } else if (prefetch) {
    map_rows_flat_walk<false, true, scalar_t, kIn, kParams>(in, out, r0, r1, g.S, g.C, params, op);
  } else {
    map_rows_flat_walk<false, false, scalar_t, kIn, kParams>(in, out, r0, r1, g.S, g.C, params, op);
  }
}

// op on the whole step of values at pos, with the parameter vectors prm (one
// set per vector of the step), into result: for walks that hold their
// parameters in registers. Forced inline in every variant: GCC left it out
// of line in AVX2 walks of three inputs, a call per step.
template <bool kPrefetch, typename scalar_t, int kIn, int kParams, typename Op>
C10_ALWAYS_INLINE void apply_step(
    const scalar_t* const (&in)[kIn], int64_t pos,
    const typename VecIO<scalar_t>::aVec (&prm)[VecIO<scalar_t>::kVecs][kParams], const Op& op,
    typename VecIO<scalar_t>::aVec (&result)[VecIO<scalar_t>::kVecs]) {
  using IO = VecIO<scalar_t>;
  typename IO::aVec v[kIn][IO::kVecs];
  for (int i = 0; i < kIn; ++i) {
    IO::template load_any_order<kPrefetch>(in[i] + pos, v[i]);
  }
  for (int k = 0; k < IO::kVecs; ++k) {
    typename IO::aVec args[kIn];
    for (int i = 0; i < kIn; ++i) {
      args[i] = v[i][k];
    }
    result[k] = op(args, prm[k]);
  }
}

// op on the n < kStep values from pos, whose parameters come in
// load_any_order's lane order (`params_at(k, prm)` for vector k): through
// a step-sized buffer, as the walks that call it are laid out for whole steps.
template <typename scalar_t, int kIn, int kParams, typename ParamsAt, typename Op>
inline void map_partial_step_any_order(
    const scalar_t* const (&in)[kIn], scalar_t* out, int64_t pos, int64_t n, const ParamsAt& params_at,
    const Op& op) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  scalar_t buffer[IO::kStep] = {};
  aVec v[kIn][IO::kVecs];
  for (int i = 0; i < kIn; ++i) {
    std::copy(in[i] + pos, in[i] + pos + n, buffer);
    IO::template load_any_order<false>(buffer, v[i]);
  }
  aVec result[IO::kVecs];
  for (int k = 0; k < IO::kVecs; ++k) {
    aVec args[kIn], prm[kParams];
    for (int i = 0; i < kIn; ++i) {
      args[i] = v[i][k];
    }
    params_at(k, prm);
    result[k] = op(args, prm);
  }
  IO::store_any_order(buffer, result);
  std::copy(buffer, buffer + n, out + pos);
}

// Periods of K values that map_periods_walk pairs among `whole` whole ones:
// it walks period p beside period p + half (for the first `half` periods),
// so that each step's parameters, loaded once, serve two vectors (2.5 loads
// a vector instead of 4 for fp32 eval, 4 instead of 6 for the training
// backward). The partners lie half the range apart, not side by side: two
// streams through separate pages, which the hardware prefetchers follow
// (adjacent periods, 2 KiB apart, share pages, and made fp32 channels_last
// 32x64x32x32 eval from memory 1.35x slower). Measured at 2 threads on an
// AVX2 EPYC, each against the unpaired walk in the same process: fp32
// channels_last eval 32x2048x7x7 1166 -> 933 us, 32x64x32x32 499 -> 441,
// 32x96x24x24 216 -> 179, 64x64x64x64 4836 -> 4165; forward+backward
// 32x64x32x32 4764 -> 4065, 32x96x24x24 2490 -> 2147. Partners a multiple of
// 4 KiB apart (same offset within a page) made bf16 passes with streaming
// stores 1.6x slower (64x128x32x32, 64x2048x7x7; fp32 was not hurt): half is
// made one smaller when that avoids it, and 16-bit types are not paired when
// nothing does (periods that are whole pages; see part_stride).
// With streaming stores walked step by step, a partner a period nearer or
// farther changed fp32 channels_last eval at 2 threads by up to 30% on the 8
// MiB-L3 EPYC, following where the buffers lay (NCHW row pairs: under 2%);
// line by line (map_periods_walk) took most of that away.
template <typename scalar_t>
int64_t paired_periods(int64_t whole, int64_t K) {
  const int64_t period_bytes = K * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t half = part_stride(whole, 2, period_bytes);
  if (VecIO<scalar_t>::kVecs > 1 && half * period_bytes % kPageBytes == 0) {
    return 0;
  }
  return half;
}

// Whether walking two parts side by side, the second `distance` bytes past
// the first, puts an input of one part at the same offset within a 4 KiB
// page (to within a cache line) as the output of the other: 4 KiB aliasing,
// where a load waits on a pending store whose low 12 address bits match.
// The walks then take the parts one at a time. On the AVX2 EPYC (8 MiB L3, 2
// threads), fp32 NCHW 64x64x32x32 eval (rows of 4 KiB: paired rows share
// their page offsets) with the input on a page boundary like the output,
// in one process: paired 2212 us, one at a time 1553 (inputs at other
// offsets: 1300-1750 paired, as the machine's speed drifted); channels_last
// with the input 2048 bytes into a page (the partner distance of C = 64):
// 1644 -> 1498 us. Large tensors from torch's allocator sit 64 bytes into a
// page and the output pool starts blocks on one, so this takes an input that
// is itself a pooled output (the residual of a fused BN+add+ReLU after another).
template <typename scalar_t, int kIn>
bool parts_alias(const scalar_t* const (&in)[kIn], const scalar_t* out, int64_t distance) {
  for (int i = 0; i < kIn; ++i) {
    const int64_t out_from_in = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % kPageBytes) -
                                static_cast<int64_t>(reinterpret_cast<uintptr_t>(in[i]) % kPageBytes);
    for (const int64_t in_from_out : {distance - out_from_in, -distance - out_from_in}) {
      const int64_t within_page = (in_from_out % kPageBytes + kPageBytes) % kPageBytes;
      if (within_page < kCacheLineBytes || within_page > kPageBytes - kCacheLineBytes) {
        return true;
      }
    }
  }
  return false;
}

// op over the channels-last periods p0 <= p < p1 of K values (the last may
// end at `total`), prefetching the inputs when kPrefetch (prefetch_input);
// `periodic_params[i]` holds K values, one per position of the period (in L1
// for the periods channel_map makes). Walks each period in memory order,
// loading each step's parameters beside its input. The arrays are copied
// into locals first: through the references the compiler would reload them
// after every store (vector types may alias anything).
// Measured on an AVX2 machine (2 threads, eval) against the earlier walk,
// which loaded the parameters once per four periods and went down the four
// side by side, on `python -m fastbn.bench` at 2 threads: fp32 channels_last
// 32x96x24x24 743 us -> 482 us (torch 492 and 475 in those runs), bf16
// 8192x1024 3566 us -> 1752 us (torch 2438 and 2325). Whole periods go in
// pairs (paired_periods).
template <bool kStream, bool kPrefetch, typename scalar_t, int kIn, int kParams, typename Op>
void map_periods_walk(
    const scalar_t* const (&inputs)[kIn], scalar_t* out, int64_t K, int64_t total, int64_t p0,
    int64_t p1, const at::opmath_type<scalar_t>* const (&periodic_params)[kParams], const Op& op) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  const scalar_t* in[kIn];
  for (int i = 0; i < kIn; ++i) {
    in[i] = inputs[i];
  }
  const at::opmath_type<scalar_t>* param[kParams];
  for (int i = 0; i < kParams; ++i) {
    param[i] = periodic_params[i];
  }
  const auto params_at = [&](int64_t j) {
    return [&param, j](int k, aVec (&prm)[kParams]) {
      for (int i = 0; i < kParams; ++i) {
        prm[i] = aVec::loadu(param[i] + j + k * IO::kAccLanes);  // padded by a step
      }
    };
  };
  // The first `whole` values (whole steps) of kRows periods, the r-th from
  // base + r * row_stride, side by side: each step's parameters serve all.
  const auto whole_steps = [&](auto rows, int64_t base, int64_t row_stride, int64_t whole) {
    constexpr int kRows = decltype(rows)::value;
    for (int64_t j = 0; j < whole; j += IO::kStep) {
      aVec v[kRows][kIn][IO::kVecs];
      for (int r = 0; r < kRows; ++r) {
        for (int i = 0; i < kIn; ++i) {
          IO::template load_any_order<kPrefetch>(in[i] + base + r * row_stride + j, v[r][i]);
        }
      }
      aVec result[kRows][IO::kVecs];
      for (int k = 0; k < IO::kVecs; ++k) {
        aVec prm[kParams];
        params_at(j)(k, prm);
        if constexpr (kRows > 1) {
          for (int i = 0; i < kParams; ++i) {
            keep_in_register(prm[i]);
          }
        }
        for (int r = 0; r < kRows; ++r) {
          aVec args[kIn];
          for (int i = 0; i < kIn; ++i) {
            args[i] = v[r][i][k];
          }
          result[r][k] = op(args, prm);
        }
      }
      for (int r = 0; r < kRows; ++r) {
        IO::store_any_order(out + base + r * row_stride + j, result[r], kStream);
      }
    }
  };
  // Two periods (the second row_stride values past the first) of whole
  // cache lines, a line of one and then the same line of the other, each
  // line's parameters loaded once for both. With streaming stores, step by
  // step (whole_steps) leaves both partners' lines half-written in turn.
  // fp32 channels_last at 2 threads on the 8 MiB-L3 EPYC, in one process,
  // step by step -> a line at a time: eval 32x96x24x24 606 -> 572 us, 616 ->
  // 567 and 659 -> 617 (NCHW 562, 551, 632), 64x128x32x32 2905 -> 2684,
  // 32x256x56x56 9150 -> 8708, 32x2048x7x7 1228 -> 1239; training forward
  // 32x96x24x24 1057 -> 932, forward+backward 2398 -> 2311 (at 1 thread:
  // eval within 1%, or 5% faster). It also took away most of the dependence
  // on the partner distance (see paired_periods): exactly half the range
  // apart, eval 32x64x32x32 892 -> 673 us and 768 -> 628, 32x512x10x10 677
  // -> 530 and 633 -> 497.
  constexpr int64_t kLineSteps =
      std::max<int64_t>(1, kCacheLineBytes / (IO::kStep * static_cast<int64_t>(sizeof(scalar_t))));
  const auto line_pairs = [&](int64_t base, int64_t row_stride, int64_t whole) {
    for (int64_t j = 0; j < whole; j += kLineSteps * IO::kStep) {
      aVec prm[kLineSteps][IO::kVecs][kParams];
      for (int s = 0; s < kLineSteps; ++s) {
        for (int k = 0; k < IO::kVecs; ++k) {
          params_at(j + s * IO::kStep)(k, prm[s][k]);
        }
      }
      for (int r = 0; r < 2; ++r) {
        for (int s = 0; s < kLineSteps; ++s) {
          const int64_t at = base + r * row_stride + j + s * IO::kStep;
          aVec result[IO::kVecs];
          apply_step<kPrefetch>(in, at, prm[s], op, result);
          IO::store_any_order(out + at, result, kStream);
        }
      }
    }
  };
  const int64_t period_bytes = K * static_cast<int64_t>(sizeof(scalar_t));
  int64_t p = p0;
  if (K % IO::kStep == 0) {
    int64_t half = paired_periods<scalar_t>(std::max<int64_t>(0, std::min(p1, total / K) - p0), K);
    if (parts_alias(in, out, half * period_bytes)) {
      half = 0;
    }
    // 16-bit types stay step by step: their passes are compute-bound with
    // AVX2, and a line's parameters take twice the registers (bf16 eval
    // 32x96x24x24 388 -> 402 us, 64x128x32x32 2026 -> 2122 a line at a time).
    const bool by_lines = kStream && IO::kVecs == 1 &&
                          period_bytes % (kLineSteps * IO::kStep * static_cast<int64_t>(sizeof(scalar_t))) == 0;
    for (; by_lines && p < p0 + half; ++p) {
      line_pairs(p * K, half * K, K);
    }
    for (; p < p0 + half; ++p) {
      whole_steps(std::integral_constant<int, 2>{}, p * K, half * K, K);
    }
    p += half;
  }
  for (; p < p1; ++p) {
    const int64_t base = p * K;
    const int64_t len = std::min(K, total - base);
    const int64_t whole = len / IO::kStep * IO::kStep;
    whole_steps(std::integral_constant<int, 1>{}, base, 0, whole);
    if (whole < len) {
      map_partial_step_any_order<scalar_t, kIn, kParams>(in, out, base + whole, len - whole, params_at(whole), op);
    }
  }
}

template <typename scalar_t, int kIn, int kParams, typename Op>
void map_periods(
    const scalar_t* const (&in)[kIn], scalar_t* out, int64_t K, int64_t total, int64_t p0,
    int64_t p1, const at::opmath_type<scalar_t>* const (&periodic_params)[kParams], const Op& op,
    bool stream, bool prefetch) {
  if (stream) {
    map_periods_walk<true, true, scalar_t, kIn, kParams>(in, out, K, total, p0, p1, periodic_params, op);
  } else if (prefetch) {
    map_periods_walk<false, true, scalar_t, kIn, kParams>(in, out, K, total, p0, p1, periodic_params, op);
  } else {
    map_periods_walk<false, false, scalar_t, kIn, kParams>(in, out, K, total, p0, p1, periodic_params, op);
  }
}

// Most parameter registers map_short_period may hold for kIn inputs; the
// rest of the vector registers (32 with AVX-512, 16 otherwise) carry the
// inputs, the result and a temporary. Beyond this the compiler would spill
// them to the stack. With AVX2, fp32 passes of one input hold 12 (the
// normalisation of C = 6, 12, 24 or 32 channels: 3 parameters a step for 3
// or 4 steps; fp32 channels_last 32x32x32x32 eval at 2 threads, 132-138 us
// through map_periods, 98 us so); 16-bit types, two vectors a step, 8.
template <typename scalar_t, int kIn>
constexpr int max_param_registers() {
#if defined(CPU_CAPABILITY_AVX512)
  return 18;
#else
  return VecIO<scalar_t>::kVecs == 1 ? 16 - 2 * (kIn + 1) : 8;
#endif
}

// map_run over the channels-last values [begin, end) (begin a multiple of
// KS * kStep) for a short base period of KS steps (the channel pattern repeats
// every KS * kStep values): the parameters of the whole period stay in
// registers and the values are walked in memory order, so each output costs
// one load and one store, where map_periods also loads parameters.
template <int KS, bool kStream, bool kPrefetch, typename scalar_t, int kIn, int kParams, typename Op>
void map_short_period(
    const scalar_t* const (&inputs)[kIn], scalar_t* out, int64_t begin, int64_t end,
    const at::opmath_type<scalar_t>* const (&periodic_params)[kParams], const Op& op) {
  using IO = VecIO<scalar_t>;
  using aVec = typename IO::aVec;
  constexpr int64_t kPeriod = KS * IO::kStep;
  const scalar_t* in[kIn];  // locals: see map_periods
  for (int i = 0; i < kIn; ++i) {
    in[i] = inputs[i];
  }
  aVec prm[KS][IO::kVecs][kParams];
  for (int s = 0; s < KS; ++s) {
    for (int k = 0; k < IO::kVecs; ++k) {
      for (int i = 0; i < kParams; ++i) {
        prm[s][k][i] = aVec::loadu(periodic_params[i] + s * IO::kStep + k * IO::kAccLanes);
      }
    }
  }
  // The step at pos, whose parameters are prm[s]. Called from five loops,
  // it went out of line in some AVX-512 walks without the attribute.
  const auto step = [&](int64_t pos, int s) FASTBN_LAMBDA_INLINE {
    aVec result[IO::kVecs];
    apply_step<kPrefetch>(in, pos, prm[s], op, result);
    if constexpr (kStream) {
      IO::stream_any_order(out + pos, result);  // aligned: see try_map_short_period
    } else {
      IO::store_any_order(out + pos, result);
    }
  };
  // Whole periods in pairs half the range apart (paired_periods): two
  // streams through memory (see part_stride). Against one stream, channels_last
  // eval at 2 threads, read from memory, on a 32 MiB-L3 EPYC: fp32
  // 64x32x32x32 631 -> 503 us, 128x32x32x32 1138 -> 1036, 1024x6x28x28 1625 ->
  // 1495, bf16 128x32x32x32 576 -> 506; from the cache (fp32 32x32x32x32)
  // 107 -> 106.
  // Each stream goes a whole number of cache lines at a time, from a line
  // boundary, and the partner is as far into its line: alternating the
  // streams step by step (32 bytes with AVX2) left every output line
  // half-written while the other stream wrote, and with streaming stores
  // that cost more than the second stream gained. On an 8 MiB-L3 EPYC at 2
  // threads, in one process, channels_last eval from memory, step by step ->
  // a line at a time: fp32 1024x16x10x10 884 -> 679 us, 1024x6x28x28 2353 ->
  // 2007, 128x32x32x32 1805 -> 1560, 64x32x32x32 983 -> 901 (one stream:
  // 769, 2343, 1515, 854).
  constexpr int64_t kPeriodBytes = kPeriod * static_cast<int64_t>(sizeof(scalar_t));
  constexpr int64_t kBlock = std::lcm(kPeriodBytes, kCacheLineBytes) / kPeriodBytes;  // periods
  int64_t head = 0;  // periods before the first line boundary (none if there is none)
  while (head < kBlock && reinterpret_cast<uintptr_t>(out + begin + head * kPeriod) % kCacheLineBytes != 0) {
    ++head;
  }
  head = head == kBlock ? 0 : std::min(head, (end - begin) / kPeriod);
  int64_t half = paired_periods<scalar_t>((end - begin) / kPeriod - head, kPeriod);
  half -= half % kBlock;
  if (half > 0 && half * kPeriodBytes % kPageBytes == 0) {  // not a page multiple: see paired_periods
    half -= kBlock;
  }
  if (half > 0 && parts_alias(inputs, out, half * kPeriodBytes)) {
    half = 0;
  }
  const int64_t partner = half * kPeriod;
  int64_t at = begin;
  for (int64_t p = 0; p < head; ++p, at += kPeriod) {
    for (int s = 0; s < KS; ++s) {
      step(at + s * IO::kStep, s);
    }
  }
  for (const int64_t paired_end = at + partner; at < paired_end; at += kBlock * kPeriod) {
    for (int64_t b = 0; b < kBlock * KS; ++b) {
      step(at + b * IO::kStep, static_cast<int>(b % KS));
    }
    for (int64_t b = 0; b < kBlock * KS; ++b) {
      step(at + partner + b * IO::kStep, static_cast<int>(b % KS));
    }
  }
  at += partner;
  for (; at + kPeriod <= end; at += kPeriod) {
    for (int s = 0; s < KS; ++s) {
      step(at + s * IO::kStep, s);
    }
  }
  // The last partial period of the tensor.
  for (int s = 0; at < end; at += IO::kStep, ++s) {
    if (at + IO::kStep <= end) {
      step(at, s);
    } else {
      map_partial_step_any_order<scalar_t, kIn, kParams>(
          in, out, at, end - at,
          [&](int k, aVec (&p)[kParams]) {
            for (int i = 0; i < kParams; ++i) {
              p[i] = prm[s][k][i];
            }
          },
          op);
    }
  }
}

// Steps in the base channels-last period of C channels (the shortest run of
// whole steps after which the channel pattern repeats).
template <typename scalar_t>
int64_t base_period_steps(int64_t C) {
  constexpr int64_t step = VecIO<scalar_t>::kStep;
  return C / std::gcd(C, step);
}

// Runs map_short_period<KS> for KS = `steps` when its parameters fit the
// register budget; returns false when they do not (or steps > 4).
template <typename scalar_t, int kIn, int kParams, typename Op>
bool try_map_short_period(
    int64_t steps, const scalar_t* const (&in)[kIn], scalar_t* out, int64_t begin, int64_t end,
    const at::opmath_type<scalar_t>* const (&periodic_params)[kParams], const Op& op,
    bool stream, bool prefetch) {
  constexpr int kRegsPerStep = VecIO<scalar_t>::kVecs * kParams;
  bool done = false;
  const auto run = [&](auto ks) {
    constexpr int KS = decltype(ks)::value;
    if constexpr (KS * kRegsPerStep <= max_param_registers<scalar_t, kIn>()) {
      // The store kind fixed per walk: a runtime choice per step cost a test
      // and a branch per vector, and the compiler then kept the parameters
      // on the stack (fp32 channels_last 64x6x28x28 eval at 2 threads, from
      // the cache: 69-72 us before, 44 after; NCHW 45-52). Every step is
      // aligned when the first is (a step is kStreamAlign bytes).
      const bool aligned = kStreamAlign != 0 && reinterpret_cast<uintptr_t>(out + begin) % kStreamAlign == 0 &&
                           kStreamAlign == static_cast<int64_t>(VecIO<scalar_t>::kStep * sizeof(scalar_t));
      if (stream && aligned) {
        map_short_period<KS, true, true, scalar_t, kIn, kParams>(in, out, begin, end, periodic_params, op);
      } else if (stream || prefetch) {
        map_short_period<KS, false, true, scalar_t, kIn, kParams>(in, out, begin, end, periodic_params, op);
      } else {
        map_short_period<KS, false, false, scalar_t, kIn, kParams>(in, out, begin, end, periodic_params, op);
      }
      done = true;
    }
  };
  switch (steps) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    default: break;
  }
  return done;
}

// out = op(inputs..., per-channel parameters...) over the whole tensor;
// `params[i]` holds one value per channel.
// Largest period (in values) for walking channels-first images like
// channels-last periods: its per-position parameters (up to 4 arrays) stay
// in L1. Measured against rows: 1.2-12x faster for images of up to 2048
// values (64x16x10x10, 64x32x50, 512x64x2x2), slower on one thread beyond
// (1024x6x20x20, 2400 values: 1.1x).
constexpr int64_t kMaxImagePeriod = 2048;

template <typename scalar_t, int kIn, int kParams, typename Op>
void channel_map(
    const Geometry& g, const scalar_t* const (&in)[kIn], scalar_t* out,
    const at::opmath_type<scalar_t>* const (&params)[kParams], const Op& op) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;

  const bool stream = stream_output<scalar_t>(g, kIn);
  const bool prefetch = prefetch_input<scalar_t>(g, kIn);
  // The channel pattern repeats every `pattern` values: every row of C in
  // channels-last, every image of C * S in channels-first. Small images are
  // walked like channels-last periods (per-position parameters, full vectors
  // across row ends); rows of other channels-first tensors one by one, or
  // as one flat run when short.
  const int64_t pattern = g.channels_last() ? g.C : g.C * g.S;
  const int64_t total = g.numel();
  const int64_t K = channels_last_period<scalar_t>(pattern, total);
  if (!g.channels_last() && (K > kMaxImagePeriod || K % IO::kStep != 0)) {
    const int64_t rows = g.N * g.C;
    // Rows of whole steps need no blending: row by row (fewer live registers).
    const bool flat = g.S < kShortRow && g.S >= IO::kStep && g.S % IO::kStep != 0;
    parallel_items(rows, g.S, [&](int64_t begin, int64_t end) {
      if (flat) {
        map_rows_flat<scalar_t, kIn, kParams>(in, out, begin, end, g, params, op, stream, prefetch);
      } else {
        const auto values_of = [&](int64_t r, acc_t (&values)[kParams]) {
          for (int i = 0; i < kParams; ++i) {
            values[i] = params[i][r % g.C];
          }
        };
        // Rows read from memory go in pairs half the range apart, as
        // channels-last periods do (paired_periods), when the two rows'
        // outputs are aligned alike. NCHW eval at 2 threads, against one
        // row at a time in one process: fp32 32x64x32x32 588 -> 510 us,
        // 32x256x56x56 7337 -> 6703, bf16 32x128x32x32 603 -> 562.
        const int64_t row_bytes = g.S * static_cast<int64_t>(sizeof(scalar_t));
        const int64_t half = prefetch ? paired_periods<scalar_t>(end - begin, g.S) : 0;
        const bool pairs = half > 0 && half * row_bytes % std::max<int64_t>(kStreamAlign, 1) == 0 &&
                           !parts_alias(in, out, half * row_bytes);
        int64_t r = begin;
        for (; pairs && r < begin + half; ++r) {
          const int64_t bases[2] = {r * g.S, (r + half) * g.S};
          acc_t values[2][kParams];
          values_of(r, values[0]);
          values_of(r + half, values[1]);
          map_rows_side_by_side<2>(in, out, bases, g.S, values, op, stream, prefetch);
        }
        if (pairs) {
          r += half;
        }
        for (; r < end; ++r) {
          acc_t values[kParams];
          values_of(r, values);
          map_row<scalar_t, kIn, kParams>(in, out, r * g.S, g.S, values, op, stream, prefetch);
        }
      }
      stream_fence();
    });
    return;
  }

  const int64_t periods = (total + K - 1) / K;
  const int64_t S = g.channels_last() ? 1 : g.S;
  std::vector<std::vector<acc_t>> periodic_params;
  const acc_t* param_ptr[kParams];
  for (int i = 0; i < kParams; ++i) {
    periodic_params.push_back(periodic<acc_t, IO::kStep>(params[i], g.C, K, S));
    IO::to_any_order(periodic_params.back());  // the walks load their steps so
    param_ptr[i] = periodic_params.back().data();
  }
  const int64_t steps = base_period_steps<scalar_t>(pattern);
  parallel_items(periods, K, [&](int64_t begin, int64_t end) {
    if (!try_map_short_period<scalar_t, kIn, kParams>(
            steps, in, out, begin * K, std::min(total, end * K), param_ptr, op, stream, prefetch)) {
      map_periods<scalar_t, kIn, kParams>(in, out, K, total, begin, end, param_ptr, op, stream, prefetch);
    }
    stream_fence();
  });
}

// The elementwise formulas, in the form channel_map / map_row apply them.

// The normalising formula, y = (x - mean) * scale + bias, in one of two
// forms chosen by the type (kNormalizeParams):
//  - float and double: params {mean, scale, bias}; subtracting first keeps
//    inputs with a large offset accurate, unlike x * scale + (bias - mean * scale);
//  - bf16 and fp16: the affine form y = x * scale + shift, params {scale,
//    shift} with shift = bias - mean * scale (normalize_params). One
//    operation and one parameter register fewer per vector, where the 16-bit
//    conversions make the pass compute-bound on AVX2 (and the flat walk had
//    spilled its parameters to the stack). Its extra rounding, about
//    2^-24 |x * scale|, is far below the output's: a 16-bit x that differs
//    from the mean by d has |x| <= 2^8 d (bf16, 2^11 for fp16) unless its
//    own quantisation (2^-8 |x|) exceeds d, so the error stays under
//    2^-13 |d * scale| where the output rounds to 2^-9 (2^-12) of it.
template <typename scalar_t>
constexpr int kNormalizeParams = std::is_same_v<scalar_t, at::opmath_type<scalar_t>> ? 3 : 2;

// The parameters of one channel, in the form kNormalizeParams<scalar_t> takes.
template <typename scalar_t, typename acc_t>
inline void normalize_params(acc_t mean, acc_t scale, acc_t bias, acc_t (&out)[kNormalizeParams<scalar_t>]) {
  if constexpr (kNormalizeParams<scalar_t> == 3) {
    out[0] = mean;
    out[1] = scale;
    out[2] = bias;
  } else {
    out[0] = scale;
    out[1] = static_cast<acc_t>(static_cast<double>(bias) - static_cast<double>(mean) * scale);
  }
}

// The (fused) forward: y = act(normalize(x) [+ residual]); inputs {x[,
// residual]} (kIn = 2 with the residual); params as normalize_params.
template <int kIn, bool kRelu, int kParams>
struct NormalizeAct {
  template <typename V>
  V operator()(const V (&v)[kIn], const V (&p)[kParams]) const {
    V y;
    if constexpr (kParams == 3) {
      y = at::vec::fmadd(v[0] - p[0], p[1], p[2]);
    } else {
      y = at::vec::fmadd(v[0], p[0], p[1]);
    }
    if constexpr (kIn == 2) {
      y = y + v[1];
    }
    if constexpr (kRelu) {
      y = at::vec::clamp_min(y, V(0));
    }
    return y;
  }
};

// The backward's d from its first inputs: dy, or with kMasked {dy, y} and
// d = dy where y > 0 (see masked_grad in statistics.h).
template <bool kMasked>
struct GradFrom {
  static constexpr int kIn = kMasked ? 2 : 1;
  template <typename V, int N>
  static V d(const V (&v)[N]) {
    if constexpr (kMasked) {
      return V::blendv(v[0], V(0), v[1] <= V(0));
    } else {
      return v[0];
    }
  }
};

// Training: dx = (d - mean(d) - (x - mean) * invstd^2 * mean(d * (x - mean))) * invstd * w
// inputs {d's inputs (GradFrom), x}; params {mean, mean(d), invstd^2 * mean(d * (x - mean)), invstd * w}.
template <bool kMasked = false>
struct GradInputTrain {
  static constexpr int kIn = GradFrom<kMasked>::kIn + 1;
  template <typename V>
  V operator()(const V (&v)[kIn], const V (&p)[4]) const {
    return (GradFrom<kMasked>::d(v) - at::vec::fmadd(v[kIn - 1] - p[0], p[2], p[1])) * p[3];
  }
};

// Evaluation: dx = d * invstd * w; inputs {d's inputs}; params {invstd * w}.
template <bool kMasked = false>
struct GradInputEval {
  static constexpr int kIn = GradFrom<kMasked>::kIn;
  template <typename V>
  V operator()(const V (&v)[kIn], const V (&p)[1]) const {
    return GradFrom<kMasked>::d(v) * p[0];
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace fastbn::cpu
