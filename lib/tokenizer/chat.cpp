#include "rhine/tokenizer/chat.h"

#include <fmt/format.h>

#include <algorithm>
#include <exception>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

#include "rhine/core/error.h"
#include "rhine/core/json.h"
#include "rhine/core/threads.h"
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
  return tokenize_object(parse_json(json_line, kComponent, "the JSONL line"), options, tokenizer);
}

SftExamples load_sft_examples(const SftOptions& options, const Tokenizer& tokenizer) {
  options.chat_template.validate();
  RHINE_CHECK(options.max_tokens >= 2, kComponent, "max_tokens must be at least 2", options.max_tokens, "");
  RHINE_CHECK(!options.files.empty(), kComponent, "no input files", 0, "set SftOptions::files");
  // Files: paths and directories (every *.jsonl inside, sorted).
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
          const Json j = parse_json(lines[i].text, kComponent, lines[i].where);
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

}  // namespace rhine
