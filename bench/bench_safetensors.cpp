// Loading a large safetensors checkpoint: time and peak memory, memory-mapped
// (zero-copy) versus copied, against the size on disk. Writes a random
// checkpoint of about SIZE_MB (default 2048) MiB to /tmp, measures each mode in
// a fresh child process (so VmHWM is that mode's own peak), deletes the file.
//
//   build-st/bench/bench_safetensors [SIZE_MB]
//
// The page cache is warm (the file was just written): this measures mapping
// and touching pages, not the disk. Prints JSON Lines (see bench.h).
//
// Then the same for a whole model: an HF directory (config.json + a float32
// model.safetensors of about SIZE_MB, Llama layout) loaded by
// rhine::io::load_hf_model, copying (default) and zero-copy; peak RSS over the
// start includes building the model (its random initialisation).
#include <ATen/ATen.h>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "bench.h"
#include "rhine/core/json.h"
#include "rhine/io/hf.h"
#include "rhine/io/safetensors.h"

namespace {

// A field of /proc/self/status in KiB (VmHWM, VmRSS, RssAnon, RssFile).
double status_mib(const std::string& key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key + ":", 0) == 0) return std::stod(line.substr(key.size() + 1)) / 1024.0;
  return -1;
}

void report_value(const std::string& name, const nlohmann::json& params, double v, const std::string& unit) {
  rhine::bench::report(name, params, {v, v, v, 1}, unit, 1.0);
}

// One mode, run in a child process.
void measure(const std::string& path, bool copy, double file_mib) {
  rhine::TensorLoadOptions o;
  o.copy = copy;
  const nlohmann::json params = {{"mode", copy ? "copy" : "mmap"}, {"file_mib", file_mib}};
  const double base_hwm = status_mib("VmHWM");
  auto s = rhine::bench::time_runs([&] { (void)rhine::load_safetensors(path, o); }, 5, 1);
  rhine::bench::report("safetensors_load", params, s, "ms", 1e3);

  auto t0 = std::chrono::steady_clock::now();
  auto m = rhine::load_safetensors(path, o);
  double checksum = 0;
  for (auto& [name, t] : m) checksum += t.sum().item<double>();  // touch every page
  const double touch = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  report_value("safetensors_load_and_read_all", params, touch * 1e3, "ms");
  report_value("peak_rss_over_start", params, status_mib("VmHWM") - base_hwm, "MiB");
  report_value("rss_anon_after_read_all", params, status_mib("RssAnon"), "MiB");
  report_value("rss_file_after_read_all", params, status_mib("RssFile"), "MiB");
  if (checksum == 42.4242) std::printf("#\n");  // keep the sum alive
}

// A float32 Llama-layout HF directory of about size_mb MiB (all tensors share one chunk of
// random values); returns its config.
void write_hf_dir(const std::string& dir, std::int64_t size_mb) {
  const std::int64_t C = 2048, I = 5632, V = 32000;
  const std::int64_t per_layer = 4 * C * C + 3 * C * I + 2 * C;
  const std::int64_t L = std::max<std::int64_t>(1, ((size_mb << 20) / 4 - 2 * V * C - C) / per_layer);
  nlohmann::json cfg = {{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}},
                        {"vocab_size", V}, {"hidden_size", C}, {"intermediate_size", I},
                        {"num_hidden_layers", L}, {"num_attention_heads", 16}, {"num_key_value_heads", 16},
                        {"max_position_embeddings", 4096}, {"rms_norm_eps", 1e-5}, {"torch_dtype", "float32"},
                        {"tie_word_embeddings", false}};
  std::filesystem::create_directories(dir);
  rhine::write_json_file(dir + "/config.json", cfg);
  std::vector<float> data(static_cast<std::size_t>(V * C));
  std::mt19937_64 rng(2);
  std::uniform_real_distribution<float> u(-0.02f, 0.02f);
  for (auto& x : data) x = u(rng);
  std::vector<rhine::SafetensorsTensor> ts;
  auto add = [&](const std::string& n, std::vector<std::int64_t> shape) {
    std::int64_t numel = 1;
    for (auto d : shape) numel *= d;
    ts.push_back({n, rhine::SafetensorsDtype::F32, shape, data.data(), static_cast<std::size_t>(numel * 4)});
  };
  add("model.embed_tokens.weight", {V, C});
  for (std::int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"}) add(p + "self_attn." + n + ".weight", {C, C});
    add(p + "mlp.gate_proj.weight", {I, C});
    add(p + "mlp.up_proj.weight", {I, C});
    add(p + "mlp.down_proj.weight", {C, I});
    add(p + "input_layernorm.weight", {C});
    add(p + "post_attention_layernorm.weight", {C});
  }
  add("model.norm.weight", {C});
  add("lm_head.weight", {V, C});
  rhine::write_safetensors(dir + "/model.safetensors", ts);
}

