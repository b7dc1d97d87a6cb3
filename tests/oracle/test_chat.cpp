// transformers' apply_chat_template as the oracle of Rhine's SFT rendering (tests/oracle/
// hf_chat.py): for the "chatml" template Rhine ships, the token ids of each conversation and
// the positions the loss covers equal apply_chat_template(tokenize=True) and its
// assistant_masks (the assistant turns marked with {% generation %}), on a byte-level BPE
// tokenizer with ChatML's turn tokens trained by `tokenizers` on the bundled text. ("plain",
// Rhine's other template, has no Hugging Face counterpart.)
#include "torch_test.h"

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "oracle/oracle_util.h"
#include "rhine/core/json.h"
#include "rhine/tokenizer/chat.h"
#include "rhine/tokenizer/tokenizer.h"
#include "test_util.h"

namespace {

// Rhine's SFT lines: prompt/response and messages, de/fr/nl/en, system turns, several turns,
// newlines and spaces at the edges of contents, emoji, digits, an empty system message.
const std::vector<std::string> kConversations = {
    R"({"prompt": "Übersetze ins Französische: Guten Morgen", "response": "Bonjour"})",
    R"({"messages": [{"role": "system", "content": "Tu es un assistant utile."},
        {"role": "user", "content": "Quelle est la capitale de la Belgique ?"},
        {"role": "assistant", "content": "Bruxelles."},
        {"role": "user", "content": "Et des Pays-Bas ?"},
        {"role": "assistant", "content": "Amsterdam, même si le gouvernement siège à La Haye."}]})",
    R"({"messages": [{"role": "user", "content": "  Hoe laat is het?\n"},
        {"role": "assistant", "content": "\nHet is 12:30 uur 🙂  "}]})",
    R"({"messages": [{"role": "system", "content": ""},
        {"role": "user", "content": "List three rivers:\n1.\n2.\n3."},
        {"role": "assistant", "content": "1. Rhine\n2. Danube\n3. Elbe"}]})",
    R"({"prompt": "Wie viele Tage hat der Februar 2028?", "response": "29 Tage – 2028 ist ein Schaltjahr."})",
};

std::string ids_text(const std::vector<std::int64_t>& v) {
  std::ostringstream s;
  for (auto x : v) s << x << ' ';
  return s.str();
}

}  // namespace

TEST_CASE("chat oracle: chatml rendering and loss mask equal apply_chat_template", "[oracle][slow]") {
  static const std::string why = oracle::missing("hf_chat.py", "transformers");
  if (!why.empty()) RHINE_SKIP_TEST(why);
  rhine::test::TempDir tmp("chat_oracle");
  const std::string data = std::string(RHINE_SOURCE_DIR) + "/data/sample/";
  oracle::run("hf_tokenizers.py", "train chatml_bpe " + tmp.file("tokenizer.json") + " " + data + "de.txt " + data +
                                      "fr.txt " + data + "nl.txt " + data + "en.txt");
  {
    std::ofstream out(tmp.file("conversations.jsonl"));
    for (const auto& c : kConversations) out << rhine::Json::parse(c).dump() << "\n";
  }
  const std::string cmd = oracle::python() + " " + oracle::script("hf_chat.py") + " " + tmp.file("tokenizer.json") +
                          " " + tmp.file("conversations.jsonl") + " 2>" + tmp.file("stderr.txt");
  const auto [status, out] = rhine::test::run_command(cmd);
  INFO(cmd << "\n" << out);
  REQUIRE(status == 0);
  std::vector<rhine::Json> want;
  {
    std::istringstream lines(out);
    for (std::string l; std::getline(lines, l);)
      if (!l.empty()) want.push_back(rhine::Json::parse(l));
  }
  REQUIRE(want.size() == kConversations.size());

  const auto tok = rhine::Tokenizer::load(tmp.file("tokenizer.json"));
  rhine::SftOptions o;
  o.chat_template = rhine::ChatTemplate::named("chatml");
  o.add_bos = false;  // apply_chat_template adds no special tokens beyond the template's
  o.max_tokens = 100000;
  std::size_t targets = 0;
  for (std::size_t i = 0; i < kConversations.size(); ++i) {
    INFO("conversation " << i << ": " << kConversations[i]);
    const auto ex = rhine::tokenize_sft_example(rhine::Json::parse(kConversations[i]).dump(), o, tok);
    const std::vector<std::int64_t> ids(ex.tokens.begin(), ex.tokens.end()), mask(ex.target.begin(), ex.target.end());
    const auto hf_ids = want[i].at("ids").get<std::vector<std::int64_t>>();
    const auto hf_mask = want[i].at("mask").get<std::vector<std::int64_t>>();
    INFO("rhine ids " << ids_text(ids) << "\nhf ids    " << ids_text(hf_ids));
    CHECK(ids == hf_ids);
    INFO("rhine mask " << ids_text(mask) << "\nhf mask    " << ids_text(hf_mask));
    CHECK(mask == hf_mask);
    for (auto m : mask) targets += m;
  }
  CHECK(targets > 20);
  std::printf("[chat oracle] %zu conversations equal to apply_chat_template (%s)\n", kConversations.size(),
              oracle::version("hf_chat.py").c_str());
}
