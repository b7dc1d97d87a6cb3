#include "rhine/data/sft.h"

#include <ATen/ops/from_blob.h>
#include <fmt/format.h>

#include <algorithm>
#include <exception>
#include <fstream>
#include <set>
#include <thread>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/core/random.h"
#include "rhine/core/threads.h"
#include "rhine/data/loader.h"
#include "rhine/tokenizer/tokenizer.h"

namespace rhine {
namespace {

constexpr const char* kComponent = "sft";
constexpr std::string_view kContent = "{content}";

/// A piece of the rendered conversation: [begin, end) bytes, target or not.
struct Span {
  std::size_t begin, end;
  bool target;
};

struct Message {
  std::string role, content;
};

std::vector<Message> messages_of(const Json& j) {
  std::vector<Message> out;
  if (j.contains("messages")) {
    const auto& m = j.at("messages");
    RHINE_CHECK(m.is_array() && !m.empty(), kComponent, "\"messages\" must be a non-empty array", m.dump(),
                "write [{\"role\": \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", ...}]");
    for (const auto& msg : m) {
      RHINE_CHECK(msg.is_object() && msg.contains("role") && msg.contains("content") && msg.at("role").is_string() &&
                      msg.at("content").is_string(),
                  kComponent, "a message needs string fields \"role\" and \"content\"", msg.dump(), "");
      out.push_back({msg.at("role").get<std::string>(), msg.at("content").get<std::string>()});
    }
    return out;
  }
  if (j.contains("prompt") || j.contains("response")) {
    RHINE_CHECK(j.contains("prompt") && j.contains("response") && j.at("prompt").is_string() &&
                    j.at("response").is_string(),
                kComponent, "a prompt/response line needs both as strings", j.dump(), "");
    out.push_back({"user", j.at("prompt").get<std::string>()});
    out.push_back({"assistant", j.at("response").get<std::string>()});
    return out;
  }
  RHINE_FAIL(kComponent, "a line needs \"messages\", \"prompt\"+\"response\" or \"text\"", j.dump().substr(0, 200),
             "see rhine/data/sft.h for the accepted shapes");
}

const std::string& role_text(const ChatTemplate& t, const std::string& role) {
  if (role == "system") return t.system;
  if (role == "user") return t.user;
  if (role == "assistant") return t.assistant;
  RHINE_FAIL(kComponent, "unknown message role", role, "roles are system, user and assistant");
}

}  // namespace

ChatTemplate ChatTemplate::named(const std::string& name) {
  if (name == "chatml") return {};
  if (name == "plain") {
    ChatTemplate t;
    t.system = "{content}\n\n";
    t.user = "{content}\n";
    t.assistant = "{content}";
    t.append_eos = true;
    return t;
  }
  RHINE_FAIL(kComponent, "unknown chat template name", name, "use \"chatml\" or \"plain\", or give the texts");
}

void ChatTemplate::validate() const {
  for (const auto* t : {&system, &user, &assistant}) {
    const auto at = t->find(kContent);
    RHINE_CHECK(at != std::string::npos && t->find(kContent, at + 1) == std::string::npos, kComponent,
                "a role's template must contain {content} exactly once", *t, "e.g. \"<|im_start|>user\\n{content}<|im_end|>\\n\"");
  }
}

