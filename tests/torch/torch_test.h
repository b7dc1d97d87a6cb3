#pragma once
// Include this instead of <catch2/catch.hpp> in tests that use LibTorch.
// Debian's LibTorch is built with glog, whose CHECK macro (abort on failure)
// would silently replace Catch's CHECK. ATen comes first, its CHECK goes, and
// Catch defines its own.
#include <ATen/ATen.h>

#undef CHECK
#include <catch2/catch.hpp>
