// rhine-tokenizer: train SentencePiece tokenizers on multilingual text (with
// libsentencepiece's trainer), encode / decode with Rhine's own encoder, and report
// per-language statistics. Links libsentencepiece, so never LibTorch (docs/torch.md,
// "The protobuf clash").
//
//   rhine-tokenizer train --input de=de.txt --input fr=fr.txt --input nl=nl.txt --input en=en.txt
//       --model-type bpe --vocab-size 16000 --out build/tok/eu16k
//   (train writes build/tok/eu16k.model, .vocab and .tokenizer.json; encode, decode and stats
//   take either file, or any Hugging Face tokenizer.json)
//   rhine-tokenizer encode --tokenizer build/tok/eu16k.model < text.txt > ids.txt
//   rhine-tokenizer decode --tokenizer build/tok/eu16k.model < ids.txt
//   rhine-tokenizer stats  --tokenizer build/tok/eu16k.model --input de=de.txt ... --reference en
//   rhine-tokenizer extend --tokenizer base.model --input nl=nl.txt --new-tokens 2000 --out build/tok/base-nl
//       --eval nl=heldout-nl.txt --eval en=heldout-en.txt
//   (extend writes PREFIX.model, PREFIX.tokenizer.json and PREFIX.extend.json: the base's ids
//   unchanged, new pieces after them; fertility and parity before and after on --eval; a
//   BPE tokenizer.json base gives PREFIX.tokenizer.json and PREFIX.extend.json)

#include <CLI/CLI.hpp>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <optional>
#include <string>
#include <vector>

#include "rhine/core/error.h"
#include "rhine/core/file.h"
#include "rhine/core/json.h"
#include "rhine/core/random.h"
#include "rhine/tokenizer/extend.h"
#include "rhine/tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace {

constexpr const char* kComponent = "rhine-tokenizer";

// --- input: LANG=PATH pairs; .txt (one text per line) or .jsonl records ---------------------

struct Corpus {
  std::map<std::string, std::vector<std::string>> lines;  // language -> texts
};

void add_line(Corpus& c, const std::string& lang, std::string line) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
  if (line.find_first_not_of(" \t") == std::string::npos) return;
  c.lines[lang].push_back(std::move(line));
}

// `spec` is LANG=PATH (plain text, or JSONL whose records carry the text; the language
// comes from LANG) or a bare PATH to JSONL whose records carry their own language field.
void read_input(Corpus& c, const std::string& spec, const std::string& text_field, const std::string& lang_field) {
  std::string lang, path = spec;
  const auto eq = spec.find('=');
  if (eq != std::string::npos && eq > 0 && spec.find('/') > eq) {
    lang = spec.substr(0, eq);
    path = spec.substr(eq + 1);
  }
  const bool jsonl = path.size() > 6 && (path.compare(path.size() - 6, 6, ".jsonl") == 0 ||
                                         path.compare(path.size() - 5, 5, ".json") == 0);
  RHINE_CHECK(jsonl || !lang.empty(), kComponent, "a plain-text input needs a language tag", spec,
              "write LANG=PATH, e.g. de=data/sample/de.txt (JSONL records may carry \"" + lang_field + "\")");
  std::ifstream in(path, std::ios::binary);
  RHINE_CHECK(in.good(), kComponent, "cannot open input file", path, "check the path");
  std::string line;
  std::size_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (!jsonl) {
      add_line(c, lang, std::move(line));
      continue;
    }
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    rhine::Json j = rhine::parse_json(line, kComponent, path + ":" + std::to_string(line_no));
    RHINE_CHECK(j.is_object() && j.contains(text_field) && j[text_field].is_string(), kComponent,
                "JSONL record without a string field \"" + text_field + "\" in " + path + ":" + std::to_string(line_no),
                rhine::Verbatim{line.substr(0, 120)}, "each record needs {\"" + text_field + "\": \"...\"}");
    std::string l = lang;
    if (j.contains(lang_field) && j[lang_field].is_string()) l = j[lang_field].get<std::string>();
    RHINE_CHECK(!l.empty(), kComponent, "JSONL record without a language in " + path + ":" + std::to_string(line_no),
                rhine::Verbatim{line.substr(0, 120)}, "add \"" + lang_field + "\" to each record or pass LANG=PATH");
    // Multi-line documents: each line is one training sentence.
    std::istringstream doc(j[text_field].get<std::string>());
    std::string part;
    while (std::getline(doc, part)) add_line(c, l, std::move(part));
  }
}

