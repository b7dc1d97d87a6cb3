// LoRA fine-tuning of a large frozen base, measured on rhine-finetune itself
// (the program a user runs), next to full fine-tuning of a model that fits:
//
//   build/bench/bench_lora [--steps 4] [--layers 24] [--full-layers 4] [--threads 2]
//                          [--before PATH] [--work DIR]
//
// The bench writes a random model of EuroLLM-1.7B's shape (hidden 2048,
// intermediate 5632, 16 heads, 8 KV heads, vocabulary 128000, untied; 24
// layers: 1.66B parameters) as bf16 safetensors (3.3 GB), a BPE tokenizer of
// the bundled sample text, and SFT pairs of its German lines, then runs
// rhine-finetune with LoRA r=16 (alpha 32) on q_proj and v_proj, batch 4 x 256,
// bf16 autocast, AdamW, `--steps` steps. Full fine-tuning of 1.66B parameters
// (fp32 weights, gradients and AdamW state: 26.6 GB) does not fit this
// machine's memory, so LoRA and full fine-tuning are also run side by side on
// the same shape cut to `--full-layers` layers. `--before PATH` runs another
// rhine-finetune binary (e.g. one built before a change) on the large model
// too, in the same process, one run after the other.
//
// Each run prints one JSON line (bench.h's fields, plus): the child's peak
// RSS (wait4's ru_maxrss) and its ratio to the stored base, the median
// tokens/s of the steps after the first (metrics.jsonl), the bytes of the
// last run checkpoint and of the HF export, and the export's dtypes.
#include <ATen/Parallel.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "bench.h"
#include "rhine/core/json.h"
#include "rhine/io/hf.h"
#include "rhine/nn/config.h"
#include "rhine/nn/model.h"

namespace fs = std::filesystem;

namespace {

std::uintmax_t bytes_under(const fs::path& p) {
  std::uintmax_t n = 0;
  if (fs::is_regular_file(p)) return fs::file_size(p);
  for (const auto& e : fs::recursive_directory_iterator(p))
    if (e.is_regular_file()) n += e.file_size();
  return n;
}

struct Child {
  int status = -1;
  long max_rss_kb = 0;
};

Child run(const std::vector<std::string>& argv, const fs::path& log, int threads) {
  std::fflush(nullptr);  // else the child's freopen writes our buffered lines again
  pid_t pid = ::fork();
  if (pid == 0) {
    std::FILE* f = std::freopen(log.c_str(), "w", stdout);
    if (f == nullptr || ::dup2(::fileno(stdout), 2) < 0) ::_exit(126);
    ::setenv("OMP_NUM_THREADS", std::to_string(threads).c_str(), 1);
    std::vector<char*> av;
    for (const auto& a : argv) av.push_back(const_cast<char*>(a.c_str()));
    av.push_back(nullptr);
    ::execv(av[0], av.data());
    ::_exit(127);
  }
  Child c;
  struct rusage ru {};
  ::wait4(pid, &c.status, 0, &ru);
  c.max_rss_kb = ru.ru_maxrss;
  return c;
}

/// The model of EuroLLM-1.7B's shape with `layers` layers, random, written as bf16.
void write_model(const fs::path& dir, std::int64_t layers) {
  if (fs::exists(dir / "model.safetensors")) return;
  rhine::Json j = {{"model_type", "llama"},          {"vocab_size", 128000},      {"hidden_size", 2048},
                   {"intermediate_size", 5632},      {"num_hidden_layers", layers}, {"num_attention_heads", 16},
                   {"num_key_value_heads", 8},       {"max_position_embeddings", 4096}, {"rms_norm_eps", 1e-5},
                   {"rope_theta", 10000.0},          {"tie_word_embeddings", false}};
  rhine::nn::CausalLMOptions mo;
  mo.init_seed = 1;
  rhine::nn::CausalLM lm(rhine::nn::ModelConfig::from_json(j), mo);
  lm->to(at::kBFloat16);
  rhine::io::ExportOptions eo;
  eo.dtype = at::kBFloat16;
  eo.overwrite = true;
  rhine::io::save_hf_model(lm, dir, eo);
}

std::set<std::string> safetensors_dtypes(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".safetensors") continue;
    std::ifstream in(e.path(), std::ios::binary);
    std::uint64_t n = 0;
    in.read(reinterpret_cast<char*>(&n), 8);
    std::string h(n, '\0');
    in.read(h.data(), static_cast<std::streamsize>(n));
    const rhine::Json header = rhine::Json::parse(h);
    for (auto it = header.begin(); it != header.end(); ++it)
      if (it.key() != "__metadata__") out.insert(it.value().at("dtype").get<std::string>());
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 4, threads = 2;
  std::int64_t layers = 24, full_layers = 4;
  std::string before, work_arg;
  for (int i = 1; i < argc; ++i) {
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (!std::strcmp(argv[i], "--steps")) steps = std::atoi(next().c_str());
    else if (!std::strcmp(argv[i], "--layers")) layers = std::atoll(next().c_str());
    else if (!std::strcmp(argv[i], "--full-layers")) full_layers = std::atoll(next().c_str());
    else if (!std::strcmp(argv[i], "--threads")) threads = std::atoi(next().c_str());
    else if (!std::strcmp(argv[i], "--before")) before = next();
    else if (!std::strcmp(argv[i], "--work")) work_arg = next();
    else {
      std::fprintf(stderr,
                   "usage: bench_lora [--steps 4] [--layers 24] [--full-layers 4] [--threads 2] [--before PATH] "
                   "[--work DIR]\n");
      return 2;
    }
  }
  at::set_num_threads(threads);
  const fs::path work = work_arg.empty() ? fs::temp_directory_path() / "rhine_bench_lora" : fs::path(work_arg);
  fs::create_directories(work);
  const fs::path sample = fs::path(RHINE_SOURCE_DIR) / "data" / "sample";

