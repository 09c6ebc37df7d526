// SIMT backend: C10_CUDA_CHECK and the launch check, raising torch errors
// with the emulator's description of what went wrong.
#pragma once
#include "../../cuda_runtime.h"

#include <c10/util/Exception.h>

#include <string>

// Like c10's, a failed check also clears the thread's last error.
#define C10_CUDA_CHECK(EXPR)                                                     \
  do {                                                                           \
    const cudaError_t simt_error_ = (EXPR);                                      \
    if (simt_error_ != cudaSuccess) {                                            \
      const std::string simt_text_ = cudaGetErrorString(simt_error_);            \
      (void)cudaGetLastError();                                                  \
      TORCH_CHECK(false, "CUDA error (SIMT backend): ", simt_text_);             \
    }                                                                            \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
