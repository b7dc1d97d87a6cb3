#include "torch_test.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>
#include <link.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/threads.h"
#include "rhine/torch/runtime.h"
#include "rhine/torch/sync.h"

using Catch::Matchers::Contains;

TEST_CASE("init_runtime uses all CPUs by default and the requested count otherwise", "[runtime]") {
  ::unsetenv("OMP_NUM_THREADS");
  auto info = rhine::init_runtime();
  CHECK(info.threads == rhine::available_cpus());
  CHECK(at::get_num_threads() == rhine::available_cpus());
  CHECK(rhine::set_threads(1) == 1);
  ::setenv("OMP_NUM_THREADS", "1", 1);
  CHECK(rhine::init_runtime().threads == 1);
  ::unsetenv("OMP_NUM_THREADS");
  CHECK_THAT(info.describe(), Contains("LibTorch " + info.torch_version));
  rhine::RuntimeOptions bad;
  bad.threads = -1;
  CHECK_THROWS_WITH(rhine::init_runtime(bad), Contains("[runtime] threads must be >= 0"));
}

TEST_CASE("Rhine's own kernels split their work over LibTorch's threads", "[runtime]") {
  // at::parallel_for runs serially in a file compiled without LibTorch's
  // OpenMP: then the fused kernels would use one core whatever the setting.
  const int before = at::get_num_threads();
  rhine::set_threads(2);
  CHECK(rhine::kernel_threads() == 2);
  rhine::set_threads(1);
  CHECK(rhine::kernel_threads() == 1);
  rhine::set_threads(before);
}

TEST_CASE("libstdc++ calls of a program reach libstdc++ and not the copies a LibTorch wheel exports", "[runtime]") {
  // PyTorch's wheels export std::filesystem functions (libtorch_cpu.so in 2.11 and 2.15,
  // libtorch.so in 2.11); a program that named LibTorch before libstdc++ bound its calls to
  // them, and on 2.11 remove_all jumped to address 0. rhine::rhine links libstdc++ first
  // (RHINE_LIBSTDCXX_FIRST). The address of a function, taken here, is the definition this
  // program's calls bind to.
  namespace fs = std::filesystem;
  const auto where = [](void* f) {
    Dl_info info{};
    return dladdr(f, &info) != 0 && info.dli_fname ? std::string(info.dli_fname) : std::string("?");
  };
  const std::vector<std::pair<std::string, void*>> functions = {
      {"remove_all", reinterpret_cast<void*>(static_cast<std::uintmax_t (*)(const fs::path&)>(&fs::remove_all))},
      {"create_directories", reinterpret_cast<void*>(static_cast<bool (*)(const fs::path&)>(&fs::create_directories))},
      {"rename", reinterpret_cast<void*>(static_cast<void (*)(const fs::path&, const fs::path&)>(&fs::rename))},
      {"status", reinterpret_cast<void*>(static_cast<fs::file_status (*)(const fs::path&)>(&fs::status))},
      {"canonical", reinterpret_cast<void*>(static_cast<fs::path (*)(const fs::path&)>(&fs::canonical))}};
  for (const auto& [name, f] : functions) {
    INFO("std::filesystem::" << name << " is defined by " << where(f));
    CHECK_THAT(where(f), Contains("libstdc++"));
  }
#if defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
  // The mechanism, whatever this LibTorch exports (Debian's 1.13 exports none of these):
  // libstdc++ is loaded before LibTorch's libraries, so it is searched first.
  std::vector<std::string> loaded;
  dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* out) {
        static_cast<std::vector<std::string>*>(out)->emplace_back(info->dlpi_name ? info->dlpi_name : "");
        return 0;
      },
      &loaded);
  const auto first = [&](const std::string& part) {
    for (std::size_t i = 0; i < loaded.size(); ++i)
      if (fs::path(loaded[i]).filename().string().rfind(part, 0) == 0) return i;
    return loaded.size();
  };
  std::string order;
  for (const auto& name : loaded) order += name + " ";
  INFO("load order: " << order);
  REQUIRE(first("libstdc++.so") < loaded.size());
  CHECK(first("libstdc++.so") < first("libtorch"));
  CHECK(first("libstdc++.so") < first("libc10"));
