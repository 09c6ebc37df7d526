// SIMT backend: the CUDA built-ins, so that fastbn's CUDA sources compile as
// ordinary C++ and run on the CPU (tests only; never part of a user's build).
//
// Execution model (runtime.cpp): every thread of a block is a fiber with its
// own stack, so __syncthreads() is a real barrier and warp intrinsics really
// exchange values between lanes. A block's fibers run on one OS thread in a
// chosen order (forward, reverse, or shuffled at every barrier); blocks run
// on a small pool of OS threads, and the blocks of a cooperative launch each
// on their own, all resident at once, so grid.sync() is a real grid barrier.
//
// The sources reach this header through the fake <cuda_runtime.h> next to it,
// which the build puts on -I ahead of torch's headers. Launches
// `k<<<grid, block, smem, stream>>>(args)` are rewritten by the build (same
// line, no lines added) into `k ->* ::simt::launch_config(...)(args)`, and
// `__shared__` declarations into references to the block's shared memory.
// __CUDACC__ and __CUDA_ARCH__ stay undefined: torch's headers then take their
// host paths.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------
// Keywords
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// ---------------------------------------------------------------------------
// Types and the runtime API subset the sources use
// ---------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
};

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMaxBlocksPerMultiprocessor = 106,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(
    void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t stream = nullptr);

// No CUDA graphs here: no stream is ever capturing.
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

// Built-in variables: per OS thread, set by the scheduler before it resumes a
// fiber (the switch is an opaque call, so the compiler reloads them).
#define SIMT_TLS thread_local
extern SIMT_TLS uint3 threadIdx;
extern SIMT_TLS uint3 blockIdx;
extern SIMT_TLS dim3 blockDim;
extern SIMT_TLS dim3 gridDim;
constexpr int warpSize = 32;

namespace simt {

// A source position, for barrier-divergence and error reports.
struct Site {
  const char* file;
  int line;
};
#define SIMT_SITE ::simt::Site{__builtin_FILE(), __builtin_LINE()}

namespace detail {

// One kernel launch as the runtime sees it: the kernel as a type-erased
// closure (run(closure) calls the kernel with its copied arguments).
struct Launch {
  const char* name;
  const void* kernel;  // identity of the kernel function, for attributes
  dim3 grid, block;
  size_t dynamic_smem;
  cudaStream_t stream;
  bool cooperative;
  Site site;
  void (*run)(const void* closure);
  const void* closure;
};

// Runs the launch (validating the configuration first); returns the CUDA
// error code, with the detail kept for cudaGetErrorString / the launch check.
cudaError_t launch(const Launch& launch);

// Block-scope synchronisation and warp collectives (runtime.cpp).
void sync_threads(Site site);
int sync_threads_count(int predicate, Site site);
void grid_sync(Site site);
enum class WarpOp { kSync, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAll, kAny };
// Exchanges `value` (up to 8 bytes) among the lanes named in `mask`; returns
// this lane's result: the shuffled value's bytes, or the vote / ballot.
uint64_t warp_collective(
    WarpOp op, unsigned mask, uint64_t value, int arg, int width, Site site);
unsigned active_mask();
void* shared_slot(const void* key, size_t size, size_t align, Site site);
void* dynamic_shared();
[[noreturn]] void device_trap(const char* what, Site site);
void set_static_shared_hint(const void* kernel, size_t bytes);

template <typename Closure>
void run_closure(const void* p) {
  static_cast<const Closure*>(p)->call();
}

template <typename... Params>
struct KernelClosure {
  void (*kernel)(Params...);
  std::tuple<std::decay_t<Params>...> args;
  void call() const {
    // Each thread gets its own copy of the arguments, as from param space.
    std::apply(kernel, args);
  }
};

}  // namespace detail

// `k<<<grid, block, smem, stream>>>(args)` is rewritten to
// `k ->* ::simt::launch_config(name, grid, block, smem, stream)(args)`.
// (`->*` because an overloaded `*` would be found through c10::complex's
// operator templates by argument-dependent lookup on Half/BFloat16 arguments.)
template <typename... Args>
struct BoundLaunch {
  detail::Launch config;
  std::tuple<Args...> args;
};

struct LaunchSyntax {
  detail::Launch config;
  template <typename... Args>
  BoundLaunch<std::decay_t<Args>...> operator()(Args&&... args) const {
    return {config, std::tuple<std::decay_t<Args>...>(std::forward<Args>(args)...)};
  }
};

inline LaunchSyntax launch_config(
    const char* name, Site site, dim3 grid, dim3 block, size_t dynamic_smem = 0,
    cudaStream_t stream = nullptr) {
  return {{name, nullptr, grid, block, dynamic_smem, stream, false, site, nullptr, nullptr}};
}

template <typename... Params, typename... Args>
void operator->*(void (*kernel)(Params...), BoundLaunch<Args...>&& bound) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  detail::KernelClosure<Params...> closure{
      kernel, std::apply(
                  [](auto&... a) { return std::tuple<std::decay_t<Params>...>(a...); }, bound.args)};
  detail::Launch launch = bound.config;
  launch.kernel = reinterpret_cast<const void*>(kernel);
  launch.run = &detail::run_closure<detail::KernelClosure<Params...>>;
  launch.closure = &closure;
  detail::launch(launch);  // the error, if any, is left for cudaGetLastError()
}

