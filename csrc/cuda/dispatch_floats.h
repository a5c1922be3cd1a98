// The dtype dispatch of the CUDA kernels' host code (the checks have rejected everything else).
#pragma once

#include <ATen/Dispatch.h>

// float32, bfloat16, float16 only.
#define COSSIM_FAST_DISPATCH_FLOATS(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(                                                         \
      TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)        \
                      AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                          AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))