namespace {

/// Renders and tokenizes one parsed line (see tokenize_sft_example).
SftExample tokenize_object(const Json& j, const SftOptions& options, const Tokenizer& tokenizer) {
  RHINE_CHECK(j.is_object(), kComponent, "a line must be a JSON object", j.dump().substr(0, 200), "");
  std::string text = options.chat_template.prefix;
  std::vector<Span> spans;
  if (!text.empty()) spans.push_back({0, text.size(), false});
  // Appended EOS ids, by the byte position they follow.
  std::vector<std::size_t> eos_after;
  if (j.contains("text")) {
    RHINE_CHECK(j.at("text").is_string(), kComponent, "\"text\" must be a string", j.at("text").dump().substr(0, 200), "");
    const auto t = j.at("text").get<std::string>();
    spans.push_back({text.size(), text.size() + t.size(), true});
    text += t;
  } else {
    bool has_reply = false;
    for (const auto& m : messages_of(j)) {
      const auto& tpl = role_text(options.chat_template, m.role);
      const auto at = tpl.find(kContent);
      const bool target = m.role == "assistant";
      has_reply |= target;
      const std::size_t b = text.size();
      text += tpl.substr(0, at);
      spans.push_back({b, text.size(), false});
      const std::size_t c = text.size();
      text += m.content;
      text += tpl.substr(at + kContent.size());
      spans.push_back({c, text.size(), target});
      if (target && options.chat_template.append_eos) eos_after.push_back(text.size());
    }
    RHINE_CHECK(has_reply, kComponent, "a conversation without an assistant message has nothing to learn",
                j.dump().substr(0, 200), "add the reply as {\"role\": \"assistant\", ...}");
  }

  // A token is a target when any of its bytes is: a token that merges the
  // separator before a reply with the reply's first characters (SentencePiece's
  // "\n" -> "▁") belongs to the reply.
  auto is_target = [&](std::size_t b, std::size_t e) {
    for (const auto& s : spans)
      if (s.target && s.begin < e && b < s.end) return true;
    return false;
  };
  SftExample ex;
  if (options.add_bos && tokenizer.bos_id() >= 0) {
    ex.tokens.push_back(tokenizer.bos_id());
    ex.target.push_back(0);
  }
  const int32_t eos = tokenizer.eos_id();
  RHINE_CHECK(eos_after.empty() || eos >= 0, kComponent, "append_eos needs a tokenizer with an EOS id", eos,
              "set ChatTemplate::append_eos = false");
  // The text between appended EOS ids is tokenized piece by piece, as a
  // tokenizer splits its input around special tokens.
  EncodeOptions eo;
  eo.parse_special = true;
  eos_after.push_back(text.size());
  std::size_t begin = 0;
  for (std::size_t k = 0; k < eos_after.size(); ++k) {
    const std::size_t end = eos_after[k];
    if (end > begin) {
      const auto enc = tokenizer.encode_with_offsets(std::string_view(text).substr(begin, end - begin), eo);
      std::uint8_t prev = 0;
      for (std::size_t i = 0; i < enc.ids.size(); ++i) {
        const auto [b, e] = enc.offsets[i];
        // Tokens without a surface (byte-fallback continuations) follow their predecessor.
        const std::uint8_t t = e > b ? static_cast<std::uint8_t>(is_target(begin + b, begin + e)) : prev;
        ex.tokens.push_back(enc.ids[i]);
        ex.target.push_back(t);
        prev = t;
      }
    }
    if (k + 1 < eos_after.size()) {  // the last entry is the end of the text, not an EOS
      ex.tokens.push_back(eos);
      ex.target.push_back(1);
    }
    begin = end;
  }
  for (const auto& s : spans)
    if (s.target) ex.target_bytes += s.end - s.begin;
  return ex;
}

}  // namespace

SftExample tokenize_sft_example(const std::string& json_line, const SftOptions& options, const Tokenizer& tokenizer) {
  return tokenize_object(Json::parse(json_line), options, tokenizer);
}