// `__shared__ T name[dims];` is rewritten to
// `T (&name)[dims] = ::simt::shared_var<T[dims]>([]{}, SIMT_SITE);`: the
// lambda's type is unique to the declaration, so its static key is too.
// Every thread of a block gets the same storage, filled with 0xFF bytes (NaN
// in every float type) when the block first reaches the declaration.
template <typename T, typename Tag>
T& shared_var(Tag, Site site) {
  static const char key = 0;
  return *static_cast<T*>(detail::shared_slot(&key, sizeof(T), alignof(T), site));
}

// `extern __shared__ T name[];` is rewritten to
// `T* name = ::simt::dynamic_shared<T>();` (the launch's dynamic bytes,
// filled with 0xFF at block start).
template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(detail::dynamic_shared());
}

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace simt

// ---------------------------------------------------------------------------
// Device built-ins
// ---------------------------------------------------------------------------
#define __syncthreads() ::simt::detail::sync_threads(SIMT_SITE)
#define __syncthreads_count(p) ::simt::detail::sync_threads_count((p) ? 1 : 0, SIMT_SITE)
#define __syncthreads_and(p) (::simt::detail::sync_threads_count((p) ? 1 : 0, SIMT_SITE) == \
                              static_cast<int>(blockDim.x * blockDim.y * blockDim.z))
#define __syncthreads_or(p) (::simt::detail::sync_threads_count((p) ? 1 : 0, SIMT_SITE) != 0)
#define __syncwarp(...) ::simt::syncwarp(SIMT_SITE, ##__VA_ARGS__)
#define __trap() ::simt::detail::device_trap("__trap()", SIMT_SITE)

namespace simt {
inline void syncwarp(Site site, unsigned mask = 0xffffffffu) {
  detail::warp_collective(detail::WarpOp::kSync, mask, 0, 0, 32, site);
}
template <typename T>
T shfl(detail::WarpOp op, unsigned mask, T v, int arg, int width, Site site) {
  return from_bits<T>(detail::warp_collective(op, mask, to_bits(v), arg, width, site));
}
}  // namespace simt

#define __shfl_sync(mask, v, src, ...) \
  ::simt::shfl(::simt::detail::WarpOp::kShfl, (mask), (v), (src), ::simt::width_or_32(__VA_ARGS__), SIMT_SITE)
#define __shfl_up_sync(mask, v, d, ...) \
  ::simt::shfl(::simt::detail::WarpOp::kShflUp, (mask), (v), (d), ::simt::width_or_32(__VA_ARGS__), SIMT_SITE)
#define __shfl_down_sync(mask, v, d, ...) \
  ::simt::shfl(::simt::detail::WarpOp::kShflDown, (mask), (v), (d), ::simt::width_or_32(__VA_ARGS__), SIMT_SITE)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::simt::shfl(::simt::detail::WarpOp::kShflXor, (mask), (v), (m), ::simt::width_or_32(__VA_ARGS__), SIMT_SITE)
#define __ballot_sync(mask, p) \
  static_cast<unsigned>(::simt::detail::warp_collective(::simt::detail::WarpOp::kBallot, (mask), (p) ? 1 : 0, 0, 32, SIMT_SITE))
#define __all_sync(mask, p) \
  static_cast<int>(::simt::detail::warp_collective(::simt::detail::WarpOp::kAll, (mask), (p) ? 1 : 0, 0, 32, SIMT_SITE))
#define __any_sync(mask, p) \
  static_cast<int>(::simt::detail::warp_collective(::simt::detail::WarpOp::kAny, (mask), (p) ? 1 : 0, 0, 32, SIMT_SITE))
#define __activemask() ::simt::detail::active_mask()

namespace simt {
constexpr int width_or_32() { return 32; }
constexpr int width_or_32(int width) { return width; }
}  // namespace simt

