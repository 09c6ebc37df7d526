// The SIMT backend's guarded CPU allocator: what a kernel writes outside its
// buffers, or leaves unwritten inside them, becomes visible.
//   - New memory is filled with 0xFF bytes: NaN in every float type, so an
//     output element no thread wrote shows up as NaN.
//   - 64 check bytes before and at least 64 after each block: checked after
//     every kernel launch and when the block is freed.
//   - Page mode: the block also ends exactly at a page mapped with no access,
//     so a read (not only a write) one element past the end faults; the fault
//     handler names the kernel, block and thread and exits with status 86.
#include "api.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

namespace simt {
namespace detail {
std::string current_location();
}

namespace {

constexpr size_t kGuardBytes = 64;
constexpr unsigned char kGuardByte = 0xA5;

struct Block {
  void* base;          // what malloc / mmap returned
  size_t mapped;       // mmap length (page mode), else 0
  size_t size;         // payload bytes
  size_t tail_guard;   // check bytes after the payload
};

std::mutex blocks_mutex;
std::unordered_map<void*, Block> live_blocks;  // payload -> block
std::string freed_block_damage;                // found when a block was freed

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

bool guard_intact(const unsigned char* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != kGuardByte) return false;
  }
  return true;
}

// Empty when both guards of the block are intact.
std::string damage_of(void* payload, const Block& b) {
  auto* data = static_cast<unsigned char*>(payload);
  std::ostringstream os;
  if (!guard_intact(data - kGuardBytes, kGuardBytes)) {
    os << "bytes before a block of " << b.size << " bytes were written";
  }
  if (!guard_intact(data + b.size, b.tail_guard)) {
    if (!os.str().empty()) os << "; ";
    size_t first = 0;
    while (first < b.tail_guard && data[b.size + first] == kGuardByte) ++first;
    os << "bytes after the end of a block of " << b.size << " bytes were written (first at offset +"
       << first << ")";
  }
  return os.str();
}

void free_block(void* payload) {
  if (payload == nullptr) return;
  Block b;
  {
    std::lock_guard<std::mutex> lock(blocks_mutex);
    auto it = live_blocks.find(payload);
    if (it == live_blocks.end()) return;
    b = it->second;
    live_blocks.erase(it);
    const std::string damage = damage_of(payload, b);
    if (!damage.empty() && freed_block_damage.empty()) freed_block_damage = damage + " (found when it was freed)";
  }
  if (b.mapped) {
    munmap(b.base, b.mapped);
  } else {
    std::free(b.base);
  }
}

void fault_handler(int, siginfo_t* info, void*) {
  // Not async-signal-safe in general; this process is about to end anyway.
  const std::string where = detail::current_location();
  char message[1024];
  const int n = std::snprintf(
      message, sizeof message,
      "simt: memory fault at address %p in %s: with the page guard mode this is an access past "
      "the end of a guarded buffer\n",
      info->si_addr, where.c_str());
  if (n > 0) {
    ssize_t ignored = write(STDERR_FILENO, message, static_cast<size_t>(std::min<int>(n, sizeof message - 1)));
    (void)ignored;
  }
  _exit(86);
}

class GuardedAllocator final : public c10::Allocator {
 public:
  GuardMode mode = GuardMode::kCanary;

  c10::DataPtr allocate(size_t n) override {
    Block b{};
    b.size = n;
    unsigned char* payload;
    if (mode == GuardMode::kPage) {
      const size_t page = page_size();
      const size_t before = (kGuardBytes + n + page - 1) / page * page;
      b.mapped = before + page;
      void* mem = mmap(nullptr, b.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(mem != MAP_FAILED, "simt guarded allocator: cannot map ", b.mapped, " bytes");
      mprotect(static_cast<char*>(mem) + before, page, PROT_NONE);
      b.base = mem;
      payload = static_cast<unsigned char*>(mem) + before - n;
      b.tail_guard = 0;
      std::memset(mem, kGuardByte, before - n);
    } else {
      b.tail_guard = kGuardBytes + (64 - n % 64) % 64;
      b.base = std::malloc(64 + kGuardBytes + n + b.tail_guard);
      TORCH_CHECK(b.base != nullptr, "simt guarded allocator: out of memory for ", n, " bytes");
      // The payload is 64-byte aligned, as from the default CPU allocator.
      auto start = reinterpret_cast<uintptr_t>(b.base) + kGuardBytes;
      payload = reinterpret_cast<unsigned char*>((start + 63) & ~uintptr_t(63));
      std::memset(payload - kGuardBytes, kGuardByte, kGuardBytes);
      std::memset(payload + n, kGuardByte, b.tail_guard);
    }
    std::memset(payload, 0xFF, n);
    {
      std::lock_guard<std::mutex> lock(blocks_mutex);
      live_blocks[payload] = b;
    }
    return {payload, payload, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

GuardedAllocator& guarded() {
  static GuardedAllocator* a = new GuardedAllocator();  // outlives every tensor it made
  return *a;
}

c10::Allocator* previous_allocator = nullptr;

}  // namespace

void install_guarded_allocator(GuardMode mode) {
  if (mode == GuardMode::kPage) {
    struct sigaction action {};
    action.sa_sigaction = &fault_handler;
    action.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &action, nullptr);
    sigaction(SIGBUS, &action, nullptr);
  }
  guarded().mode = mode;
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current != &guarded()) {
    previous_allocator = current;
    c10::SetCPUAllocator(&guarded(), /*priority=*/255);
  }
}

void uninstall_guarded_allocator() {
  if (previous_allocator != nullptr && c10::GetCPUAllocator() == &guarded()) {
    c10::SetCPUAllocator(previous_allocator, /*priority=*/255);
  }
}

std::string check_guards() {
  std::lock_guard<std::mutex> lock(blocks_mutex);
  std::string report;
  report.swap(freed_block_damage);
  for (const auto& [payload, block] : live_blocks) {
    const std::string damage = damage_of(payload, block);
    if (!damage.empty()) {
      if (!report.empty()) report += "; ";
      report += damage;
      // Repair, so the damage is reported once.
      auto* data = static_cast<unsigned char*>(payload);
      std::memset(data - kGuardBytes, kGuardByte, kGuardBytes);
      std::memset(data + block.size, kGuardByte, block.tail_guard);
    }
  }
  return report;
}

}  // namespace simt
