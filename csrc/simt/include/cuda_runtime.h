// SIMT backend: stands in for the CUDA toolkit's <cuda_runtime.h> (this
// folder is on -I ahead of torch's headers in the emulated build only).
#pragma once
#include "../simt.h"