#endif
}

TEST_CASE("select_device parses specs and refuses CUDA where there is none", "[runtime]") {
  CHECK(rhine::select_device("cpu") == c10::Device(c10::DeviceType::CPU));
  CHECK_THROWS_WITH(rhine::select_device("tpu"), "[device] unknown device, got \"tpu\"; use auto, cpu, cuda or cuda:N");
  CHECK_THROWS_WITH(rhine::select_device("cuda:x"), Contains("malformed CUDA device index"));
  CHECK_THROWS_WITH(rhine::select_device("cuda0"), Contains("malformed CUDA device"));
  if (!at::hasCUDA()) {
    CHECK(rhine::select_device("auto") == c10::Device(c10::DeviceType::CPU));
    CHECK_THROWS_WITH(rhine::select_device("cuda"), Contains("CUDA requested but this LibTorch sees no CUDA device"));
  } else {
    CHECK(rhine::select_device("auto").is_cuda());
    CHECK_THROWS_WITH(rhine::select_device("cuda:999"), Contains("CUDA device index out of range"));
  }
}

TEST_CASE("seeding makes LibTorch's random draws repeat", "[runtime]") {
  rhine::RuntimeOptions o;
  o.seed = 1234;
  rhine::init_runtime(o);
  auto a = at::randn({16});
  rhine::seed_everything(1234);
  auto b = at::randn({16});
  CHECK(a.equal(b));
  CHECK_FALSE(at::randn({16}).equal(b));
}

TEST_CASE("host reads: to_host and host_value count, cpu_value refuses device tensors", "[torch][sync]") {
  const auto before = rhine::host_sync_count();
  const at::Tensor t = at::full({}, 2.5);
  CHECK(rhine::host_value<double>(t) == 2.5);
  CHECK(rhine::to_host(t).is_same(t));  // already on the host: the same tensor
  CHECK(rhine::host_sync_count() - before == 2);
  CHECK(rhine::cpu_value<double>(t) == 2.5);
  CHECK(rhine::cpu_value<bool>(at::full({}, true)));
  CHECK(rhine::host_sync_count() - before == 2);  // cpu_value is not counted
  const at::Tensor meta = at::empty({}, at::TensorOptions().device(at::kMeta));
  CHECK_THROWS_WITH(rhine::cpu_value<double>(meta),
                    Contains("[sync] cpu_value reads host tensors only"));
}

TEST_CASE("native bf16: read from the CPU's flags, whole words only, and resolve_bf16 turns emulated bf16 down",
          "[runtime]") {
  const std::string amd_avx2 =
      "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nbugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\n"
      "flags\t\t: fpu sse2 avx avx2 fma\n";
  const std::string sapphire = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n";
  const std::string cooper = "flags\t\t: avx2 avx512f avx512_bf16\n";
  const std::string grace = "processor\t: 0\nFeatures\t: fp asimd sve sve2 bf16 i8mm\n";
  const std::string graviton2 = "processor\t: 0\nFeatures\t: fp asimd asimddp\n";
  const std::string lookalike = "flags\t\t: avx512_bf16x bf16_more\nmodel name\t: bf16 avx512_bf16\n";
  CHECK_FALSE(rhine::cpuinfo_has_bf16(amd_avx2));
  CHECK(rhine::cpuinfo_has_bf16(sapphire));
  CHECK(rhine::cpuinfo_has_bf16(cooper));
  CHECK(rhine::cpuinfo_has_bf16(grace));
  CHECK_FALSE(rhine::cpuinfo_has_bf16(graviton2));
  CHECK_FALSE(rhine::cpuinfo_has_bf16(lookalike));  // not a flag line, not a whole word
  CHECK_FALSE(rhine::cpuinfo_has_bf16(""));

  const c10::Device cpu(c10::DeviceType::CPU);
  CHECK_FALSE(rhine::resolve_bf16(false, true, cpu, "test"));
  CHECK(rhine::resolve_bf16(true, true, cpu, "test"));
  CHECK(rhine::resolve_bf16(true, false, cpu, "test") == rhine::native_bf16(cpu));
  CHECK(rhine::native_bf16(c10::Device(c10::DeviceType::CUDA, 0)));
}
