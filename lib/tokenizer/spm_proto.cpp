// Hand-written decoder and encoder for the protobuf wire format of
// sentencepiece.ModelProto (sentencepiece_model.proto, proto2). Only the fields
// that encoding and decoding need are kept; every other field is skipped after
// its length has been checked against the bytes that remain.

#include <cstring>
#include <string>
#include <string_view>

#include "rhine/core/error.h"
#include "rhine/tokenizer/sentencepiece.h"

namespace rhine::tokenizer {
namespace {

constexpr const char* kComponent = "spm_model";

// Reads one message's fields. `path` names the message for errors
// ("ModelProto.pieces[3].score").
class WireReader {
 public:
  WireReader(std::string_view bytes, const std::string& source, std::string path)
      : p_(bytes.data()), end_(bytes.data() + bytes.size()), source_(source), path_(std::move(path)) {}

  bool done() const { return p_ == end_; }

  // Reads a tag; returns false at the end of the message.
  bool next(uint32_t& field, uint32_t& wire_type) {
    if (p_ == end_) return false;
    uint64_t tag = varint("tag");
    field = static_cast<uint32_t>(tag >> 3);
    wire_type = static_cast<uint32_t>(tag & 7);
    if (field == 0 || tag > 0xFFFFFFFFull) fail("invalid field number", tag);
    return true;
  }

  uint64_t varint(const char* what) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ == end_) fail(std::string("truncated varint in ") + what, Verbatim{"end of data"});
      const auto b = static_cast<uint8_t>(*p_++);
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    fail(std::string("varint longer than 10 bytes in ") + what, Verbatim{"overlong varint"});
  }

  std::string_view bytes(const char* what) {
    const uint64_t n = varint(what);
    if (n > static_cast<uint64_t>(end_ - p_))
      fail(std::string("length of field ") + what + " runs past the end of the data", n);
    std::string_view s(p_, static_cast<std::size_t>(n));
    p_ += n;
    return s;
  }

  float fixed32_float(const char* what) {
    if (end_ - p_ < 4) fail(std::string("truncated fixed32 in ") + what, Verbatim{"end of data"});
    uint32_t u = static_cast<uint32_t>(static_cast<uint8_t>(p_[0])) |
                 static_cast<uint32_t>(static_cast<uint8_t>(p_[1])) << 8 |
                 static_cast<uint32_t>(static_cast<uint8_t>(p_[2])) << 16 |
                 static_cast<uint32_t>(static_cast<uint8_t>(p_[3])) << 24;
    p_ += 4;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }

  void skip(uint32_t wire_type, uint32_t field) {
    switch (wire_type) {
      case 0: varint("an unknown field"); return;
      case 1:
        if (end_ - p_ < 8) fail("truncated fixed64 field " + std::to_string(field), Verbatim{"end of data"});
        p_ += 8;
        return;
      case 2: bytes("an unknown field"); return;
      case 5:
        if (end_ - p_ < 4) fail("truncated fixed32 field " + std::to_string(field), Verbatim{"end of data"});
        p_ += 4;
        return;
      default: fail("unsupported wire type " + std::to_string(wire_type) + " for field " + std::to_string(field), wire_type);
    }
  }

  // Checks the wire type of a known field.
  void expect(uint32_t wire_type, uint32_t want, const char* field_name) {
    if (wire_type != want)
      fail(std::string("field ") + field_name + " has wire type " + std::to_string(wire_type) +
               ", expected " + std::to_string(want),
           wire_type);
  }

  const std::string& path() const { return path_; }
  const std::string& source() const { return source_; }

  template <class V>
  [[noreturn]] void fail(const std::string& what, const V& value) const {
    RHINE_FAIL(kComponent, "malformed SentencePiece model " + detail::quote(source_) + ": " + path_ + ": " + what,
               value, "the file is not a valid sentencepiece .model (ModelProto); re-export it with spm_train");
  }

 private:
  const char* p_;
  const char* end_;
  const std::string& source_;
  std::string path_;
};

