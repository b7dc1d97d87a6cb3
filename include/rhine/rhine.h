#pragma once
/// \file
/// Rhine's version. Each area has its own headers under rhine/<area>/; include
/// what you use (LibTorch headers are expensive to compile).

#include "rhine/version.h"