std::size_t bytes_of(const std::vector<std::string>& v) {
  std::size_t n = 0;
  for (const auto& s : v) n += s.size() + 1;
  return n;
}

// --- train ---------------------------------------------------------------------------------

struct TrainArgs {
  std::vector<std::string> inputs;
  std::string out, model_type = "bpe", text_field = "text", lang_field = "lang";
  std::string user_defined, control;
  int vocab_size = 8000;
  double temperature = 3.0;
  double sample_mb = 0;  // 0: as much as the largest share allows without upsampling
  double character_coverage = 0.9995;
  bool byte_fallback = true, split_digits = true;
  std::string normalization = "nmt_nfkc";
  uint64_t seed = 1;
  int threads = 0;
  std::map<std::string, double> weights;  // language -> multiplier of its sampled share
  // Parity-aware training: retrain with adjusted weights until every language's token count
  // on the parallel --parity-eval text is within `parity` times the smallest (0: off).
  double parity = 0;
  std::vector<std::string> parity_eval;  // LANG=PATH; default: the training inputs
  int parity_rounds = 8;
};

// Language-balanced sampling: language l with n_l bytes gets the share
// q_l = p_l^(1/T) / sum_j p_j^(1/T), p_l = n_l / sum n (T = 1: proportional, T -> inf:
// uniform). Lines are drawn without replacement while they last, then repeated.
std::vector<std::string> balanced_sample(const Corpus& c, double temperature, double sample_mb, uint64_t seed,
                                         const std::map<std::string, double>& weights,
                                         std::map<std::string, std::pair<double, double>>& shares) {
  RHINE_CHECK(temperature > 0, kComponent, "--temperature must be positive", temperature, "1 = proportional, 3 = flatter, 100 ~ uniform");
  double total = 0;
  std::map<std::string, double> n;
  for (const auto& [lang, lines] : c.lines) total += (n[lang] = static_cast<double>(bytes_of(lines)));
  double z = 0;
  auto weight = [&](const std::string& lang) { return weights.count(lang) ? weights.at(lang) : 1.0; };
  for (const auto& [lang, b] : n) z += weight(lang) * std::pow(b / total, 1.0 / temperature);
  std::map<std::string, double> q;
  for (const auto& [lang, b] : n) q[lang] = weight(lang) * std::pow(b / total, 1.0 / temperature) / z;
  // Budget: by default the largest budget where no language must repeat lines.
  double budget = sample_mb * 1e6;
  if (budget <= 0) {
    budget = total * 100;
    for (const auto& [lang, b] : n) budget = std::min(budget, b / q[lang]);
  }
  rhine::Rng rng(seed);
  std::vector<std::string> out;
  for (const auto& [lang, lines] : c.lines) {
    const double want = q[lang] * budget;
    std::vector<std::size_t> order(lines.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    double got = 0;
    std::size_t k = 0;
    while (got < want && !lines.empty()) {
      if (k % order.size() == 0) std::shuffle(order.begin(), order.end(), rng);
      const std::string& s = lines[order[k % order.size()]];
      out.push_back(s);
      got += static_cast<double>(s.size() + 1);
      ++k;
    }
    shares[lang] = {n[lang] / total, got};
  }
  std::shuffle(out.begin(), out.end(), rng);
  return out;
}

// Reads the .model at `model_path` back and writes its tokenizer.json equivalent (HF's
// converter layout) to `json_path`; returns the parsed model.
rhine::tokenizer::SpmModelProto write_tokenizer_json(const std::string& model_path, const std::string& json_path) {
  auto proto = rhine::tokenizer::parse_spm_model(rhine::read_file(model_path, kComponent), model_path);
  rhine::write_file_atomic(json_path, rhine::tokenizer::spm_to_tokenizer_json(proto, model_path).dump(1) + "\n");
  return proto;
}

// "LANG=W" with W > 0.
std::pair<std::string, double> parse_weight(const std::string& spec) {
  const auto eq = spec.find('=');
  double w = 0;
  bool ok = eq != std::string::npos && eq > 0;
  if (ok) {
    const char* b = spec.data() + eq + 1;
    const auto [p, ec] = std::from_chars(b, spec.data() + spec.size(), w);
    ok = ec == std::errc() && p == spec.data() + spec.size() && w > 0 && std::isfinite(w);
  }
  RHINE_CHECK(ok, kComponent, "--language-weights takes LANG=W with W > 0", spec, "e.g. --language-weights fr=1.5,de=1.2");
  return {spec.substr(0, eq), w};
}

int train_once(const TrainArgs& a) {
  Corpus c;
  for (const auto& spec : a.inputs) read_input(c, spec, a.text_field, a.lang_field);
  RHINE_CHECK(!c.lines.empty(), kComponent, "no training text found", a.inputs, "pass --input LANG=PATH (one or more)");
  RHINE_CHECK(a.model_type == "bpe" || a.model_type == "unigram", kComponent, "--model-type must be bpe or unigram",
              a.model_type, "SentencePiece BPE or Unigram");
  std::map<std::string, std::pair<double, double>> shares;
  const auto sample = balanced_sample(c, a.temperature, a.sample_mb, a.seed, a.weights, shares);
  double sampled = 0;
  for (const auto& [lang, s] : shares) sampled += s.second;
  std::fprintf(stderr, "[train] language  input share  sampled share (temperature %.2f)\n", a.temperature);
  for (const auto& [lang, s] : shares)
    std::fprintf(stderr, "[train] %-8s  %10.1f%%  %12.1f%%\n", lang.c_str(), 100 * s.first, 100 * s.second / sampled);

  const fs::path out(a.out);
  if (out.has_parent_path()) fs::create_directories(out.parent_path());
  const std::string text_path = a.out + ".train.txt";
  {
    std::string text;
    for (const auto& s : sample) (text += s) += '\n';
    rhine::write_file_atomic(text_path, text);
  }
  std::ostringstream args;
  args << "--input=" << text_path << " --model_prefix=" << a.out << " --model_type=" << a.model_type
       << " --vocab_size=" << a.vocab_size << " --character_coverage=" << a.character_coverage
       << " --byte_fallback=" << (a.byte_fallback ? "true" : "false")
       << " --split_digits=" << (a.split_digits ? "true" : "false")
       << " --normalization_rule_name=" << a.normalization << " --input_sentence_size=" << sample.size()
       << " --shuffle_input_sentence=false --minloglevel=1"
       << " --num_threads=" << (a.threads > 0 ? a.threads : 2);
  if (!a.user_defined.empty()) args << " --user_defined_symbols=" << a.user_defined;
  if (!a.control.empty()) args << " --control_symbols=" << a.control;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args.str());
  fs::remove(text_path);
  RHINE_CHECK(status.ok(), kComponent, "SentencePiece training failed", status.ToString(),
              "check --vocab-size against the amount of text (smaller vocab or more text)");
  // Load it back with Rhine's reader: a model Rhine cannot read must not be reported as done.
  const auto tok = rhine::Tokenizer::load(a.out + ".model");
  // The tokenizer.json equivalent (HF's converter layout), checked on the sample: Rhine must
  // encode it as the .model. Unigram: HF's tokenizers (and Rhine reading a tokenizer.json)
  // sums piece scores in double, libsentencepiece (and Rhine reading a .model) in float, so
  // the two can pick different segmentations of equal score (to float precision) for a few
  // lines. Such a line is counted; any other difference is an error.
  const std::string json_path = a.out + ".tokenizer.json";
  const auto proto = write_tokenizer_json(a.out + ".model", json_path);
  const auto tok_json = rhine::Tokenizer::load(json_path);
  const bool unigram = proto.model_type == rhine::tokenizer::SpmModelProto::ModelType::unigram;
  auto path_score = [&](const std::vector<int32_t>& ids) {
    double sum = 0;
    for (const int32_t id : ids) sum += proto.pieces[static_cast<std::size_t>(id)].score;
    return sum;
  };
  std::size_t checked = 0, ties = 0;
  for (std::size_t i = 0; i < sample.size() && checked < 2000; i += 1 + sample.size() / 2000, ++checked) {
    const auto want = tok.encode(sample[i]), got = tok_json.encode(sample[i]);
    if (want == got) continue;
    const double a_score = path_score(want), b_score = path_score(got);
    const bool tie = unigram && std::abs(a_score - b_score) <= 1e-5 * std::max(1.0, std::abs(a_score));
    RHINE_CHECK(tie, kComponent, "the written tokenizer.json encodes differently from the .model", sample[i].substr(0, 80),
                "please report this line; use the .model meanwhile");
    ++ties;
  }
  std::fprintf(stderr, "[train] wrote %s.model, %s.vocab and %s (%s, %d pieces; tokenizer.json checked on %zu lines",
               a.out.c_str(), a.out.c_str(), json_path.c_str(), tok.kind().c_str(), tok.vocab_size(), checked);
  if (ties)
    std::fprintf(stderr, ", %zu of them segmented differently with equal score: HF sums Unigram scores in double, "
                 "SentencePiece in float", ties);
  std::fprintf(stderr, ")\n");
  return 0;
}

