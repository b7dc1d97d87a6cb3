// Internal to Rhine's own kernels (lib/nn/fused.cpp, lib/optim/fused_adamw_kernel.cpp); not
// installed. The hot loops there are plain C++ written so that the compiler vectorises them;
// RHINE_CLONES compiles such a function for AVX-512, AVX2 and the baseline, and the loader
// picks the body the CPU runs (GCC's target_clones, resolved through a glibc ifunc, so only
// with GCC on x86-64 glibc; elsewhere the one baseline body). RHINE_INLINE forces the inner
// helpers into each clone, so that they are compiled for its instruction set too.
#pragma once

#include <cstdint>  // defines __GLIBC__ on glibc systems

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define RHINE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RHINE_CLONES
#endif
#define RHINE_INLINE inline __attribute__((always_inline))
#define RHINE_INLINE_LAMBDA __attribute__((always_inline))
