#pragma once
// Helpers of the oracle tests: the Python that runs the reference scripts of tests/oracle/
// and the skip reason when it cannot. Include after torch_test.h.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>

#include "rhine/io/lora.h"
#include "rhine/nn/model.h"
#include "rhine/optim/adamw.h"
#include "test_util.h"

namespace oracle {

/// The Python of the project's environment: $RHINE_PYTHON, else the CMake cache variable.
inline std::string python() {
  if (const char* env = std::getenv("RHINE_PYTHON"); env && *env) return env;
  return RHINE_PYTHON_DEFAULT;
}

/// tests/oracle/<name>.
inline std::string script(const std::string& name) {
  return std::string(RHINE_SOURCE_DIR) + "/tests/oracle/" + name;
}

/// `script_name --version` as last run by missing() (the library versions, for the log).
inline std::string& version(const std::string& script_name) {
  static std::map<std::string, std::string> versions;
  return versions[script_name];
}

/// Why `script_name --version` cannot run ("" when it can): no Python, or one without the
/// library the script imports (`library`, for the message). When it can, the versions it
/// prints are written to the log ("[oracle] ...").
inline std::string missing(const std::string& script_name, const std::string& library) {
  const std::string py = python();
  if (py.empty())
    return "no Python for the " + library + " oracle: set RHINE_PYTHON or build with scripts/build.sh "
           "(which passes the project's environment, scripts/setup-python.sh)";
  auto [status, out] = rhine::test::run_command(py + " " + script(script_name) + " --version 2>&1");
  if (status != 0)
    return "the Python " + py + " cannot import " + library + " (" + out.substr(0, 300) +
           "); run scripts/setup-python.sh and point RHINE_PYTHON at its bin/python";
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  version(script_name) = out;
  std::printf("[oracle] %s: %s\n", script_name.c_str(), out.c_str());
  return "";
}

/// Runs `python script_name args`; requires exit status 0 (the output is in the failure).
inline void run(const std::string& script_name, const std::string& args) {
  const std::string cmd = python() + " " + script(script_name) + " " + args + " 2>&1";
  const auto [status, out] = rhine::test::run_command(cmd);
  INFO(cmd << "\n" << out);
  REQUIRE(status == 0);
}

/// Trains the parameters of `lm` that require grad for `steps` AdamW steps (lr 1e-2) on
/// `ids` with `labels`, so that an export differs from the model it came from.
inline void train_steps(rhine::nn::CausalLM& lm, const at::Tensor& ids, const at::Tensor& labels, int steps) {
  rhine::NamedParameters params;
  for (const auto& p : lm->named_parameters())
    if (p.value().requires_grad()) params.push_back({p.key(), p.value()});
  rhine::AdamWOptions ao;
  ao.lr = 1e-2;
  rhine::AdamW opt(params, ao);
  lm->train();
  for (int step = 0; step < steps; ++step) {
    opt.zero_grad();
    rhine::nn::ForwardOptions fo;
    fo.labels = labels;
    lm->forward(ids, fo).loss.backward();
    opt.step();
  }
  lm->eval();
}

}  // namespace oracle
