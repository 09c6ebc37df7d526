// SIMT backend runtime: fibers, the block scheduler, warp collectives,
// shared memory, launches and their validation and record.
#include "api.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

SIMT_TLS uint3 threadIdx;
SIMT_TLS uint3 blockIdx;
SIMT_TLS dim3 blockDim;
SIMT_TLS dim3 gridDim;

namespace simt {

// Limits of an sm_90 device (H100/H200).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned long long kMaxGridDim[3] = {2147483647ull, 65535ull, 65535ull};
constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr size_t kDefaultDynamicSharedLimit = 48 * 1024;
constexpr size_t kSharedPerBlockOptin = 227 * 1024;
constexpr size_t kSharedPerSM = 228 * 1024;
constexpr size_t kSharedReservedPerBlock = 1024;
constexpr int kMaxThreadsPerSM = 2048;
constexpr int kMaxBlocksPerSM = 32;
constexpr size_t kFiberStackBytes = 64 * 1024;

Config& config() {
  static Config c = [] {
    Config init;
    if (const char* sms = std::getenv("FASTBN_SIMT_SMS")) init.sm_count = std::max(1, std::atoi(sms));
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    init.workers = static_cast<int>(std::min(hw, 4u));
    if (const char* w = std::getenv("FASTBN_SIMT_WORKERS")) init.workers = std::max(1, std::atoi(w));
    return init;
  }();
  return c;
}

namespace {

std::string site_string(Site s) {
  std::ostringstream os;
  const char* slash = std::strrchr(s.file, '/');
  os << (slash ? slash + 1 : s.file) << ":" << s.line;
  return os.str();
}

std::string dim_string(dim3 d) {
  std::ostringstream os;
  os << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return os.str();
}

// ---------------------------------------------------------------------------
// Errors (per host thread, like CUDA's)
// ---------------------------------------------------------------------------
thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_error_text;
thread_local std::string error_string_buffer;

cudaError_t fail(cudaError_t code, const std::string& text) {
  if (last_error == cudaSuccess) {
    last_error = code;
    last_error_text = text;
  }
  return code;
}

const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
  }
  return "unknown error";
}

// ---------------------------------------------------------------------------
// Launch record
// ---------------------------------------------------------------------------
std::mutex records_mutex;
std::vector<LaunchRecord> records;

// ---------------------------------------------------------------------------
// Context switch. x86-64: callee-saved registers on the stack, then swap
// stack pointers (a few nanoseconds, no system call). The floating-point
// control registers are not switched: kernels never change them, and saving
// them made each switch several times slower. Elsewhere: ucontext.
// ---------------------------------------------------------------------------
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
extern "C" void fastbn_simt_switch(Context* from, Context* to);
extern "C" void fastbn_simt_fiber_start();
asm(R"(
.text
.p2align 4
.globl fastbn_simt_switch
.hidden fastbn_simt_switch
.type fastbn_simt_switch,@function
fastbn_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq (%rsi), %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size fastbn_simt_switch, .-fastbn_simt_switch
.p2align 4
.globl fastbn_simt_fiber_start
.hidden fastbn_simt_fiber_start
.type fastbn_simt_fiber_start,@function
fastbn_simt_fiber_start:
  movq %r12, %rdi
  subq $8, %rsp
  callq *%r13
  ud2
.size fastbn_simt_fiber_start, .-fastbn_simt_fiber_start
)");

void switch_context(Context* from, Context* to) { fastbn_simt_switch(from, to); }

