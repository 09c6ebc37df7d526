// Python module of the SIMT backend (test-only): the library `fastbn_simt`,
// whose CPU kernels are fastbn's CUDA sources run by the emulator, and the
// emulator's controls (configuration, launch record, guarded allocator).
#include "api.h"
#include "../schemas.h"

#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastbn_simt, m) { fastbn::define_schemas(m); }

namespace {

const char* schedule_name(simt::Schedule s) {
  switch (s) {
    case simt::Schedule::kForward: return "forward";
    case simt::Schedule::kReverse: return "reverse";
    case simt::Schedule::kShuffle: return "shuffle";
  }
  return "?";
}

simt::Schedule parse_schedule(const std::string& name) {
  if (name == "forward") return simt::Schedule::kForward;
  if (name == "reverse") return simt::Schedule::kReverse;
  if (name == "shuffle") return simt::Schedule::kShuffle;
  TORCH_CHECK_VALUE(false, "schedule must be forward, reverse or shuffle, got '", name, "'");
}

py::tuple dim_tuple(dim3 d) { return py::make_tuple(d.x, d.y, d.z); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "configure",
      [](std::optional<int> sm_count, std::optional<std::string> schedule, std::optional<uint64_t> seed,
         std::optional<int> workers) {
        simt::Config& c = simt::config();
        if (sm_count) {
          TORCH_CHECK_VALUE(*sm_count >= 1, "sm_count must be at least 1, got ", *sm_count);
          c.sm_count = *sm_count;
        }
        if (schedule) c.schedule = parse_schedule(*schedule);
        if (seed) c.seed = *seed;
        if (workers) {
          TORCH_CHECK_VALUE(*workers >= 1, "workers must be at least 1, got ", *workers);
          c.workers = *workers;
        }
      },
      py::arg("sm_count") = py::none(), py::arg("schedule") = py::none(), py::arg("seed") = py::none(),
      py::arg("workers") = py::none(),
      "Sets the emulated SM count, the thread schedule (forward, reverse, shuffle), its seed and "
      "the number of OS threads that run blocks.");
  m.def("config", [] {
    const simt::Config& c = simt::config();
    py::dict d;
    d["sm_count"] = c.sm_count;
    d["schedule"] = schedule_name(c.schedule);
    d["seed"] = c.seed;
    d["workers"] = c.workers;
    return d;
  });
  m.def(
      "take_launches",
      [] {
        py::list out;
        for (const simt::LaunchRecord& r : simt::take_launch_records()) {
          py::dict d;
          d["kernel"] = r.name;
          d["grid"] = dim_tuple(r.grid);
          d["block"] = dim_tuple(r.block);
          d["dynamic_smem"] = r.dynamic_smem;
          d["cooperative"] = r.cooperative;
          d["error"] = r.error;
          out.append(d);
        }
        return out;
      },
      "The kernel launches since the last call, oldest first.");
  m.def(
      "install_guarded_allocator",
      [](const std::string& mode) {
        TORCH_CHECK_VALUE(mode == "canary" || mode == "page", "guard mode must be canary or page, got '", mode, "'");
        simt::install_guarded_allocator(mode == "page" ? simt::GuardMode::kPage : simt::GuardMode::kCanary);
      },
      "Makes every CPU allocation NaN-filled and guarded until uninstall_guarded_allocator().");
  m.def("uninstall_guarded_allocator", &simt::uninstall_guarded_allocator);
  m.def("take_unchecked_error", &simt::take_unchecked_error,
        "A launch error no check has read ('' if none); clears it.");
  m.def("check_guards", &simt::check_guards, "Damaged guard bytes since the last call ('' if none).");
}