// --- encode / decode -----------------------------------------------------------------------

int run_encode(const std::string& path, bool add_special, bool parse_special, int threads) {
  const auto tok = rhine::Tokenizer::load(path);
  rhine::EncodeOptions o;
  o.add_special = add_special;
  o.parse_special = parse_special;
  // stdin in 1 MiB blocks split at '\n' (std::getline on a stdio-synced
  // std::cin reads a character at a time), ids formatted with std::to_chars
  // into one output buffer per batch of lines.
  std::vector<std::string> batch;
  std::string pending, out;
  auto flush = [&] {
    const auto ids = tok.encode_batch(batch, o, threads);
    for (const auto& v : ids) {
      char digits[16];
      for (std::size_t i = 0; i < v.size(); ++i) {
        if (i) out.push_back(' ');
        const auto r = std::to_chars(digits, digits + sizeof digits, v[i]);
        out.append(digits, r.ptr);
      }
      out.push_back('\n');
    }
    std::fwrite(out.data(), 1, out.size(), stdout);
    out.clear();
    batch.clear();
  };
  std::vector<char> block(std::size_t{1} << 20);
  for (std::size_t n; (n = std::fread(block.data(), 1, block.size(), stdin)) > 0;) {
    const char* p = block.data();
    const char* end = p + n;
    for (const char* nl; (nl = static_cast<const char*>(std::memchr(p, '\n', static_cast<std::size_t>(end - p))));
         p = nl + 1) {
      pending.append(p, nl);
      batch.push_back(std::move(pending));
      pending.clear();
      if (batch.size() == 4096) flush();
    }
    pending.append(p, end);
  }
  if (!pending.empty()) batch.push_back(std::move(pending));  // a last line without '\n'
  flush();
  return 0;
}