void init_context(Context* ctx, void* stack_top, void (*entry)(void*), void* arg) {
  // Frame popped by fastbn_simt_switch: [r15][r14][r13][r12][rbx][rbp]
  // [return address]; the return address slot is 16-byte aligned so the
  // entry sees the stack as right after a call.
  auto top = reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 16 - 6 * 8);
  frame[0] = 0;                                          // r15
  frame[1] = 0;                                          // r14
  frame[2] = reinterpret_cast<uint64_t>(entry);          // r13
  frame[3] = reinterpret_cast<uint64_t>(arg);            // r12
  frame[4] = 0;                                          // rbx
  frame[5] = 0;                                          // rbp
  frame[6] = reinterpret_cast<uint64_t>(&fastbn_simt_fiber_start);
  ctx->sp = frame;
}
#else
}  // namespace
}  // namespace simt
#include <ucontext.h>
namespace simt {
namespace {
struct Context {
  ucontext_t uc;
};
void switch_context(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
void init_context(Context* ctx, void* stack_top, void (*entry)(void*), void* arg) {
  getcontext(&ctx->uc);
  ctx->uc.uc_stack.ss_sp = static_cast<char*>(stack_top) - kFiberStackBytes;
  ctx->uc.uc_stack.ss_size = kFiberStackBytes;
  ctx->uc.uc_link = nullptr;
  makecontext(&ctx->uc, reinterpret_cast<void (*)()>(entry), 1, arg);
}
#endif

// ---------------------------------------------------------------------------
// Fibers and the block scheduler
// ---------------------------------------------------------------------------
enum class State { kRunnable, kBarrier, kWarp, kGrid, kExited };

struct Fiber {
  Context ctx;
  void* stack = nullptr;  // lowest usable address; a no-access page lies below
  int linear = 0;
  uint3 idx{0, 0, 0};
  State state = State::kExited;
  Site wait_site{"", 0};
  int predicate = 0;
};

struct WarpState {
  unsigned arrived = 0;
  unsigned expected = 0;
  detail::WarpOp op = detail::WarpOp::kSync;
  Site site{"", 0};
  int width = 32;
  uint64_t values[32] = {};
  int args[32] = {};
  uint64_t results[32] = {};
};

// Grid barrier of a cooperative launch: its blocks run on their own OS
// threads. A block that errs or exits while others wait breaks it, so no
// block waits forever.
struct GridBarrier {
  std::mutex m;
  std::condition_variable cv;
  int total = 0;
  int arrived = 0;
  int exited = 0;
  uint64_t generation = 0;
  bool broken = false;

  bool arrive() {
    std::unique_lock<std::mutex> lock(m);
    if (broken) return false;
    const uint64_t gen = generation;
    if (++arrived + exited == total) {
      if (exited > 0) {
        broken = true;
        cv.notify_all();
        return false;
      }
      arrived = 0;
      ++generation;
      cv.notify_all();
      return true;
    }
    cv.wait(lock, [&] { return generation != gen || broken; });
    return !broken;
  }
  void block_done() {
    std::lock_guard<std::mutex> lock(m);
    ++exited;
    if (arrived > 0 && arrived + exited == total) {
      broken = true;
      cv.notify_all();
    }
  }
  void break_all() {
    std::lock_guard<std::mutex> lock(m);
    broken = true;
    cv.notify_all();
  }
};

// What all blocks of one launch share.
struct LaunchState {
  const detail::Launch* launch = nullptr;
  std::atomic<uint64_t> next_block{0};
  uint64_t total_blocks = 0;
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
  GridBarrier grid;
  std::atomic<size_t> static_shared{0};

  void report(const std::string& what) {
    {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (error.empty()) error = what;
    }
    failed.store(true);
    grid.break_all();
  }
};

void fiber_entry(void* arg);

// One per OS thread that runs blocks.
class BlockRunner {
 public:
  ~BlockRunner() {
    for (Fiber& f : fibers_) {
      if (f.stack) munmap(static_cast<char*>(f.stack) - page_size(), kFiberStackBytes + page_size());
    }
  }

  void run_block(LaunchState& ls, uint64_t linear_block);

  // Called from fibers.
  void wait(State s, Site site);
  [[noreturn]] void abort_block(const std::string& what);
  void sync_threads(Site site);
  int sync_threads_count(int predicate, Site site);
  void grid_sync(Site site);
  uint64_t warp_collective(detail::WarpOp op, unsigned mask, uint64_t value, int arg, int width, Site site);
  unsigned active_mask();
  void* shared_slot(const void* key, size_t size, size_t align, Site site);
  void* dynamic_shared() { return arena_.data() + kStaticSharedLimit; }
  void fiber_finished() {
    current_->state = State::kExited;
    --runnable_;
    ++exited_;
    switch_context(&current_->ctx, &scheduler_);
  }
  void run_kernel() { state_->launch->run(state_->launch->closure); }
  std::string where() const {
    std::ostringstream os;
    os << "kernel " << state_->launch->name << ", block " << dim_string(dim3(blockIdx.x, blockIdx.y, blockIdx.z))
       << ", thread " << dim_string(dim3(threadIdx.x, threadIdx.y, threadIdx.z));
    return os.str();
  }

 private:
  static size_t page_size() {
    static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
  }
  void ensure_fibers(int n);
  void make_order(uint64_t barrier_round);
  void make_runnable(Fiber& f);
  std::string describe_waits() const;

  std::vector<Fiber> fibers_;
  std::vector<int> order_;
  Schedule order_schedule_ = Schedule::kForward;
  Context scheduler_;
  Fiber* current_ = nullptr;
  LaunchState* state_ = nullptr;
  int nthreads_ = 0;
  uint64_t block_linear_ = 0;
  WarpState warps_[kMaxThreadsPerBlock / 32];
  std::vector<unsigned char> arena_ = std::vector<unsigned char>(kStaticSharedLimit + kSharedPerBlockOptin + 64);
  size_t static_used_ = 0;
  std::vector<std::pair<const void*, size_t>> slots_;
  int barrier_result_ = 0;
  // Kept as the fibers change state, so a barrier round costs no scans.
  int runnable_ = 0;
  int exited_ = 0;
  int waiting_ = 0;         // at __syncthreads or grid.sync
  int predicate_sum_ = 0;   // for __syncthreads_count
  bool waits_differ_ = false;
  State wait_kind_ = State::kBarrier;
  Site wait_site_{"", 0};
  bool aborted_ = false;
  std::string abort_reason_;
};

thread_local BlockRunner* tl_runner = nullptr;

BlockRunner& runner() {
  if (tl_runner == nullptr) {
    std::fprintf(stderr, "simt: a device built-in was called outside a kernel\n");
    std::abort();
  }
  return *tl_runner;
}

void fiber_entry(void* arg) {
  auto* runner_ptr = static_cast<BlockRunner*>(arg);
  try {
    runner_ptr->run_kernel();
  } catch (const std::exception& e) {
    runner_ptr->abort_block(std::string("exception in device code: ") + e.what());
  } catch (...) {
    runner_ptr->abort_block("unknown exception in device code");
  }
  runner_ptr->fiber_finished();
  __builtin_unreachable();
}

void BlockRunner::ensure_fibers(int n) {
  if (static_cast<int>(fibers_.size()) >= n) return;
  const size_t page = page_size();
  const size_t old = fibers_.size();
  fibers_.resize(n);
  for (size_t i = old; i < fibers_.size(); ++i) {
    void* mem = mmap(nullptr, kFiberStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "simt: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(mem, page, PROT_NONE);  // stack overflow faults instead of corrupting
    fibers_[i].stack = static_cast<char*>(mem) + page;
  }
}

void BlockRunner::make_order(uint64_t barrier_round) {
  order_.resize(nthreads_);
  std::iota(order_.begin(), order_.end(), 0);
  switch (config().schedule) {
    case Schedule::kForward:
      break;
    case Schedule::kReverse:
      std::reverse(order_.begin(), order_.end());
      break;
    case Schedule::kShuffle: {
      std::mt19937_64 rng(config().seed * 0x9E3779B97F4A7C15ull ^ (block_linear_ << 20) ^ barrier_round);
      std::shuffle(order_.begin(), order_.end(), rng);
      break;
    }
  }
}

void BlockRunner::wait(State s, Site site) {
  Fiber& f = *current_;
  f.state = s;
  f.wait_site = site;
  --runnable_;
  if (s != State::kWarp) {
    if (waiting_++ == 0) {
      wait_kind_ = s;
      wait_site_ = site;
    } else if (s != wait_kind_ || site.line != wait_site_.line ||
               (site.file != wait_site_.file && std::strcmp(site.file, wait_site_.file) != 0)) {
      waits_differ_ = true;
    }
    predicate_sum_ += f.predicate;
  }
  switch_context(&f.ctx, &scheduler_);
}

void BlockRunner::make_runnable(Fiber& f) {
  f.state = State::kRunnable;
  ++runnable_;
}

void BlockRunner::abort_block(const std::string& what) {
  if (!aborted_) {
    aborted_ = true;
    abort_reason_ = what + " (" + where() + ")";
  }
  current_->state = State::kExited;
  --runnable_;
  ++exited_;
  switch_context(&current_->ctx, &scheduler_);
  __builtin_unreachable();
}

std::string BlockRunner::describe_waits() const {
  std::map<std::string, int> groups;
  for (int t = 0; t < nthreads_; ++t) {
    const Fiber& f = fibers_[t];
    switch (f.state) {
      case State::kExited: groups["exited"]++; break;
      case State::kBarrier: groups["at __syncthreads " + site_string(f.wait_site)]++; break;
      case State::kGrid: groups["at grid.sync " + site_string(f.wait_site)]++; break;
      case State::kWarp: groups["in a warp collective at " + site_string(f.wait_site)]++; break;
      case State::kRunnable: groups["runnable"]++; break;
    }
  }
  std::ostringstream os;
  bool first = true;
  for (const auto& [what, count] : groups) {
    os << (first ? "" : ", ") << count << " " << what;
    first = false;
  }
  return os.str();
}

void BlockRunner::run_block(LaunchState& ls, uint64_t linear_block) {
  const detail::Launch& L = *ls.launch;
  state_ = &ls;
  block_linear_ = linear_block;
  nthreads_ = static_cast<int>(L.block.x * L.block.y * L.block.z);
  aborted_ = false;
  abort_reason_.clear();
  blockDim = L.block;
  gridDim = L.grid;
  blockIdx.x = static_cast<unsigned>(linear_block % L.grid.x);
  blockIdx.y = static_cast<unsigned>((linear_block / L.grid.x) % L.grid.y);
  blockIdx.z = static_cast<unsigned>(linear_block / (static_cast<uint64_t>(L.grid.x) * L.grid.y));
  static_used_ = 0;
  slots_.clear();
  std::memset(arena_.data() + kStaticSharedLimit, 0xFF, L.dynamic_smem);
  for (WarpState& w : warps_) w.arrived = 0;
  ensure_fibers(nthreads_);
  for (int t = 0; t < nthreads_; ++t) {
    Fiber& f = fibers_[t];
    f.linear = t;
    f.idx = uint3{t % L.block.x, (t / L.block.x) % L.block.y, t / (L.block.x * L.block.y)};
    f.state = State::kRunnable;
    init_context(&f.ctx, static_cast<char*>(f.stack) + kFiberStackBytes, &fiber_entry, this);
  }
  runnable_ = nthreads_;
  exited_ = 0;
  waiting_ = 0;
  predicate_sum_ = 0;
  waits_differ_ = false;
  BlockRunner* previous = tl_runner;
  tl_runner = this;
  uint64_t round = 0;
  const Schedule schedule = config().schedule;
  if (schedule == Schedule::kShuffle || order_.size() != static_cast<size_t>(nthreads_) ||
      order_schedule_ != schedule) {
    make_order(round);
    order_schedule_ = schedule;
  }
  while (!aborted_) {
    if (runnable_ > 0) {
      for (int t : order_) {
        Fiber& f = fibers_[t];
        if (f.state != State::kRunnable) continue;
        current_ = &f;
        threadIdx = f.idx;
        switch_context(&scheduler_, &f.ctx);
        if (aborted_) break;
      }
      continue;
    }
    // Nobody can run: every live thread waits, or all have exited.
    if (exited_ == nthreads_) break;
    if (waiting_ != nthreads_ || waits_differ_) {
      aborted_ = true;
      std::ostringstream os;
      os << "barrier divergence or deadlock in kernel " << L.name << ", block "
         << dim_string(dim3(blockIdx.x, blockIdx.y, blockIdx.z)) << " of " << nthreads_
         << " threads: " << describe_waits()
         << " (every thread of a block must reach the same __syncthreads / grid.sync, and every "
            "lane named in a warp intrinsic's mask must call it)";
      abort_reason_ = os.str();
      break;
    }
    if (wait_kind_ == State::kGrid) {
      if (!ls.launch->cooperative) {
        aborted_ = true;
        abort_reason_ = std::string("grid.sync() in kernel ") + L.name +
            ", which was not launched with cudaLaunchCooperativeKernel";
        break;
      }
      if (!ls.grid.arrive()) {
        aborted_ = true;
        abort_reason_ = std::string("grid.sync() in kernel ") + L.name +
            " was not reached by every block (a block exited or failed first)";
        break;
      }
    }
    barrier_result_ = predicate_sum_;
    predicate_sum_ = 0;
    waiting_ = 0;
    for (int t = 0; t < nthreads_; ++t) fibers_[t].state = State::kRunnable;
    runnable_ = nthreads_;
    if (config().schedule == Schedule::kShuffle) make_order(++round);
  }
  tl_runner = previous;
  ls.static_shared.store(std::max(ls.static_shared.load(), static_used_));
  if (L.cooperative) ls.grid.block_done();
  if (aborted_) ls.report(abort_reason_);
}

void BlockRunner::sync_threads(Site site) {
  current_->predicate = 0;
  wait(State::kBarrier, site);
}

int BlockRunner::sync_threads_count(int predicate, Site site) {
  current_->predicate = predicate;
  wait(State::kBarrier, site);
  return barrier_result_;
}

void BlockRunner::grid_sync(Site site) {
  current_->predicate = 0;
  wait(State::kGrid, site);
}

unsigned BlockRunner::active_mask() {
  const int warp = current_->linear / 32;
  unsigned mask = 0;
  for (int lane = 0; lane < 32 && warp * 32 + lane < nthreads_; ++lane) {
    if (fibers_[warp * 32 + lane].state != State::kExited) mask |= 1u << lane;
  }
  return mask;
}

const char* warp_op_name(detail::WarpOp op) {
  switch (op) {
    case detail::WarpOp::kSync: return "__syncwarp";
    case detail::WarpOp::kShfl: return "__shfl_sync";
    case detail::WarpOp::kShflUp: return "__shfl_up_sync";
    case detail::WarpOp::kShflDown: return "__shfl_down_sync";
    case detail::WarpOp::kShflXor: return "__shfl_xor_sync";
    case detail::WarpOp::kBallot: return "__ballot_sync";
    case detail::WarpOp::kAll: return "__all_sync";
    case detail::WarpOp::kAny: return "__any_sync";
  }
  return "?";
}

uint64_t BlockRunner::warp_collective(
    detail::WarpOp op, unsigned mask, uint64_t value, int arg, int width, Site site) {
  const int lane = current_->linear % 32;
  const int warp = current_->linear / 32;
  const int lanes_in_warp = std::min(32, nthreads_ - warp * 32);
  const unsigned existing = lanes_in_warp == 32 ? 0xffffffffu : ((1u << lanes_in_warp) - 1);
  std::ostringstream err;
  if (!(mask >> lane & 1u)) {
    err << warp_op_name(op) << " at " << site_string(site) << ": lane " << lane
        << " calls it with mask 0x" << std::hex << mask << ", which does not name the lane itself";
    abort_block(err.str());
  }
  if (mask & ~existing) {
    err << warp_op_name(op) << " at " << site_string(site) << ": mask 0x" << std::hex << mask
        << " names lanes this warp does not have (block of " << std::dec << nthreads_ << " threads)";
    abort_block(err.str());
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    err << warp_op_name(op) << " at " << site_string(site) << ": width " << width
        << " is not a power of two up to 32";
    abort_block(err.str());
  }
  WarpState& w = warps_[warp];
  if (w.arrived == 0) {
    w.expected = mask;
    w.op = op;
    w.site = site;
    w.width = width;
  } else if (w.expected != mask || w.op != op || w.width != width) {
    err << "lanes of warp " << warp << " disagree: " << warp_op_name(w.op) << " at "
        << site_string(w.site) << " with mask 0x" << std::hex << w.expected << std::dec
        << " against " << warp_op_name(op) << " at " << site_string(site) << " with mask 0x"
        << std::hex << mask;
    abort_block(err.str());
  }
  w.values[lane] = value;
  w.args[lane] = arg;
  w.arrived |= 1u << lane;
  if (w.arrived != w.expected) {
    wait(State::kWarp, site);
    return w.results[lane];
  }
  // The last lane to arrive computes every lane's result.
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && w.values[l] != 0) ballot |= 1u << l;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const int segment = l & ~(w.width - 1);
    const int in_segment = l - segment;
    int src = l;
    switch (op) {
      case detail::WarpOp::kShfl: src = segment + (((w.args[l] % w.width) + w.width) % w.width); break;
      case detail::WarpOp::kShflUp: src = in_segment >= w.args[l] ? l - w.args[l] : l; break;
      case detail::WarpOp::kShflDown: src = in_segment + w.args[l] < w.width ? l + w.args[l] : l; break;
      case detail::WarpOp::kShflXor: {
        const int x = l ^ w.args[l];
        src = (x >= 32 || (x & ~(w.width - 1)) > segment) ? l : x;
        break;
      }
      default: break;
    }
    if (!(mask >> src & 1u)) {
      err << warp_op_name(op) << " at " << site_string(site) << ": lane " << l
          << " reads lane " << src << ", which is not in the mask 0x" << std::hex << mask;
      w.arrived = 0;
      abort_block(err.str());
    }
    switch (op) {
      case detail::WarpOp::kBallot: w.results[l] = ballot; break;
      case detail::WarpOp::kAll: w.results[l] = ballot == mask ? 1 : 0; break;
      case detail::WarpOp::kAny: w.results[l] = ballot != 0 ? 1 : 0; break;
      case detail::WarpOp::kSync: w.results[l] = 0; break;
      default: w.results[l] = w.values[src]; break;
    }
  }
  w.arrived = 0;
  for (int l = 0; l < 32; ++l) {
    if ((mask >> l & 1u) && l != lane) make_runnable(fibers_[warp * 32 + l]);
  }
  return w.results[lane];
}

void* BlockRunner::shared_slot(const void* key, size_t size, size_t align, Site site) {
  for (const auto& [k, offset] : slots_) {
    if (k == key) return arena_.data() + offset;
  }
  align = std::max<size_t>(align, 16);
  const size_t offset = (static_used_ + align - 1) / align * align;
  if (offset + size > kStaticSharedLimit ||
      offset + size + state_->launch->dynamic_smem > kSharedPerBlockOptin) {
    std::ostringstream os;
    os << "__shared__ declaration at " << site_string(site) << " brings the block's shared memory to "
       << offset + size << " static + " << state_->launch->dynamic_smem
       << " dynamic bytes; sm_90 allows 48 KiB static and 227 KiB in all";
    abort_block(os.str());
  }
  std::memset(arena_.data() + offset, 0xFF, size);  // unwritten shared memory reads as NaN
  slots_.emplace_back(key, offset);
  static_used_ = offset + size;
  return arena_.data() + offset;
}

// ---------------------------------------------------------------------------
// Worker pool for ordinary launches
// ---------------------------------------------------------------------------
class Pool {
 public:
  // Runs fn on the calling thread and on `helpers` pool threads; returns when all are done.
  void run(int helpers, const std::function<void()>& fn) {
    std::lock_guard<std::mutex> one_launch_at_a_time(run_mutex_);
    {
      std::unique_lock<std::mutex> lock(m_);
      while (static_cast<int>(threads_.size()) < helpers) {
        const int index = static_cast<int>(threads_.size());
        threads_.emplace_back([this, index] { loop(index); });
        threads_.back().detach();
      }
      job_ = &fn;
      active_ = helpers;
      remaining_ = helpers;
      ++generation_;
    }
    cv_.notify_all();
    fn();
    std::unique_lock<std::mutex> lock(m_);
    done_cv_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int index) {
    uint64_t seen = 0;
    while (true) {
      const std::function<void()>* job;
      {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= active_) continue;
        job = job_;
      }
      (*job)();
      std::lock_guard<std::mutex> lock(m_);
      if (--remaining_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex run_mutex_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void()>* job_ = nullptr;
  int active_ = 0;
  int remaining_ = 0;
  uint64_t generation_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: its threads outlive static destruction
  return *p;
}

BlockRunner& thread_runner() {
  thread_local BlockRunner r;
  return r;
}

std::mutex attributes_mutex;
std::map<const void*, int> max_dynamic_smem;     // cudaFuncAttributeMaxDynamicSharedMemorySize
std::map<const void*, size_t> known_static_smem;  // from earlier launches

int occupancy(const void* kernel, int block_size, size_t dynamic_smem) {
  size_t static_smem = 0;
  {
    std::lock_guard<std::mutex> lock(attributes_mutex);
    auto it = known_static_smem.find(kernel);
    if (it != known_static_smem.end()) static_smem = it->second;
  }
  int blocks = std::min(kMaxBlocksPerSM, kMaxThreadsPerSM / std::max(1, block_size));
  const size_t per_block = static_smem + dynamic_smem + kSharedReservedPerBlock;
  blocks = std::min<int>(blocks, static_cast<int>(kSharedPerSM / per_block));
  return std::max(0, blocks);
}

std::string validate(const detail::Launch& L) {
  std::ostringstream os;
  const unsigned block[3] = {L.block.x, L.block.y, L.block.z};
  const unsigned long long grid[3] = {L.grid.x, L.grid.y, L.grid.z};
  const char* axis = "xyz";
  for (int d = 0; d < 3; ++d) {
    if (block[d] == 0 || block[d] > kMaxBlockDim[d]) {
      os << "blockDim." << axis[d] << " = " << block[d] << " is outside 1.." << kMaxBlockDim[d];
      return os.str();
    }
    if (grid[d] == 0 || grid[d] > kMaxGridDim[d]) {
      os << "gridDim." << axis[d] << " = " << grid[d] << " is outside 1.." << kMaxGridDim[d];
      return os.str();
    }
  }
  const unsigned long long threads = 1ull * L.block.x * L.block.y * L.block.z;
  if (threads > kMaxThreadsPerBlock) {
    os << "block of " << threads << " threads exceeds " << kMaxThreadsPerBlock;
    return os.str();
  }
  size_t smem_limit = kDefaultDynamicSharedLimit;
  {
    std::lock_guard<std::mutex> lock(attributes_mutex);
    auto it = max_dynamic_smem.find(L.kernel);
    if (it != max_dynamic_smem.end()) smem_limit = static_cast<size_t>(it->second);
  }
  if (L.dynamic_smem > smem_limit) {
    os << "dynamic shared memory of " << L.dynamic_smem << " bytes exceeds the kernel's limit of "
       << smem_limit << " (raise it with cudaFuncSetAttribute(MaxDynamicSharedMemorySize), up to "
       << kSharedPerBlockOptin << " on sm_90)";
    return os.str();
  }
  return "";
}

}  // namespace

std::string take_unchecked_error() {
  if (last_error == cudaSuccess) return "";
  last_error = cudaSuccess;
  return last_error_text;
}

std::vector<LaunchRecord> take_launch_records() {
  std::lock_guard<std::mutex> lock(records_mutex);
  std::vector<LaunchRecord> out;
  out.swap(records);
  return out;
}

// Post-launch hook: the guarded allocator's check (guarded_allocator.cpp).
std::string check_guards();

namespace detail {

cudaError_t launch(const Launch& L) {
  LaunchRecord record{L.name, L.grid, L.block, L.dynamic_smem, L.cooperative, ""};
  auto finish = [&](cudaError_t code, const std::string& what) {
    std::string message;
    if (code != cudaSuccess) {
      message = std::string(error_name(code)) + ": " + what + " (kernel " + L.name + ", grid " +
          dim_string(L.grid) + ", block " + dim_string(L.block) + ", launched at " +
          site_string(L.site) + ")";
      fail(code, message);
    }
    record.error = message;
    std::lock_guard<std::mutex> lock(records_mutex);
    records.push_back(record);
    return code;
  };
  const std::string invalid = validate(L);
  if (!invalid.empty()) return finish(cudaErrorInvalidConfiguration, invalid);

  LaunchState ls;
  ls.launch = &L;
  ls.total_blocks = 1ull * L.grid.x * L.grid.y * L.grid.z;
  const int threads = static_cast<int>(L.block.x * L.block.y * L.block.z);
  if (L.cooperative) {
    const int per_sm = occupancy(L.kernel, threads, L.dynamic_smem);
    const uint64_t resident = static_cast<uint64_t>(per_sm) * config().sm_count;
    if (ls.total_blocks > resident) {
      std::ostringstream os;
      os << ls.total_blocks << " blocks cannot all be resident: " << per_sm << " per SM x "
         << config().sm_count << " SMs";
      return finish(cudaErrorCooperativeLaunchTooLarge, os.str());
    }
    ls.grid.total = static_cast<int>(ls.total_blocks);
    std::vector<std::thread> blocks;
    blocks.reserve(ls.total_blocks);
    for (uint64_t b = 0; b < ls.total_blocks; ++b) {
      blocks.emplace_back([&ls, b] {
        BlockRunner r;
        r.run_block(ls, b);
      });
    }
    for (auto& t : blocks) t.join();
  } else {
    auto work = [&ls] {
      BlockRunner& r = thread_runner();
      while (!ls.failed.load(std::memory_order_relaxed)) {
        const uint64_t b = ls.next_block.fetch_add(1);
        if (b >= ls.total_blocks) break;
        r.run_block(ls, b);
      }
    };
    const int helpers = static_cast<int>(
        std::min<uint64_t>(std::max(1, config().workers) - 1, ls.total_blocks - 1));
    if (helpers > 0) {
      pool().run(helpers, work);
    } else {
      work();
    }
  }
  {
    std::lock_guard<std::mutex> lock(attributes_mutex);
    known_static_smem[L.kernel] = std::max(known_static_smem[L.kernel], ls.static_shared.load());
  }
  if (ls.failed.load()) return finish(cudaErrorLaunchFailure, ls.error);
  const std::string guards = ::simt::check_guards();
  if (!guards.empty()) return finish(cudaErrorLaunchFailure, "memory outside a buffer changed: " + guards);
  return finish(cudaSuccess, "");
}

void sync_threads(Site site) { runner().sync_threads(site); }
int sync_threads_count(int predicate, Site site) { return runner().sync_threads_count(predicate, site); }
void grid_sync(Site site) { runner().grid_sync(site); }
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, Site site) {
  return runner().warp_collective(op, mask, value, arg, width, site);
}
unsigned active_mask() { return runner().active_mask(); }
void* shared_slot(const void* key, size_t size, size_t align, Site site) {
  return runner().shared_slot(key, size, align, site);
}
void* dynamic_shared() { return runner().dynamic_shared(); }
void device_trap(const char* what, Site site) {
  runner().abort_block(std::string(what) + " at " + site_string(site));
}

// For the fault handler of the page guard mode: where the fault happened.
std::string current_location() {
  return tl_runner == nullptr ? std::string("host code") : tl_runner->where();
}

}  // namespace detail
}  // namespace simt

// ---------------------------------------------------------------------------
// Runtime API
// ---------------------------------------------------------------------------
const char* cudaGetErrorString(cudaError_t error) {
  using namespace simt;
  error_string_buffer = error_name(error);
  if (error != cudaSuccess && !last_error_text.empty()) error_string_buffer = last_error_text;
  return error_string_buffer.c_str();
}

cudaError_t cudaGetLastError() {
  using namespace simt;
  const cudaError_t e = last_error;
  if (e != cudaSuccess) {
    // Keep the text for cudaGetErrorString(e), which the check calls next.
    error_string_buffer = last_error_text;
  }
  last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return simt::last_error; }

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = simt::kMaxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *value = simt::kMaxBlockDim[0]; break;
    case cudaDevAttrMaxBlockDimY: *value = simt::kMaxBlockDim[1]; break;
    case cudaDevAttrMaxBlockDimZ: *value = simt::kMaxBlockDim[2]; break;
    case cudaDevAttrMaxGridDimX: *value = static_cast<int>(simt::kMaxGridDim[0]); break;
    case cudaDevAttrMaxGridDimY: *value = static_cast<int>(simt::kMaxGridDim[1]); break;
    case cudaDevAttrMaxGridDimZ: *value = static_cast<int>(simt::kMaxGridDim[2]); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(simt::kStaticSharedLimit); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = 65536; break;
    case cudaDevAttrMultiProcessorCount: *value = simt::config().sm_count; break;
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = simt::kMaxThreadsPerSM; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = static_cast<int>(simt::kSharedPerSM); break;
    case cudaDevAttrCooperativeLaunch: *value = 1; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(simt::kSharedPerBlockOptin); break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = simt::kMaxBlocksPerSM; break;
    default: return simt::fail(cudaErrorInvalidValue, "device attribute not emulated");
  }
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(
    int* blocks, const void* kernel, int block_size, size_t dynamic_smem) {
  *blocks = simt::occupancy(kernel, block_size, dynamic_smem);
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > simt::kSharedPerBlockOptin) {
    return simt::fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: unsupported attribute or value");
  }
  std::lock_guard<std::mutex> lock(simt::attributes_mutex);
  simt::max_dynamic_smem[kernel] = value;
  return cudaSuccess;
}
