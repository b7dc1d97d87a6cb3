#pragma once
/// \file
/// Supervised fine-tuning data: JSONL conversations rendered with a chat
/// template, tokenized, with the loss on the assistant's replies only.
///
///     rhine::SftOptions o;
///     o.files = {"data/sft/de.jsonl"};
///     o.chat_template = rhine::ChatTemplate::named("chatml");
///     auto examples = rhine::load_sft_examples(o, tokenizer);   // tokenized once
///     rhine::SftLoaderOptions lo;  lo.batch_size = 8;  lo.seq_len = 512;
///     rhine::SftLoader loader(examples, lo);                     // a BatchSource for the Trainer
///
/// Input lines (one JSON object per line; blank lines are skipped):
///
///     {"prompt": "Übersetze ins Französische: Guten Morgen", "response": "Bonjour", "lang": "de"}
///     {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
///                   {"role": "assistant", "content": "..."}], "lang": "fr"}
///     {"text": "plain continued-pretraining text: every token is a target"}
///
/// A prompt/response line is the conversation [user: prompt, assistant:
/// response]. `lang` is optional (SftOptions::default_language otherwise).
///
/// Rendering and labels. Each message becomes the template's text for its
/// role with "{content}" replaced; the whole conversation is tokenized as one
/// string (special tokens such as "<|im_start|>" are parsed, as HF's
/// apply_chat_template followed by tokenization does), so the model sees
/// exactly the token sequence it will see at inference. A token is a target
/// when any of its bytes lies in an assistant message's content or in the part
/// of the assistant template after "{content}" (e.g. "<|im_end|>\n"): the
/// model learns to answer and to stop, never to predict the user's words (a
/// token merging the separator before a reply with its first characters, such
/// as SentencePiece's "▁Änder" for "\nÄnder", counts as the reply's).
/// With `append_eos` the tokenizer's EOS id follows every assistant message
/// (a target too). Text lines are targets throughout.
///
/// Note: special-token text inside message contents is parsed as special
/// tokens too (as in HF); clean untrusted data first.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "rhine/data/batch.h"

namespace rhine {

class Tokenizer;

/// The text of one message per role; "{content}" marks where the message goes.
struct ChatTemplate {
  std::string system = "<|im_start|>system\n{content}<|im_end|>\n";
  std::string user = "<|im_start|>user\n{content}<|im_end|>\n";
  std::string assistant = "<|im_start|>assistant\n{content}<|im_end|>\n";
  /// Text before the first message (after BOS).
  std::string prefix;
  /// Append the tokenizer's EOS id after every assistant message (a target).
  bool append_eos = false;

  /// "chatml" (ChatML: EuroLLM, Salamandra, Qwen; <|im_end|> ends a turn; the
  /// default above), "plain" (prompt and reply separated by a newline, EOS
  /// after the reply: for base models without chat tokens).
  static ChatTemplate named(const std::string& name);
  /// Throws rhine::Error unless each role's text contains "{content}" exactly once.
  void validate() const;
};

/// Options of load_sft_examples.
struct SftOptions {
  /// JSONL files (a directory: every *.jsonl inside; globs as DataLoaderOptions::shards).
  std::vector<std::string> files;
  ChatTemplate chat_template;
  /// Language of lines without "lang".
  std::string default_language = "und";
  /// Insert the tokenizer's BOS id first (when it has one).
  bool add_bos = true;
  /// Longer examples keep their first max_tokens tokens (counted in
  /// SftExamples::truncated); an example left without targets is dropped.
  std::int64_t max_tokens = 2048;
};

/// One tokenized example: tokens and which of them are targets.
struct SftExample {
  std::vector<std::int32_t> tokens;
  std::vector<std::uint8_t> target;  ///< [tokens.size()] 1 = predicted with loss
  int language = 0;                  ///< index into SftExamples::languages
  std::uint64_t target_bytes = 0;    ///< UTF-8 bytes of the target text (for bits per byte)
};

/// A tokenized dataset.
struct SftExamples {
  std::vector<SftExample> examples;
  std::vector<std::string> languages;  ///< sorted
  std::int64_t lines = 0;              ///< JSON lines read
  std::int64_t truncated = 0;          ///< examples cut to max_tokens
  std::int64_t dropped = 0;            ///< examples without any target token (after truncation)
  std::int64_t target_tokens = 0;
  std::int64_t tokens = 0;
};

/// Reads, renders and tokenizes `options.files` (in parallel over Rhine's
/// threads). Throws rhine::Error naming the file and line for invalid JSON
/// or UTF-8, a line without prompt/response, messages or text, an unknown
/// role, or a conversation without an assistant message.
SftExamples load_sft_examples(const SftOptions& options, const Tokenizer& tokenizer);

/// Renders and tokenizes one JSON object (a line of the files above).
SftExample tokenize_sft_example(const std::string& json_line, const SftOptions& options,
                                const Tokenizer& tokenizer);

/// Options of SftLoader.
struct SftLoaderOptions {
  /// Global rows per step (all ranks); a multiple of world_size.
  std::int64_t batch_size = 8;
  /// Tokens per row (T); examples longer than T + 1 tokens are cut.
  std::int64_t seq_len = 512;
  /// Several examples per row (document boundaries as DataLoader's packed
  /// mode); off = one example per row.
  bool pack = true;
  /// Filler of unused positions (its labels are -100).
  std::int32_t pad_id = 0;
  std::uint64_t seed = 0;
  int rank = 0;
  int world_size = 1;
};

/// Batches of SFT examples for the Trainer. Each epoch visits the examples in
/// a fresh seeded shuffle; rows are filled greedily in that order (an example
/// that does not fit starts the next row). A row's example of tokens
/// x_0..x_n contributes inputs x_0..x_{n-1} and labels x_1..x_n, a label
/// being -100 where x_t is not a target. position_ids restart at every
/// example, so the Trainer's per-document attention keeps examples apart.
/// Every rank builds the same global rows and keeps rows [r * b, (r + 1) * b);
/// the state (epoch, position) is equal on all ranks.
class SftLoader : public BatchSource {
 public:
  /// Keeps a reference to `examples` (it must outlive the loader).
  SftLoader(const SftExamples& examples, SftLoaderOptions options);

  Batch next() override;
  const std::vector<std::string>& languages() const override;
  std::string state() const override;
  void load_state(const std::string& state) override;

  /// Epochs started so far (1 during the first).
  std::int64_t epoch() const { return epoch_; }

 private:
  void start_epoch();
  const SftExamples& data_;
  SftLoaderOptions o_;
  std::vector<std::size_t> order_;
  std::int64_t epoch_ = 0, cursor_ = 0, step_ = 0;
};

}  // namespace rhine