bool as_bool(uint64_t v) { return v != 0; }

int32_t as_int32(uint64_t v) { return static_cast<int32_t>(static_cast<uint32_t>(v)); }

void parse_piece(std::string_view bytes, const std::string& source, std::size_t index, SpmModelProto& m) {
  WireReader r(bytes, source, "pieces[" + std::to_string(index) + "]");
  SpmModelProto::Piece piece;
  uint32_t f, w;
  while (r.next(f, w)) {
    if (f == 1) {
      r.expect(w, 2, "piece");
      piece.piece = std::string(r.bytes("piece"));
    } else if (f == 2) {
      r.expect(w, 5, "score");
      piece.score = r.fixed32_float("score");
    } else if (f == 3) {
      r.expect(w, 0, "type");
      const uint64_t t = r.varint("type");
      if (t < 1 || t > 6) r.fail("field type must be 1..6 (NORMAL..BYTE)", t);
      piece.type = static_cast<SpmModelProto::PieceType>(t);
    } else {
      r.skip(w, f);
    }
  }
  m.pieces.push_back(std::move(piece));
}

void parse_trainer_spec(std::string_view bytes, const std::string& source, SpmModelProto& m) {
  WireReader r(bytes, source, "trainer_spec");
  uint32_t f, w;
  while (r.next(f, w)) {
    switch (f) {
      case 3: {
        r.expect(w, 0, "model_type");
        const uint64_t t = r.varint("model_type");
        if (t < 1 || t > 4) r.fail("field model_type must be 1..4 (UNIGRAM, BPE, WORD, CHAR)", t);
        m.model_type = static_cast<SpmModelProto::ModelType>(t);
        break;
      }
      case 21: r.expect(w, 0, "split_by_unicode_script"); m.split_by_unicode_script = as_bool(r.varint("split_by_unicode_script")); break;
      case 23: r.expect(w, 0, "split_by_number"); m.split_by_number = as_bool(r.varint("split_by_number")); break;
      case 25: r.expect(w, 0, "split_digits"); m.split_digits = as_bool(r.varint("split_digits")); break;
      case 24: r.expect(w, 0, "treat_whitespace_as_suffix"); m.treat_whitespace_as_suffix = as_bool(r.varint("treat_whitespace_as_suffix")); break;
      case 35: r.expect(w, 0, "byte_fallback"); m.byte_fallback = as_bool(r.varint("byte_fallback")); break;
      case 40: r.expect(w, 0, "unk_id"); m.unk_id = as_int32(r.varint("unk_id")); break;
      case 41: r.expect(w, 0, "bos_id"); m.bos_id = as_int32(r.varint("bos_id")); break;
      case 42: r.expect(w, 0, "eos_id"); m.eos_id = as_int32(r.varint("eos_id")); break;
      case 43: r.expect(w, 0, "pad_id"); m.pad_id = as_int32(r.varint("pad_id")); break;
      case 44: r.expect(w, 2, "unk_surface"); m.unk_surface = std::string(r.bytes("unk_surface")); break;
      default: r.skip(w, f);
    }
  }
}

void parse_normalizer_spec(std::string_view bytes, const std::string& source, SpmModelProto& m) {
  WireReader r(bytes, source, "normalizer_spec");
  uint32_t f, w;
  while (r.next(f, w)) {
    switch (f) {
      case 1: r.expect(w, 2, "name"); m.normalizer_name = std::string(r.bytes("name")); break;
      case 2: r.expect(w, 2, "precompiled_charsmap"); m.precompiled_charsmap = std::string(r.bytes("precompiled_charsmap")); break;
      case 3: r.expect(w, 0, "add_dummy_prefix"); m.add_dummy_prefix = as_bool(r.varint("add_dummy_prefix")); break;
      case 4: r.expect(w, 0, "remove_extra_whitespaces"); m.remove_extra_whitespaces = as_bool(r.varint("remove_extra_whitespaces")); break;
      case 5: r.expect(w, 0, "escape_whitespaces"); m.escape_whitespaces = as_bool(r.varint("escape_whitespaces")); break;
      default: r.skip(w, f);
    }
  }
}