int run_decode(const std::string& path) {
  const auto tok = rhine::Tokenizer::load(path);
  std::string line;
  std::size_t line_no = 0;
  while (std::getline(std::cin, line)) {
    ++line_no;
    std::vector<int32_t> ids;
    std::istringstream in(line);
    std::string word;
    while (in >> word) {
      std::size_t used = 0;
      long long v = 0;
      try {
        v = std::stoll(word, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      RHINE_CHECK(used == word.size() && v >= INT32_MIN && v <= INT32_MAX, kComponent,
                  "stdin line " + std::to_string(line_no) + " holds something that is not an integer id", word,
                  "decode reads one line of space-separated ids per output line");
      ids.push_back(static_cast<int32_t>(v));
    }
    const std::string text = tok.decode(ids);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fputc('\n', stdout);
  }
  return 0;
}

// --- stats ---------------------------------------------------------------------------------

struct Row {
  std::size_t lines = 0, words = 0, bytes = 0, tokens = 0;
};

// Lines, whitespace words, bytes and tokens of each language of `c` under `tok`.
std::map<std::string, Row> measure(const rhine::Tokenizer& tok, const Corpus& c, int threads) {
  std::map<std::string, Row> rows;
  for (const auto& [lang, lines] : c.lines) {
    Row& r = rows[lang];
    r.lines = lines.size();
    const auto ids = tok.encode_batch(lines, {}, threads);
    for (std::size_t i = 0; i < lines.size(); ++i) {
      r.bytes += lines[i].size();
      r.tokens += ids[i].size();
      std::istringstream in(lines[i]);
      std::string w;
      while (in >> w) ++r.words;
    }
  }
  return rows;
}

int run_stats(const std::string& path, const std::vector<std::string>& inputs, const std::string& reference,
              const std::string& text_field, const std::string& lang_field, bool json, int threads) {
  const auto tok = rhine::Tokenizer::load(path);
  Corpus c;
  for (const auto& spec : inputs) read_input(c, spec, text_field, lang_field);
  RHINE_CHECK(!c.lines.empty(), kComponent, "no text to measure", inputs, "pass --input LANG=PATH (one or more)");
  std::map<std::string, Row> rows = measure(tok, c, threads);
  // Parity compares total token counts, so it is meaningful when the inputs hold the same
  // content in each language (parallel or translated text, not necessarily line-aligned).
  const Row* ref = rows.count(reference) ? &rows[reference] : nullptr;
  const bool parallel = ref != nullptr;
  rhine::Json out = rhine::Json::object();
  if (!json) {
    std::printf("tokenizer: %s (%s, %d pieces)\n", path.c_str(), tok.kind().c_str(), tok.vocab_size());
    std::printf("%-6s %9s %10s %11s %10s %10s %10s %8s\n", "lang", "lines", "words", "bytes", "tokens", "fertility",
                "bytes/tok", "parity");
  }
  for (const auto& [lang, r] : rows) {
    const double fertility = r.words ? static_cast<double>(r.tokens) / static_cast<double>(r.words) : 0;
    const double bpt = r.tokens ? static_cast<double>(r.bytes) / static_cast<double>(r.tokens) : 0;
    const double parity = parallel && ref->tokens ? static_cast<double>(r.tokens) / static_cast<double>(ref->tokens) : NAN;
    if (json) {
      out[lang] = {{"lines", r.lines}, {"words", r.words},         {"bytes", r.bytes}, {"tokens", r.tokens},
                   {"fertility", fertility}, {"bytes_per_token", bpt}, {"parity", parallel ? rhine::Json(parity) : rhine::Json(nullptr)}};
    } else {
      char parity_text[32] = "-";
      if (parallel) std::snprintf(parity_text, sizeof parity_text, "%.3f", parity);  // rounded, as the other columns
      std::printf("%-6s %9zu %10zu %11zu %10zu %10.3f %10.3f %8s\n", lang.c_str(), r.lines, r.words, r.bytes, r.tokens,
                  fertility, bpt, parity_text);
    }
  }
  if (json) {
    std::printf("%s\n", rhine::Json{{"tokenizer", path}, {"reference", reference}, {"parallel", parallel}, {"languages", out}}.dump().c_str());
  } else if (!parallel) {
    std::printf("parity: no input for the reference language '%s' (--reference)\n", reference.c_str());
  } else {
    std::printf("fertility = tokens per whitespace word; parity = tokens / tokens of '%s' "
                "(meaningful when the inputs are translations of the same text)\n",
                reference.c_str());
  }
  return 0;
}

// --- train with a parity bound ---------------------------------------------------------------

// Trains; with --parity, repeats with each language's sampling weight multiplied by its
// parity^2 (tokens / tokens of the most compact language on the parallel evaluation text)
// until every parity is within the bound, keeping the round with the smallest worst parity.
int run_train(TrainArgs a) {
  if (a.parity <= 0) return train_once(a);
  RHINE_CHECK(a.parity >= 1.0, kComponent, "--parity is a ratio to the most compact language, at least 1", a.parity,
              "e.g. --parity 1.10");
  Corpus eval;
  for (const auto& spec : a.parity_eval.empty() ? a.inputs : a.parity_eval) read_input(eval, spec, a.text_field, a.lang_field);
  RHINE_CHECK(eval.lines.size() >= 2, kComponent, "--parity needs parallel text in at least two languages",
              eval.lines.size(), "pass --parity-eval LANG=PATH for each language (translations of the same text)");
  std::map<std::string, double> best_weights;
  double best_worst = INFINITY;
  std::size_t first_total = 0;
  for (int round = 0; round < a.parity_rounds; ++round) {
    train_once(a);
    const auto rows = measure(rhine::Tokenizer::load(a.out + ".model"), eval, a.threads);
    std::size_t least = SIZE_MAX, total = 0;
    for (const auto& [lang, r] : rows) least = std::min(least, r.tokens), total += r.tokens;
    if (round == 0) first_total = total;
    double worst = 0;
    std::string line;
    for (const auto& [lang, r] : rows) {
      const double p = static_cast<double>(r.tokens) / static_cast<double>(least);
      worst = std::max(worst, p);
      line += " " + lang + " " + std::to_string(p).substr(0, 5) + " (w " +
              std::to_string(a.weights.count(lang) ? a.weights.at(lang) : 1.0).substr(0, 5) + ")";
    }
    std::fprintf(stderr, "[parity] round %d: worst %.3f, tokens %zu (%+.2f%% vs round 0):%s\n", round, worst, total,
                 100.0 * (static_cast<double>(total) / static_cast<double>(first_total) - 1.0), line.c_str());
    if (worst < best_worst) best_worst = worst, best_weights = a.weights;
    if (worst <= a.parity) return 0;
    for (const auto& [lang, r] : rows) {
      const double p = static_cast<double>(r.tokens) / static_cast<double>(least);
      a.weights[lang] = (a.weights.count(lang) ? a.weights.at(lang) : 1.0) * p * p;
    }
  }
  a.weights = best_weights;
  train_once(a);
  std::fprintf(stderr, "[parity] no round reached %.3f in %d rounds; kept the best (worst parity %.3f)\n", a.parity,
               a.parity_rounds, best_worst);
  return 0;
}

// --- extend --------------------------------------------------------------------------------

struct ExtendArgs {
  std::string tokenizer, out, reference = "en", text_field = "text", lang_field = "lang";
  std::vector<std::string> inputs, eval;
  rhine::tokenizer::ExtendOptions options;
};

int run_extend(const ExtendArgs& a) {
  Corpus train, eval;
  for (const auto& spec : a.inputs) read_input(train, spec, a.text_field, a.lang_field);
  for (const auto& spec : a.eval.empty() ? a.inputs : a.eval) read_input(eval, spec, a.text_field, a.lang_field);
  std::vector<std::string> texts;
  for (const auto& [lang, lines] : train.lines) texts.insert(texts.end(), lines.begin(), lines.end());

  // A SentencePiece .model base gives PREFIX.model and the tokenizer.json derived from it
  // (read back with Rhine's reader); a tokenizer.json base gives PREFIX.tokenizer.json.
  const std::string base_bytes = rhine::read_file(a.tokenizer, kComponent);
  const bool json_base = !base_bytes.empty() && base_bytes.find_first_not_of(" \t\r\n") != std::string::npos &&
                         base_bytes[base_bytes.find_first_not_of(" \t\r\n")] == '{';
  const std::string model_path = json_base ? "" : a.out + ".model", json_path = a.out + ".tokenizer.json";
  rhine::tokenizer::VocabExtension ext;
  std::optional<rhine::Tokenizer> before, after;
  if (json_base) {
    const rhine::Json base = rhine::parse_json(base_bytes, kComponent, a.tokenizer);
    ext = rhine::tokenizer::extend_tokenizer_json(base, texts, a.options, a.tokenizer);
    rhine::write_file_atomic(json_path, ext.tokenizer_json.dump(1) + "\n");
    before = rhine::Tokenizer::from_tokenizer_json(base, a.tokenizer);
    after = rhine::Tokenizer::from_tokenizer_json(rhine::read_json_file(json_path, kComponent), json_path);
  } else {
    const auto base = rhine::tokenizer::parse_spm_model(base_bytes, a.tokenizer);
    ext = rhine::tokenizer::extend_vocabulary(base, texts, a.options);
    rhine::write_file_atomic(model_path, ext.model_bytes(base_bytes));
    const auto proto = write_tokenizer_json(model_path, json_path);
    RHINE_CHECK(proto.pieces.size() == base.pieces.size() + ext.added.size(), kComponent,
                "the written model does not read back with the new pieces", proto.pieces.size(), "please report this");
    before = rhine::Tokenizer::from_sentencepiece(base, a.tokenizer);
    after = rhine::Tokenizer::load(model_path);
  }
  RHINE_CHECK(after->vocab_size() == ext.base_size + static_cast<std::int32_t>(ext.added.size()), kComponent,
              "the extended tokenizer does not read back with the new tokens", after->vocab_size(), "please report this");

  const auto rb = measure(*before, eval, a.options.threads), ra = measure(*after, eval, a.options.threads);
  const bool parallel = rb.count(a.reference) > 0;
  rhine::Json langs = rhine::Json::object();
  std::printf("extended %s by %zu pieces (ids %d-%zu) -> %s%s%s\n", a.tokenizer.c_str(), ext.added.size(),
              ext.base_size, ext.base_size + ext.added.size() - 1, model_path.c_str(), json_base ? "" : ", ",
              json_path.c_str());
  std::printf("%-6s %10s %10s %8s %10s %10s %8s %9s %9s\n", "lang", "tok_before", "tok_after", "change", "fert_bef",
              "fert_aft", "", parallel ? "par_bef" : "", parallel ? "par_aft" : "");
  for (const auto& [lang, b] : rb) {
    const Row& r = ra.at(lang);
    auto fert = [](const Row& x) { return x.words ? static_cast<double>(x.tokens) / static_cast<double>(x.words) : 0.0; };
    const double change = b.tokens ? static_cast<double>(r.tokens) / static_cast<double>(b.tokens) - 1.0 : 0.0;
    double pb = NAN, pa = NAN;
    if (parallel) {
      pb = static_cast<double>(b.tokens) / static_cast<double>(rb.at(a.reference).tokens);
      pa = static_cast<double>(r.tokens) / static_cast<double>(ra.at(a.reference).tokens);
    }
    std::printf("%-6s %10zu %10zu %+7.1f%% %10.3f %10.3f %8s %9.3f %9.3f\n", lang.c_str(), b.tokens, r.tokens,
                100.0 * change, fert(b), fert(r), "", pb, pa);
    langs[lang] = {{"words", b.words},           {"bytes", b.bytes},          {"tokens_before", b.tokens},
                   {"tokens_after", r.tokens},   {"fertility_before", fert(b)}, {"fertility_after", fert(r)},
                   {"parity_before", parallel ? rhine::Json(pb) : rhine::Json(nullptr)},
                   {"parity_after", parallel ? rhine::Json(pa) : rhine::Json(nullptr)}};
  }
  rhine::Json added = rhine::Json::array();
  for (std::size_t i = 0; i < ext.added.size(); ++i)
    added.push_back({{"id", ext.base_size + static_cast<std::int32_t>(i)}, {"piece", ext.added[i]}, {"saved", ext.saved[i]}});
  const rhine::Json report = {{"base", a.tokenizer},
                              {"model", json_base ? rhine::Json(nullptr) : rhine::Json(model_path)},
                              {"tokenizer_json", json_path},   {"base_size", ext.base_size},
                              {"new_tokens", ext.added.size()}, {"reference", a.reference},
                              {"languages", langs},             {"added", added}};
  rhine::write_file_atomic(a.out + ".extend.json", report.dump(1) + "\n");
  std::printf("tokens = tokens of the --eval text (default: --input); fertility = tokens per whitespace word;"
              " parity = tokens / tokens of '%s'. Report: %s.extend.json\n", a.reference.c_str(), a.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"rhine-tokenizer: train, run and measure tokenizers for de/fr/nl/en (and more)"};
  app.require_subcommand(1);

  TrainArgs ta;
  auto* train = app.add_subcommand("train", "train a SentencePiece model with language-balanced sampling");
  train->add_option("--input,-i", ta.inputs, "LANG=PATH (.txt one text per line, or .jsonl), or PATH.jsonl with a language field")
      ->required();
  train->add_option("--out,-o", ta.out, "output prefix: writes PREFIX.model, PREFIX.vocab and PREFIX.tokenizer.json")
      ->required();
  train->add_option("--model-type", ta.model_type, "bpe or unigram")->capture_default_str();
  train->add_option("--vocab-size", ta.vocab_size, "number of pieces")->capture_default_str();
  train->add_option("--temperature", ta.temperature,
                    "language sampling temperature: share ~ p^(1/T); 1 = proportional, larger = flatter")
      ->capture_default_str();
  train->add_option("--sample-mb", ta.sample_mb, "MB of text to sample (0: all the smallest share allows)")->capture_default_str();
  train->add_option("--character-coverage", ta.character_coverage)->capture_default_str();
  train->add_option("--byte-fallback", ta.byte_fallback, "true/false")->capture_default_str();
  train->add_option("--split-digits", ta.split_digits, "true/false")->capture_default_str();
  train->add_option("--normalization", ta.normalization, "nmt_nfkc, nfkc, nfkc_cf, identity")->capture_default_str();
  train->add_option("--user-defined-symbols", ta.user_defined, "comma-separated pieces kept whole");
  train->add_option("--control-symbols", ta.control, "comma-separated control pieces");
  train->add_option("--text-field", ta.text_field, "JSONL field with the text")->capture_default_str();
  train->add_option("--lang-field", ta.lang_field, "JSONL field with the language")->capture_default_str();
  train->add_option("--seed", ta.seed)->capture_default_str();
  train->add_option("--parity", ta.parity,
                    "retrain until every language's tokens on parallel text are within this ratio of the most compact "
                    "one (e.g. 1.10; 0: off)")->capture_default_str();
  train->add_option("--parity-eval", ta.parity_eval, "LANG=PATH parallel text for --parity (default: --input)");
  train->add_option("--parity-rounds", ta.parity_rounds, "trainings at most for --parity")->capture_default_str();
  std::vector<std::string> weight_specs;
  train->add_option("--language-weights", weight_specs, "LANG=W multipliers of the sampled shares (e.g. fr=1.5,de=1.2)")
      ->delimiter(',');
  train->add_option("--threads", ta.threads, "trainer threads (0: 2)");

  std::string tok_path;
  bool add_special = false, parse_special = false;
  int threads = 0;
  auto* encode = app.add_subcommand("encode", "stdin lines -> one line of space-separated ids per input line");
  encode->add_option("--tokenizer,-t", tok_path, "tokenizer file (.model or tokenizer.json)")->required();
  encode->add_flag("--add-special", add_special, "add the tokenizer's special tokens (BOS)");
  encode->add_flag("--parse-special", parse_special, "match special-token text such as <s> in the input");
  encode->add_option("--threads", threads, "threads (0: all CPUs)");

  auto* decode = app.add_subcommand("decode", "stdin lines of ids -> one line of text each");
  decode->add_option("--tokenizer,-t", tok_path, "tokenizer file (.model or tokenizer.json)")->required();

  std::vector<std::string> stat_inputs;
  std::string reference = "en", text_field = "text", lang_field = "lang";
  bool json = false;
  ExtendArgs ea;
  auto* extend = app.add_subcommand("extend", "add the pieces that shorten target-language text most to a BPE or Unigram tokenizer");
  extend->add_option("--tokenizer,-t", ea.tokenizer,
                     "base SentencePiece .model or tokenizer.json, BPE or Unigram (its ids keep their meaning)")->required();
  extend->add_option("--input,-i", ea.inputs, "LANG=PATH of target-language text the new pieces are chosen on")->required();
  extend->add_option("--out,-o", ea.out, "output prefix: writes PREFIX.model (SentencePiece base), PREFIX.tokenizer.json, PREFIX.extend.json")->required();
  extend->add_option("--new-tokens,-n", ea.options.new_tokens, "pieces to add")->capture_default_str();
  extend->add_option("--min-frequency", ea.options.min_frequency, "add no pair seen fewer times")->capture_default_str();
  extend->add_option("--eval", ea.eval, "LANG=PATH text to report fertility and parity on (default: --input)");
  extend->add_option("--reference", ea.reference, "language the parity ratio is relative to")->capture_default_str();
  extend->add_option("--text-field", ea.text_field)->capture_default_str();
  extend->add_option("--lang-field", ea.lang_field)->capture_default_str();
  extend->add_option("--threads", ea.options.threads, "threads (0: all CPUs)");

  auto* stats = app.add_subcommand("stats", "per-language fertility, bytes per token and parity to a reference language");
  stats->add_option("--tokenizer,-t", tok_path, "tokenizer file (.model or tokenizer.json)")->required();
  stats->add_option("--input,-i", stat_inputs, "LANG=PATH (translations of the same text give the parity ratio)")->required();
  stats->add_option("--reference", reference, "language the parity ratio is relative to")->capture_default_str();
  stats->add_option("--text-field", text_field)->capture_default_str();
  stats->add_option("--lang-field", lang_field)->capture_default_str();
  stats->add_flag("--json", json, "print one JSON object instead of a table");
  stats->add_option("--threads", threads, "threads (0: all CPUs)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (const auto& w : weight_specs) ta.weights[parse_weight(w).first] = parse_weight(w).second;
    if (*train) return run_train(ta);
    if (*encode) return run_encode(tok_path, add_special, parse_special, threads);
    if (*decode) return run_decode(tok_path);
    if (*extend) return run_extend(ea);
    if (*stats) return run_stats(tok_path, stat_inputs, reference, text_field, lang_field, json, threads);
  } catch (const rhine::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "[rhine-tokenizer] unexpected error: %s\n", e.what());
    return 1;
  }
  return 0;
}