  // Tokenizer (4k BPE of the sample) and SFT pairs: a German line, then the next.
  if (!fs::exists(work / "tok.model")) {
    auto c = run({RHINE_TOKENIZER, "train", "--model-type", "bpe", "--vocab-size", "4000", "-i",
                  "de=" + (sample / "de.txt").string(), "-i", "en=" + (sample / "en.txt").string(), "--out",
                  (work / "tok").string()},
                 work / "tok.log", threads);
    if (c.status != 0) {
      std::fprintf(stderr, "bench_lora: training the tokenizer failed (%s)\n", (work / "tok.log").c_str());
      return 1;
    }
  }
  for (const auto& [file, name, n] : {std::tuple{sample / "de.txt", "train.jsonl", 2000},
                                      std::tuple{sample / "heldout" / "de.txt", "heldout.jsonl", 20}}) {
    std::ifstream in(file);
    std::vector<std::string> lines;
    for (std::string l; std::getline(in, l);)
      if (!l.empty()) lines.push_back(l);
    std::ofstream out(work / name);
    for (std::size_t i = 0; i + 1 < lines.size() && static_cast<int>(i / 2) < n; i += 2)
      out << rhine::Json{{"prompt", lines[i]}, {"response", lines[i + 1]}, {"lang", "de"}}.dump() << '\n';
  }

  struct Case {
    std::string name, binary;
    std::int64_t layers;
    bool lora;
  };
  std::vector<Case> cases = {{"lora", RHINE_FINETUNE, layers, true}};
  if (!before.empty()) cases.push_back({"lora_before", before, layers, true});
  cases.push_back({"lora_small", RHINE_FINETUNE, full_layers, true});
  cases.push_back({"full_small", RHINE_FINETUNE, full_layers, false});

  for (const auto& c : cases) {
    const fs::path base = work / ("base-" + std::to_string(c.layers));
    write_model(base, c.layers);
    const fs::path out = work / c.name, exported = work / (c.name + "-hf");
    fs::remove_all(out);
    fs::remove_all(exported);
    rhine::Json cfg = {{"base_model", base.string()},
                       {"tokenizer", (work / "tok.model").string()},
                       {"mode", "sft"},
                       {"train", (work / "train.jsonl").string()},
                       {"heldout", (work / "heldout.jsonl").string()},
                       {"chat_template", "plain"},
                       {"out_dir", out.string()},
                       {"export_dir", exported.string()},
                       {"seq_len", 256},
                       {"batch_size", 4},
                       {"steps", steps},
                       {"warmup", 1},
                       {"lr", c.lora ? 2e-4 : 2e-5},
                       {"eval_tokens", 256},
                       {"sample_tokens", 0},  // a random 128k-vocabulary model would sample ids the 4k tokenizer lacks
                       {"log_every", 1},
                       {"threads", threads},
                       {"bf16", true}};
    if (c.lora) cfg["lora"] = {{"rank", 16}, {"alpha", 32}, {"target_modules", {"q_proj", "v_proj"}}};
    rhine::write_json_file((work / (c.name + ".json")).string(), cfg);
    const auto child = run({c.binary, (work / (c.name + ".json")).string()}, work / (c.name + ".log"), threads);
    rhine::Json j = {{"name", "lora_finetune"}, {"run", c.name}, {"binary", c.binary}, {"layers", c.layers},
                     {"lora", c.lora}, {"exit_status", child.status}};
    if (child.status != 0) {
      j["log"] = (work / (c.name + ".log")).string();
      std::printf("%s\n", j.dump().c_str());
      std::fflush(stdout);
      continue;
    }
    std::vector<double> tok_s;
    std::ifstream metrics(out / "metrics.jsonl");
    for (std::string l; std::getline(metrics, l);) {
      const auto m = rhine::Json::parse(l);
      if (m.value("type", "") == "step" && m.value("step", 0) > 1) tok_s.push_back(m.at("tok_s").get<double>());
    }
    std::sort(tok_s.begin(), tok_s.end());
    fs::path last_ckpt;
    for (const auto& e : fs::directory_iterator(out / "checkpoints"))
      if (e.path().filename().string().rfind("step-", 0) == 0 && e.path() > last_ckpt) last_ckpt = e.path();
    const double stored = static_cast<double>(bytes_under(base / "model.safetensors"));
    const double rss = static_cast<double>(child.max_rss_kb) * 1024.0;
    j.update({{"stored_base_bytes", stored},
              {"peak_rss_bytes", rss},
              {"peak_rss_over_stored_base", rss / stored},
              {"tokens_per_s_median", tok_s.empty() ? 0.0 : tok_s[tok_s.size() / 2]},
              {"steps_timed", tok_s.size()},
              {"checkpoint_bytes", last_ckpt.empty() ? 0 : bytes_under(last_ckpt)},
              {"export_bytes", bytes_under(exported)},
              {"export_dtypes", safetensors_dtypes(exported)}});
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
  }
  return 0;
}