// denormalizer_spec: only whether it carries rules matters (Rhine does not apply them).
bool denormalizer_has_rules(std::string_view bytes, const std::string& source) {
  WireReader r(bytes, source, "denormalizer_spec");
  uint32_t f, w;
  bool rules = false;
  while (r.next(f, w)) {
    if ((f == 2 || f == 6) && w == 2) {
      rules = rules || !r.bytes("precompiled_charsmap").empty();
    } else {
      r.skip(w, f);
    }
  }
  return rules;
}

// --- writer -------------------------------------------------------------------

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_tag(std::string& out, uint32_t field, uint32_t wire) { put_varint(out, (uint64_t{field} << 3) | wire); }
void put_bytes(std::string& out, uint32_t field, std::string_view s) {
  put_tag(out, field, 2);
  put_varint(out, s.size());
  out.append(s);
}
void put_int(std::string& out, uint32_t field, int64_t v) {
  put_tag(out, field, 0);
  put_varint(out, static_cast<uint64_t>(v));  // negative int32 -> 10-byte varint, as protobuf does
}
void put_float(std::string& out, uint32_t field, float f) {
  put_tag(out, field, 5);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((u >> (8 * i)) & 0xFF));
}

}  // namespace

SpmModelProto parse_spm_model(std::string_view bytes, const std::string& source) {
  SpmModelProto m;
  WireReader r(bytes, source, "ModelProto");
  if (bytes.empty()) r.fail("the file is empty", std::size_t{0});
  uint32_t f, w;
  bool has_trainer = false;
  while (r.next(f, w)) {
    if (f == 1) {
      r.expect(w, 2, "pieces");
      parse_piece(r.bytes("pieces"), source, m.pieces.size(), m);
    } else if (f == 2) {
      r.expect(w, 2, "trainer_spec");
      parse_trainer_spec(r.bytes("trainer_spec"), source, m);
      has_trainer = true;
    } else if (f == 3) {
      r.expect(w, 2, "normalizer_spec");
      parse_normalizer_spec(r.bytes("normalizer_spec"), source, m);
    } else if (f == 5) {
      r.expect(w, 2, "denormalizer_spec");
      m.has_denormalizer = denormalizer_has_rules(r.bytes("denormalizer_spec"), source);
    } else {
      r.skip(w, f);
    }
  }
  (void)has_trainer;
  if (m.pieces.empty()) r.fail("no pieces (field 1) found", std::size_t{0});
  return m;
}

std::string serialize_spm_model(const SpmModelProto& m) {
  std::string out;
  for (const auto& p : m.pieces) {
    std::string sp;
    put_bytes(sp, 1, p.piece);
    put_float(sp, 2, p.score);
    put_int(sp, 3, static_cast<int>(p.type));
    put_bytes(out, 1, sp);
  }
  std::string ts;
  put_int(ts, 3, static_cast<int>(m.model_type));
  put_int(ts, 21, m.split_by_unicode_script);
  put_int(ts, 23, m.split_by_number);
  put_int(ts, 24, m.treat_whitespace_as_suffix);
  put_int(ts, 25, m.split_digits);
  put_int(ts, 35, m.byte_fallback);
  put_int(ts, 40, m.unk_id);
  put_int(ts, 41, m.bos_id);
  put_int(ts, 42, m.eos_id);
  put_int(ts, 43, m.pad_id);
  put_bytes(ts, 44, m.unk_surface);
  put_bytes(out, 2, ts);
  std::string ns;
  put_bytes(ns, 1, m.normalizer_name);
  if (!m.precompiled_charsmap.empty()) put_bytes(ns, 2, m.precompiled_charsmap);
  put_int(ns, 3, m.add_dummy_prefix);
  put_int(ns, 4, m.remove_extra_whitespaces);
  put_int(ns, 5, m.escape_whitespaces);
  put_bytes(out, 3, ns);
  return out;
}

}  // namespace rhine::tokenizer
