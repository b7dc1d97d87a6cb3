#pragma once
/// \file
/// Supervised fine-tuning data, torch-free: JSONL conversations rendered with
/// a chat template and tokenized, with a mask of the tokens the loss covers
/// (the assistant's replies). rhine/data/sft.h turns the result into batches.
///
///     rhine::SftOptions o;
///     o.files = {"data/sft/de.jsonl"};
///     o.chat_template = rhine::ChatTemplate::named("chatml");
///     auto examples = rhine::load_sft_examples(o, tokenizer);   // tokenized once
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
#include <string>
#include <vector>

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
  /// JSONL files, or directories (every *.jsonl inside, sorted).
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

}  // namespace rhine