void measure_hf(const std::string& dir, bool zero_copy, double file_mib) {
  rhine::io::ImportOptions o;
  o.zero_copy = zero_copy;
  const nlohmann::json params = {{"mode", zero_copy ? "zero_copy" : "copy"}, {"file_mib", file_mib}};
  const double base_hwm = status_mib("VmHWM");
  auto t0 = std::chrono::steady_clock::now();
  auto lm = rhine::io::load_hf_model(dir, o);
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  report_value("load_hf_model", params, t * 1e3, "ms");
  report_value("load_hf_model_peak_rss_over_start", params, status_mib("VmHWM") - base_hwm, "MiB");
  report_value("load_hf_model_rss_anon", params, status_mib("RssAnon"), "MiB");
  report_value("load_hf_model_rss_file", params, status_mib("RssFile"), "MiB");
  std::printf("# parameters: %lld\n", static_cast<long long>(lm->num_parameters()));
  // What building the model alone costs (allocation + random initialisation).
  auto t1 = std::chrono::steady_clock::now();
  rhine::nn::CausalLM fresh(lm->config());
  const double build = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  report_value("causal_lm_construct", params, build * 1e3, "ms");
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t size_mb = argc > 1 ? std::atoll(argv[1]) : 2048;
  const std::string path = "/tmp/rhine_bench_safetensors_" + std::to_string(::getpid()) + ".safetensors";
  {
    // 64 MiB bf16 tensors like a checkpoint's layers. All point at one chunk of
    // random values in [1, 2): the file's size is what matters, not its variety.
    const std::int64_t chunk = 64ll << 20;
    const std::int64_t n = std::max<std::int64_t>(1, (size_mb << 20) / chunk);
    std::vector<std::uint16_t> data(chunk / 2);
    std::mt19937_64 rng(1);
    for (auto& x : data) x = static_cast<std::uint16_t>(0x3f80 | (rng() & 0x7f));
    std::vector<rhine::SafetensorsTensor> ts;
    for (std::int64_t i = 0; i < n; ++i)
      ts.push_back({"model.layers." + std::to_string(i) + ".weight", rhine::SafetensorsDtype::BF16,
                    {chunk / 2 / 4096, 4096}, data.data(), static_cast<std::size_t>(chunk)});
    auto t0 = std::chrono::steady_clock::now();
    rhine::write_safetensors(path, ts);
    const double w = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    report_value("safetensors_write", {{"file_mib", static_cast<double>(n * chunk) / (1 << 20)}}, w * 1e3, "ms");
  }
  const double file_mib = static_cast<double>(std::filesystem::file_size(path)) / (1 << 20);
  for (bool copy : {false, true}) {
    pid_t pid = ::fork();
    if (pid == 0) {
      measure(path, copy, file_mib);
      std::fflush(stdout);
      ::_exit(0);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
  }
  std::filesystem::remove(path);

  const std::string dir = "/tmp/rhine_bench_hf_" + std::to_string(::getpid());
  write_hf_dir(dir, size_mb);
  const double hf_mib = static_cast<double>(std::filesystem::file_size(dir + "/model.safetensors")) / (1 << 20);
  for (bool zero_copy : {false, true}) {
    pid_t pid = ::fork();
    if (pid == 0) {
      measure_hf(dir, zero_copy, hf_mib);
      std::fflush(stdout);
      ::_exit(0);
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
  }
  std::filesystem::remove_all(dir);
  return 0;
}
