// Host-side control of the SIMT backend, for its Python module (module.cpp):
// configuration, the launch record and the guarded allocator.
#pragma once

#include "simt.h"

#include <cstdint>
#include <string>
#include <vector>

namespace simt {

enum class Schedule { kForward, kReverse, kShuffle };

struct Config {
  int sm_count = 4;            // what cudaDevAttrMultiProcessorCount reports
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;           // for kShuffle: a fresh order at every barrier
  int workers = 2;             // OS threads that run the blocks of a launch
};

Config& config();

struct LaunchRecord {
  std::string name;
  dim3 grid, block;
  size_t dynamic_smem;
  bool cooperative;
  std::string error;  // empty when the launch ran cleanly
};

// The launches since the last call, oldest first.
std::vector<LaunchRecord> take_launch_records();

// The description of a launch error that no check has read yet (cleared), or
// "" when none is pending: host code must check after every launch.
std::string take_unchecked_error();

// The guarded CPU allocator (guarded_allocator.cpp). While installed, every
// CPU allocation is filled with 0xFF bytes (NaN in every float type) and
// surrounded by check bytes; in page mode the block also ends at a page that
// may not be touched, so reading one element past it faults.
enum class GuardMode { kCanary, kPage };
void install_guarded_allocator(GuardMode mode);
void uninstall_guarded_allocator();
// Describes every live or freed guarded block whose check bytes changed since
// the last call (empty when none did).
std::string check_guards();

}  // namespace simt