SftExamples load_sft_examples(const SftOptions& options, const Tokenizer& tokenizer) {
  options.chat_template.validate();
  RHINE_CHECK(options.max_tokens >= 2, kComponent, "max_tokens must be at least 2", options.max_tokens, "");
  RHINE_CHECK(!options.files.empty(), kComponent, "no input files", 0, "set SftOptions::files");
  // Files: paths, directories (*.jsonl) and globs, as the shard loader expands them.
  std::vector<std::string> files;
  for (const auto& f : options.files) {
    std::error_code ec;
    if (std::filesystem::is_directory(f, ec)) {
      std::vector<std::string> in_dir;
      for (const auto& e : std::filesystem::directory_iterator(f))
        if (e.path().extension() == ".jsonl") in_dir.push_back(e.path().string());
      std::sort(in_dir.begin(), in_dir.end());
      RHINE_CHECK(!in_dir.empty(), kComponent, "directory has no *.jsonl file", f, "");
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    } else {
      RHINE_CHECK(std::filesystem::exists(f, ec), kComponent, "input file not found", f, "check the path");
      files.push_back(f);
    }
  }

  struct Line {
    std::string text, where;
  };
  std::vector<Line> lines;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    RHINE_CHECK(in.good(), kComponent, "cannot open", f, "check permissions");
    std::string s;
    std::int64_t n = 0;
    while (std::getline(in, s)) {
      ++n;
      if (s.find_first_not_of(" \t\r") == std::string::npos) continue;
      lines.push_back({std::move(s), fmt::format("{}:{}", f, n)});
    }
  }

  // Tokenize in parallel (contiguous chunks per thread, so the order is the files').
  std::vector<SftExample> out(lines.size());
  std::vector<std::string> lang(lines.size());
  const int n_threads = std::max(1, std::min<int>(default_thread_count(), static_cast<int>(lines.size() / 64 + 1)));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n_threads));
  std::vector<std::thread> pool;
  for (int t = 0; t < n_threads; ++t) {
    pool.emplace_back([&, t] {
      const std::size_t lo = lines.size() * static_cast<std::size_t>(t) / static_cast<std::size_t>(n_threads);
      const std::size_t hi = lines.size() * static_cast<std::size_t>(t + 1) / static_cast<std::size_t>(n_threads);
      for (std::size_t i = lo; i < hi; ++i) {
        try {
          const Json j = Json::parse(lines[i].text);
          out[i] = tokenize_object(j, options, tokenizer);
          lang[i] = j.contains("lang") && j.at("lang").is_string() ? j.at("lang").get<std::string>()
                                                                   : options.default_language;
        } catch (const std::exception& e) {
          errors[static_cast<std::size_t>(t)] = std::make_exception_ptr(
              Error(kComponent, fmt::format("bad example at {}", lines[i].where), e.what(),
                    "fix or remove that line"));
          return;
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);

  SftExamples r;
  r.lines = static_cast<std::int64_t>(lines.size());
  std::set<std::string> langs(lang.begin(), lang.end());
  r.languages.assign(langs.begin(), langs.end());
  for (std::size_t i = 0; i < out.size(); ++i) {
    auto& ex = out[i];
    if (static_cast<std::int64_t>(ex.tokens.size()) > options.max_tokens) {
      ex.tokens.resize(static_cast<std::size_t>(options.max_tokens));
      ex.target.resize(static_cast<std::size_t>(options.max_tokens));
      ++r.truncated;
    }
    if (ex.tokens.size() < 2) {  // nothing to predict from
      ++r.dropped;
      continue;
    }
    // Targets are predicted from what precedes them: the first token cannot be one.
    ex.target[0] = 0;
    const auto n_target = std::count(ex.target.begin(), ex.target.end(), std::uint8_t{1});
    if (n_target == 0) {
      ++r.dropped;
      continue;
    }
    ex.language = static_cast<int>(std::lower_bound(r.languages.begin(), r.languages.end(), lang[i]) -
                                   r.languages.begin());
    r.target_tokens += n_target;
    r.tokens += static_cast<std::int64_t>(ex.tokens.size());
    r.examples.push_back(std::move(ex));
  }
  RHINE_CHECK(!r.examples.empty(), kComponent, "no usable example", r.lines,
              "every line was empty, or lost all its targets to max_tokens");
  return r;
}

// --- SftLoader ------------------------------------------------------------------

SftLoader::SftLoader(const SftExamples& examples, SftLoaderOptions options) : data_(examples), o_(options) {
  RHINE_CHECK(!data_.examples.empty(), kComponent, "no examples", 0, "");
  RHINE_CHECK(o_.world_size >= 1 && o_.rank >= 0 && o_.rank < o_.world_size, kComponent, "bad rank / world size",
              fmt::format("{}/{}", o_.rank, o_.world_size), "");
  RHINE_CHECK(o_.batch_size > 0 && o_.batch_size % o_.world_size == 0, kComponent,
              "batch_size must be a positive multiple of world_size", o_.batch_size, "");
  RHINE_CHECK(o_.seq_len >= 1, kComponent, "seq_len must be positive", o_.seq_len, "");
  start_epoch();
}

void SftLoader::start_epoch() {
  ++epoch_;
  cursor_ = 0;
  order_.resize(data_.examples.size());
  for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = i;
  Rng rng(o_.seed, 0x736674 /* "sft" */ + static_cast<std::uint64_t>(epoch_));
  for (std::size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng.below(i)]);
}

const std::vector<std::string>& SftLoader::languages() const { return data_.languages; }

Batch SftLoader::next() {
  const std::int64_t B = o_.batch_size, T = o_.seq_len;
  const std::int64_t b = B / o_.world_size, r0 = o_.rank * b;
  std::vector<std::int64_t> ids(static_cast<std::size_t>(b * T), o_.pad_id), labels(ids.size(), -100),
      pos(ids.size(), 0), doc(ids.size(), 0);
  Batch batch;
  batch.row_language.assign(static_cast<std::size_t>(b), 0);
  batch.tokens_per_language.assign(data_.languages.size(), 0);
  for (std::int64_t row = 0; row < B; ++row) {
    // Every rank walks all rows (cheap: sizes only) and fills its own.
    const bool mine = row >= r0 && row < r0 + b;
    std::int64_t used = 0, n_docs = 0;
    while (used < T) {
      if (cursor_ == static_cast<std::int64_t>(order_.size())) start_epoch();
      const auto& ex = data_.examples[order_[static_cast<std::size_t>(cursor_)]];
      // Positions this example needs: tokens - 1 (inputs x_0..x_{n-1}), cut to a row.
      const std::int64_t need = std::min<std::int64_t>(static_cast<std::int64_t>(ex.tokens.size()) - 1, T);
      if (used > 0 && (!o_.pack || used + need > T)) break;
      ++cursor_;
      if (mine) {
        const std::int64_t base = (row - r0) * T + used;
        for (std::int64_t t = 0; t < need; ++t) {
          const auto i = static_cast<std::size_t>(base + t);
          ids[i] = ex.tokens[static_cast<std::size_t>(t)];
          if (ex.target[static_cast<std::size_t>(t + 1)]) labels[i] = ex.tokens[static_cast<std::size_t>(t + 1)];
          pos[i] = t;
          doc[i] = n_docs;
        }
        if (n_docs == 0) batch.row_language[static_cast<std::size_t>(row - r0)] = ex.language;
        batch.tokens_per_language[static_cast<std::size_t>(ex.language)] += need;
      }
      used += need;
      ++n_docs;
    }
    if (mine)  // padding: its own "document" with restarting positions and no labels
      for (std::int64_t t = used; t < T; ++t) {
        const auto i = static_cast<std::size_t>((row - r0) * T + t);
        pos[i] = t - used;
        doc[i] = n_docs;
      }
  }
  auto make = [&](std::vector<std::int64_t>& v) {
    return at::from_blob(v.data(), {b, T}, at::TensorOptions().dtype(at::kLong)).clone();
  };
  batch.input_ids = make(ids);
  batch.labels = make(labels);
  batch.position_ids = make(pos);
  batch.doc_ids = make(doc);
  batch.step = step_++;
  return batch;
}

std::string SftLoader::state() const {
  // epoch and cursor pin the position (the shuffle of an epoch derives from seed and epoch).
  return Json{{"type", "sft"},         {"epoch", epoch_},          {"cursor", cursor_},
              {"step", step_},         {"seed", o_.seed},          {"examples", data_.examples.size()},
              {"batch_size", o_.batch_size}, {"seq_len", o_.seq_len}, {"pack", o_.pack}}
      .dump();
}

void SftLoader::load_state(const std::string& state) {
  const Json j = Json::parse(state);
  RHINE_CHECK(j.value("type", "") == "sft", kComponent, "not an SftLoader state", state.substr(0, 100),
              "resume with the data source of the original run");
  for (const char* k : {"seed", "examples", "batch_size", "seq_len", "pack"}) {
    const Json mine = Json::parse(this->state()).at(k);
    RHINE_CHECK(j.at(k) == mine, kComponent, fmt::format("the state was taken with another {}", k), j.at(k).dump(),
                fmt::format("this loader has {}; resume with the original data and options", mine.dump()));
  }
  const auto epoch = j.at("epoch").get<std::int64_t>();
  epoch_ = epoch - 1;
  start_epoch();  // rebuilds that epoch's shuffle
  cursor_ = j.at("cursor").get<std::int64_t>();
  step_ = j.at("step").get<std::int64_t>();
}

}  // namespace rhine
