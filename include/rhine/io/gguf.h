#pragma once
/// \file
/// Hugging Face Llama / Mistral directories -> GGUF files that llama.cpp runs
/// (`rhine-convert to-gguf`).
///
///     rhine::io::GgufExportOptions o;
///     o.type = rhine::GgmlType::Q8_0;
///     rhine::io::export_hf_to_gguf("runs/nl/export", "nl-q8_0.gguf", o);
///
/// What is written (the conventions of llama.cpp's convert_hf_to_gguf.py):
/// - architecture "llama" (Mistral is the same network to llama.cpp), with the
///   `llama.*` hyper-parameter keys (context_length, embedding_length,
///   block_count, feed_forward_length, attention.head_count / head_count_kv,
///   rope.freq_base, rope.dimension_count, attention.layer_norm_rms_epsilon,
///   attention.key_length / value_length when head_dim != hidden / heads);
/// - tensors under ggml's names (token_embd, blk.N.attn_q, ..., output_norm,
///   output); q_proj and k_proj rows permuted from Hugging Face's rotate-half
///   RoPE layout to llama.cpp's pairwise one; a tied head writes no `output`
///   (llama.cpp then reads token_embd);
/// - weights (2-D) in `type`, 1-D tensors (norms) in F32; under Q8_0 a
///   matrix whose rows are not a multiple of 32 falls back to F16;
/// - the tokenizer in `tokenizer.ggml.*`: a SentencePiece model as "llama"
///   (pieces, scores, piece types), a byte-level BPE tokenizer.json as "gpt2"
///   (tokens, merges, added tokens as control / user-defined, pre-tokenizer
///   "gpt-2" or "llama-bpe" by its split regex); both padded with [PADn]
///   unused tokens to the model's vocabulary; special ids from config.json
///   (falling back to the tokenizer's), add_bos_token / add_eos_token /
///   chat_template from tokenizer_config.json when present (BPE: else what the
///   post-processor template adds).
///
/// Models outside that (attention or MLP biases, QK-norm, scaled RoPE, MLA /
/// MoE, tokenizer.json files that are not byte-level BPE with a split llama.cpp
/// implements) are refused with an error naming the config key rather than
/// written into a file llama.cpp would misread.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "rhine/formats/gguf.h"

namespace rhine::io {

/// Options of export_hf_to_gguf.
struct GgufExportOptions {
  /// Type of the 2-D weights: F32, F16, BF16 or Q8_0.
  GgmlType type = GgmlType::F16;
  /// The vocabulary: a SentencePiece `.model` or a byte-level BPE
  /// tokenizer.json; default: the directory's tokenizer.model, else its tokenizer.json.
  std::optional<std::filesystem::path> tokenizer;
  /// `general.name`; default: the directory's name.
  std::string name;
};

/// What export_hf_to_gguf wrote.
struct GgufExportReport {
  std::int64_t tensors = 0;      ///< tensors in the file
  std::int64_t parameters = 0;   ///< elements over all tensors
  std::uint64_t tensor_bytes = 0;
  std::int64_t vocab = 0;        ///< tokens in tokenizer.ggml.tokens (padding included)
  std::int64_t padded_tokens = 0;
};

/// Writes the model of HF directory (or Rhine step-N checkpoint) `dir` as the
/// GGUF file `out`, tensor by tensor (one tensor in memory at a time; written
/// crash-safely). Throws rhine::Error "[gguf_export] ..." naming the key or
/// tensor for models llama.cpp's "llama" architecture does not describe, a
/// missing or unsupported tokenizer, unknown tensors, and a tokenizer larger
/// than the model's vocabulary.
GgufExportReport export_hf_to_gguf(const std::filesystem::path& dir, const std::filesystem::path& out,
                                   const GgufExportOptions& options = {});

}  // namespace rhine::io
