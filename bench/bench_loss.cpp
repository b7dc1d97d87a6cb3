// Memory and time of the language-model loss over a large vocabulary: the
// plain-op reference lm_loss (an fp32 copy of the logits), the chunked form
// (the default off the CPU) and the fused CPU kernel, forward + backward on
// the same bf16 logits [rows, V].
//
//   build/bench/bench_loss [--rows 4096] [--vocab 131072] [--runs 3]
//
// Each form runs in its own forked process: peak RSS (wait4's ru_maxrss) of
// the child minus that of a baseline child that only creates the logits and
// their gradient buffer's worth of memory is what the loss itself holds at
// its peak. One JSON line per form (bench.h); time is the median of --runs.
#include <ATen/ATen.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bench.h"
#include "rhine/nn/fused.h"
#include "rhine/nn/loss.h"

namespace {

struct Args {
  std::int64_t rows = 4096, vocab = 131072;
  int runs = 3;
};

// The logits, their targets, and one forward + backward of `form` ("" = none).
double run_form(const std::string& form, const Args& a, int runs) {
  at::manual_seed(1);
  const at::Tensor logits = at::randn({a.rows, a.vocab}, at::kBFloat16).mul_(2);  // no fp32 copy on the way
  const at::Tensor targets = at::randint(0, a.vocab, {a.rows}, at::kLong);
  if (form.empty()) {
    // What every form holds anyway: the logits and a bf16 gradient of their size.
    at::Tensor grad = at::empty_like(logits).fill_(0);
    return 0.0;
  }
  auto step = [&] {
    at::Tensor x = logits.detach().requires_grad_(true);
    auto [ce, z, n] = form == "lm_loss"   ? rhine::nn::lm_loss(x, targets, -100, 1e-4)
                      : form == "chunked" ? rhine::nn::chunked_lm_loss(x, targets, -100, 1e-4)
                                          : rhine::nn::fused_lm_loss(x, targets, -100, 1e-4);
    (ce + z).backward();
  };
  return rhine::bench::time_runs(step, runs, 1).median;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--rows") a.rows = std::atoll(argv[i + 1]);
    else if (k == "--vocab") a.vocab = std::atoll(argv[i + 1]);
    else if (k == "--runs") a.runs = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "[bench_loss] unknown option %s; use --rows, --vocab, --runs\n", k.c_str());
      return 2;
    }
  }
  const std::string forms[] = {"", "lm_loss", "chunked", "fused"};
  double baseline_mib = 0;
  for (const auto& form : forms) {
    int fd[2];
    if (::pipe(fd) != 0) return 1;
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(fd[0]);
      const double s = run_form(form, a, a.runs);
      if (::write(fd[1], &s, sizeof s) != sizeof s) ::_exit(1);
      ::_exit(0);
    }
    ::close(fd[1]);
    double seconds = 0;
    const bool got = ::read(fd[0], &seconds, sizeof seconds) == sizeof seconds;
    ::close(fd[0]);
    int status = 0;
    struct rusage ru {};
    ::wait4(pid, &status, 0, &ru);
    if (!got || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::fprintf(stderr, "[bench_loss] the %s child failed\n", form.empty() ? "baseline" : form.c_str());
      return 1;
    }
    const double peak_mib = static_cast<double>(ru.ru_maxrss) / 1024.0;
    if (form.empty()) {
      baseline_mib = peak_mib;
      continue;
    }
    const nlohmann::json j = {
        {"name", "lm_loss_memory"},
        {"params", {{"form", form}, {"rows", a.rows}, {"vocab", a.vocab}, {"dtype", "bf16"}}},
        {"peak_rss_mib", peak_mib},
        {"above_logits_and_grad_mib", peak_mib - baseline_mib},
        {"fp32_logits_mib", static_cast<double>(a.rows * a.vocab) * 4 / (1 << 20)},
        {"median_s", seconds},
        {"runs", a.runs}};
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
  }
  return 0;
}
