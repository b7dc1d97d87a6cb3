// A rank of test_plan.cpp's FSDP check: builds a tiny model of the given
// architecture, shards it with rhine::dist::FSDP (ZeRO-3) over the ranks of
// the environment (torchrun's variables), runs one training step and writes
// this rank's FSDP::memory() as JSON to OUT.rank<r>.json.
//
//   plan_worker --arch deepseek_v3 --out PREFIX
#include <ATen/ops/randint.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "rhine/core/json.h"
#include "rhine/dist/fsdp.h"
#include "rhine/dist/world.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "rhine/torch/runtime.h"
#include "tiny_config.h"

int main(int argc, char** argv) {
  std::string arch = "llama", out;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--arch") arch = argv[i + 1];
    else if (k == "--out") out = argv[i + 1];
  }
  try {
    rhine::set_threads(1);
    auto world = rhine::dist::init_from_env();
    rhine::nn::CausalLMOptions mo;
    mo.init_seed = 3;
    rhine::nn::CausalLM lm(rhine::test::tiny_config(arch), mo);
    rhine::dist::FSDP fsdp(world, lm);
    rhine::AdamW opt(fsdp.parameters(), rhine::AdamWOptions{});
    at::Tensor ids = at::randint(lm->config().vocab_size, {2, 9}, at::kLong);  // [B, T+1]
    rhine::nn::ForwardOptions fo;
    fo.labels = ids.slice(1, 1).contiguous();
    lm->forward(ids.slice(1, 0, 8).contiguous(), fo).loss.backward();
    fsdp.finish();
    opt.step();
    const auto m = fsdp.memory();
    std::ofstream f(out + ".rank" + std::to_string(world.rank()) + ".json");
    f << rhine::Json{{"model_elements", m.model_elements},
                     {"shard_elements", m.shard_elements},
                     {"buffer_elements", m.buffer_elements},
                     {"largest_unit_elements", m.largest_unit_elements},
                     {"peak_gathered_elements", m.peak_gathered_elements}}
             .dump();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "plan_worker: %s\n", e.what());
    return 1;
  }
}
