// Uses both layers of an installed Rhine: the torch-free base and the
// LibTorch core. Prints "consumer ok" on success.
#include <ATen/ATen.h>

#include <iostream>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/rhine.h"
#include "rhine/torch/compat.h"
#include "rhine/torch/runtime.h"

int main() {
  auto info = rhine::init_runtime({});
  rhine::Json j = {{"hidden_size", 8}};
  rhine::JsonFields f(j, "consumer");
  const int hidden = f.require<int>("hidden_size");
  f.reject_unknown();
  auto q = at::randn({1, 2, 3, hidden});
  rhine::AttentionOptions o;
  o.is_causal = true;
  auto out = rhine::attention(q, q, q, o);
  try {
    RHINE_CHECK(false, "consumer", "expected failure", 1, "none");
  } catch (const rhine::Error& e) {
    std::cout << e.what() << "\n";
  }
  std::cout << "Rhine " << RHINE_VERSION_STRING << ", " << info.describe() << "\n";
  std::cout << (out.sizes() == q.sizes() ? "consumer ok" : "consumer FAILED") << "\n";
  return out.sizes() == q.sizes() ? 0 : 1;
}