// Math. The GPU's rsqrtf is approximate; here it is the correctly rounded
// 1/sqrt, so results may differ from a GPU's in the last bits.
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float v) { return 1.0f / v; }
inline float __fsqrt_rn(float v) { return std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __saturatef(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace simt {
template <typename Bits, typename T>
Bits to_bits_exact(T v) {
  Bits b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}
template <typename T, typename Bits>
T from_bits_exact(Bits b) {
  T v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}
}  // namespace simt

// Atomics: real atomics (blocks run on several OS threads), on global and
// shared memory alike. Floating-point ones are compare-and-swap loops.
namespace simt {
template <typename T, typename F>
T atomic_update(T* address, F f) {
  if constexpr (std::is_integral_v<T>) {
    T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (!__atomic_compare_exchange_n(address, &old, f(old), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
  } else {
    using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
    static_assert(sizeof(T) == sizeof(Bits), "atomics on 4- and 8-byte values");
    Bits* bits = reinterpret_cast<Bits*>(address);
    Bits old = __atomic_load_n(bits, __ATOMIC_SEQ_CST);
    while (true) {
      const Bits updated = to_bits_exact<Bits>(f(from_bits_exact<T>(old)));
      if (__atomic_compare_exchange_n(bits, &old, updated, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        return from_bits_exact<T>(old);
      }
    }
  }
}
}  // namespace simt

template <typename T>
T atomicAdd(T* address, T value) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
  } else {
    return ::simt::atomic_update(address, [value](T old) { return old + value; });
  }
}
template <typename T>
T atomicSub(T* address, T value) { return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST); }
template <typename T>
T atomicExch(T* address, T value) {
  return ::simt::atomic_update(address, [value](T) { return value; });
}
template <typename T>
T atomicMax(T* address, T value) {
  return ::simt::atomic_update(address, [value](T old) { return old < value ? value : old; });
}
template <typename T>
T atomicMin(T* address, T value) {
  return ::simt::atomic_update(address, [value](T old) { return value < old ? value : old; });
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  return ::simt::atomic_update(address, [limit](unsigned old) { return old >= limit ? 0u : old + 1; });
}
inline unsigned atomicDec(unsigned* address, unsigned limit) {
  return ::simt::atomic_update(
      address, [limit](unsigned old) { return (old == 0 || old > limit) ? limit : old - 1; });
}
template <typename T>
T atomicAnd(T* address, T value) { return __atomic_fetch_and(address, value, __ATOMIC_SEQ_CST); }
template <typename T>
T atomicOr(T* address, T value) { return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST); }

// Occupancy and cooperative launches.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(
    int* blocks, const void* kernel, int block_size, size_t dynamic_smem);
template <typename... Params>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(
    int* blocks, void (*kernel)(Params...), int block_size, size_t dynamic_smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      blocks, reinterpret_cast<const void*>(kernel), block_size, dynamic_smem);
}
cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value);
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

namespace simt::detail {
template <typename... Params, size_t... I>
std::tuple<std::decay_t<Params>...> unpack_args(void** args, std::index_sequence<I...>) {
  return std::tuple<std::decay_t<Params>...>(*static_cast<std::decay_t<Params>*>(args[I])...);
}
}  // namespace simt::detail

// cudaLaunchCooperativeKernel: every block resident at once (checked against
// the occupancy at the emulated SM count), grid.sync() allowed. The build
// rewrites `cudaLaunchCooperativeKernel(k, ...)` to
// `::simt::cooperative_launch("k", SIMT_SITE, k, ...)` for the launch record.
namespace simt {
template <typename... Params>
cudaError_t cooperative_launch(
    const char* name, Site site, void (*kernel)(Params...), dim3 grid, dim3 block, void** args,
    size_t dynamic_smem = 0, cudaStream_t stream = nullptr) {
  detail::KernelClosure<Params...> closure{
      kernel, detail::unpack_args<Params...>(args, std::index_sequence_for<Params...>{})};
  detail::Launch launch{
      name, reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem, stream, true, site,
      &detail::run_closure<detail::KernelClosure<Params...>>, &closure};
  return detail::launch(launch);
}
}  // namespace simt

template <typename... Params>
cudaError_t cudaLaunchCooperativeKernel(
    void (*kernel)(Params...), dim3 grid, dim3 block, void** args, size_t dynamic_smem = 0,
    cudaStream_t stream = nullptr) {
  return ::simt::cooperative_launch(
      "cooperative kernel", SIMT_SITE, kernel, grid, block, args, dynamic_smem, stream);
}
