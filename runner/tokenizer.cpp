// tokenizer.bin reading and the two encoders (see tokenizer.h; the format is documented in torchat/tokenizer_bin.py).
#include "tokenizer.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>

namespace torchat {
namespace {

constexpr char kMagic[] = "TORCHTOK";
constexpr char kEndMagic[] = "KOTHCROT";
constexpr uint32_t kAddBos = 1, kAddDummyPrefix = 2, kByteFallback = 4, kIgnoreMerges = 8;
const std::string kSpaceMark = "\xE2\x96\x81";  // U+2581 "▁", sentencepiece's space

class Reader {
 public:
  Reader(std::string data, const std::string& path) : data_(std::move(data)), path_(path) {}
  template <typename T>
  T get() {
    T value;
    need(sizeof(T));
    std::memcpy(&value, data_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  std::string bytes(size_t n) {
    need(n);
    std::string out = data_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  std::string blob() { return bytes(get<uint32_t>()); }
  bool at_end() const { return pos_ == data_.size(); }
  [[noreturn]] void fail(const std::string& why) const {
    throw RunnerError(path_ + ": " + why + "; write it again with `torchat tokenizer-bin` (or `doit tokenizer:MODEL`)");
  }

 private:
  void need(size_t n) const {
    if (data_.size() - pos_ < n) fail("truncated tokenizer.bin");
  }
  std::string data_;
  std::string path_;
  size_t pos_ = 0;
};

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

size_t utf8_length(unsigned char b) {
  return b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 1;
}

// continuation bytes after a UTF-8 lead byte; -1: not a lead byte
int continuation_bytes(unsigned char b) {
  if (b < 0x80) return 0;
  if (b >= 0xC2 && b <= 0xDF) return 1;
  if (b >= 0xE0 && b <= 0xEF) return 2;
  if (b >= 0xF0 && b <= 0xF4) return 3;
  return -1;
}

// Invalid UTF-8 as U+FFFD, one per maximal invalid subpart, as Python's decode(errors="replace") and Rust's
// from_utf8_lossy do: what the Python tokenizers' decode returns, so a chat history re-encodes the same.
std::string utf8_lossy(const std::string& in) {
  static const std::string kReplacement = "\xEF\xBF\xBD";
  std::string out;
  size_t i = 0;
  while (i < in.size()) {
    auto lead = static_cast<unsigned char>(in[i]);
    int need = continuation_bytes(lead);
    if (need <= 0) {
      out += need == 0 ? std::string(1, in[i]) : kReplacement;
      ++i;
      continue;
    }
    size_t j = i + 1;
    for (int k = 0; k < need && j < in.size(); ++k, ++j) {
      auto c = static_cast<unsigned char>(in[j]);
      unsigned char lo = 0x80, hi = 0xBF;  // the second byte's range narrows after E0, ED, F0, F4
      if (k == 0 && lead == 0xE0) lo = 0xA0;
      if (k == 0 && lead == 0xED) hi = 0x9F;
      if (k == 0 && lead == 0xF0) lo = 0x90;
      if (k == 0 && lead == 0xF4) hi = 0x8F;
      if (c < lo || c > hi) break;
    }
    bool whole = j - i == static_cast<size_t>(need) + 1;
    out += whole ? in.substr(i, j - i) : kReplacement;
    i = j;
  }
  return out;
}

}  // namespace

Tokenizer::Tokenizer(const std::string& path) : path_(path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw RunnerError(path + ": cannot open the tokenizer file; pass tokenizer.bin with -z");
  Reader in(std::string(std::istreambuf_iterator<char>(file), {}), path);
  if (in.bytes(8) != std::string(kMagic, 8)) in.fail("not a torchat tokenizer.bin (bad magic)");
  uint32_t version = in.get<uint32_t>();
  if (version != kTokenizerBinVersion) {
    in.fail("tokenizer.bin version " + std::to_string(version) + ", this runner reads version " +
            std::to_string(kTokenizerBinVersion));
  }
  uint32_t kind = in.get<uint32_t>(), vocab = in.get<uint32_t>();
  if (kind != 1 && kind != 2) in.fail("unknown tokenizer kind " + std::to_string(kind));
  kind_ = static_cast<TokenizerKind>(kind);
  bos_id_ = in.get<int32_t>();
  eos_id_ = in.get<int32_t>();
  uint32_t flags = in.get<uint32_t>(), pre = in.get<uint32_t>(), chat = in.get<uint32_t>();
  if (pre > 4) in.fail("unknown pre-tokenizer " + std::to_string(pre));
  if (chat > 3) in.fail("unknown chat format " + std::to_string(chat));
  if (vocab == 0 || vocab > (1u << 24)) in.fail("implausible vocabulary size " + std::to_string(vocab));
  pre_ = static_cast<PreTokenizer>(pre);
  chat_format_ = static_cast<ChatFormat>(chat);
  add_bos_ = flags & kAddBos;
  add_dummy_prefix_ = flags & kAddDummyPrefix;
  byte_fallback_ = flags & kByteFallback;
  ignore_merges_ = flags & kIgnoreMerges;
  uint32_t n_stop = in.get<uint32_t>();
  if (n_stop > vocab) in.fail("more stop ids than tokens");
  for (uint32_t i = 0; i < n_stop; ++i) stop_ids_.push_back(in.get<int32_t>());
  default_system_ = in.blob();
  std::fill(std::begin(byte_ids_), std::end(byte_ids_), -1);
  pieces_.reserve(vocab);
  for (uint32_t i = 0; i < vocab; ++i) {
    auto type = in.get<uint8_t>();
    if (type > 4) in.fail("unknown token type " + std::to_string(type));
    types_.push_back(static_cast<TokenType>(type));
    scores_.push_back(in.get<float>());
    pieces_.push_back(in.blob());
    const std::string& piece = pieces_.back();
    auto id = static_cast<int32_t>(i);
    switch (types_.back()) {
      case TokenType::kNormal:
      case TokenType::kUserDefined:
        piece_ids_.emplace(piece, id);
        if (kind_ == TokenizerKind::kBpe && piece.size() == 1) byte_ids_[static_cast<unsigned char>(piece[0])] = id;
        if (types_.back() == TokenType::kUserDefined) user_defined_.emplace_back(piece, id);
        break;
      case TokenType::kControl:
        if (!piece.empty()) control_.emplace_back(piece, id);
        break;
      case TokenType::kByte:
        if (piece.size() != 1) in.fail("byte token " + std::to_string(i) + " is not one byte");
        byte_ids_[static_cast<unsigned char>(piece[0])] = id;
        break;
      case TokenType::kUnused: break;
    }
  }
  auto check_id = [&](int32_t id, const char* what) {
    if (id < -1 || id >= static_cast<int32_t>(vocab)) in.fail(std::string(what) + " id outside the vocabulary");
  };
  check_id(bos_id_, "BOS");
  check_id(eos_id_, "EOS");
  for (int32_t id : stop_ids_) check_id(id, "stop");
  uint32_t n_merges = in.get<uint32_t>();
  for (uint32_t rank = 0; rank < n_merges; ++rank) {
    int32_t a = in.get<int32_t>(), b = in.get<int32_t>();
    if (a < 0 || b < 0 || a >= static_cast<int32_t>(vocab) || b >= static_cast<int32_t>(vocab))
      in.fail("merge " + std::to_string(rank) + " names a token outside the vocabulary");
    auto merged = piece_ids_.find(pieces_[a] + pieces_[b]);
    if (merged == piece_ids_.end()) in.fail("merge " + std::to_string(rank) + " makes no token");
    merges_.emplace(pair_key(a, b), std::make_pair(static_cast<int32_t>(rank), merged->second));
  }
  if (in.bytes(8) != std::string(kEndMagic, 8) || !in.at_end()) in.fail("corrupt tokenizer.bin (bad end marker)");
  auto longest_first = [](const auto& x, const auto& y) { return x.first.size() > y.first.size(); };
  std::stable_sort(user_defined_.begin(), user_defined_.end(), longest_first);
  std::stable_sort(control_.begin(), control_.end(), longest_first);
}

bool Tokenizer::is_stop(int32_t id) const {
  return std::find(stop_ids_.begin(), stop_ids_.end(), id) != stop_ids_.end();
}

int32_t Tokenizer::special_id(const std::string& spelling) const {
  for (const auto& [piece, id] : control_) {
    if (piece == spelling) return id;
  }
  return -1;
}

std::string Tokenizer::token_bytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) throw RunnerError("token id " + std::to_string(id) + " outside the vocabulary");
  const std::string& piece = pieces_[id];
  if (kind_ != TokenizerKind::kSentencePiece || types_[id] == TokenType::kByte) return piece;
  std::string out;
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, kSpaceMark.size(), kSpaceMark) == 0) {
      out += ' ';
      i += kSpaceMark.size();
    } else {
      out += piece[i++];
    }
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (types_.at(id) != TokenType::kControl) out += token_bytes(id);
  }
  // sentencepiece drops the space its dummy prefix put before the text
  if (kind_ == TokenizerKind::kSentencePiece && add_dummy_prefix_ && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return utf8_lossy(out);
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  split_matches(text, false, out);
  return out;
}

std::vector<int32_t> Tokenizer::encode_with_special(const std::string& text) const {
  std::vector<int32_t> out;
  split_matches(text, true, out);
  return out;
}

// Tokens matched whole, leftmost then longest (user-defined always, control tokens on request); the text between
// them goes through the encoder.
void Tokenizer::split_matches(const std::string& text, bool with_control, std::vector<int32_t>& out) const {
  size_t start = 0, i = 0;
  while (i < text.size()) {
    int32_t found = -1;
    size_t length = 0;
    for (const auto* list : {&user_defined_, &control_}) {
      if (list == &control_ && !with_control) continue;
      for (const auto& [piece, id] : *list) {
        if (piece.size() > length && text.compare(i, piece.size(), piece) == 0) {
          found = id;
          length = piece.size();
        }
      }
    }
    if (found < 0) {
      ++i;
      continue;
    }
    if (i > start) encode_plain(text.substr(start, i - start), out);
    out.push_back(found);
    i += length;
    start = i;
  }
  if (start < text.size()) encode_plain(text.substr(start), out);
}

void Tokenizer::encode_plain(const std::string& text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  if (kind_ == TokenizerKind::kSentencePiece) {
    encode_sentencepiece(text, out);
    return;
  }
  for (const std::string& piece : pre_tokenize(pre_, text)) encode_bpe_piece(piece, out);
}

// llama2.c's encoder: "▁" for every space (and one before the text), UTF-8 characters as the first symbols (a
// character the vocabulary lacks becomes its fallback bytes), then the adjacent pair whose merge is the
// best-scoring piece merges, leftmost first, until no pair is a piece.
void Tokenizer::encode_sentencepiece(const std::string& text, std::vector<int32_t>& out) const {
  std::string normalized = add_dummy_prefix_ ? kSpaceMark : "";
  for (char c : text) normalized += c == ' ' ? kSpaceMark : std::string(1, c);
  std::vector<int32_t> ids;
  for (size_t i = 0; i < normalized.size();) {
    size_t len = std::min(utf8_length(static_cast<unsigned char>(normalized[i])), normalized.size() - i);
    auto found = piece_ids_.find(normalized.substr(i, len));
    if (found != piece_ids_.end()) {
      ids.push_back(found->second);
    } else {
      for (size_t k = 0; k < len; ++k) {
        int32_t byte_id = byte_ids_[static_cast<unsigned char>(normalized[i + k])];
        if (byte_fallback_ && byte_id >= 0) {
          ids.push_back(byte_id);
        } else if (k == 0) {
          ids.push_back(0);  // sentencepiece's <unk> is id 0 in the models we read
        }
      }
    }
    i += len;
  }
  while (ids.size() > 1) {
    float best = -std::numeric_limits<float>::infinity();
    int32_t best_id = -1;
    size_t best_at = 0;
    for (size_t i = 0; i + 1 < ids.size(); ++i) {
      if (types_[ids[i]] == TokenType::kByte || types_[ids[i + 1]] == TokenType::kByte) continue;
      auto found = piece_ids_.find(pieces_[ids[i]] + pieces_[ids[i + 1]]);
      if (found != piece_ids_.end() && scores_[found->second] > best) {
        best = scores_[found->second];
        best_id = found->second;
        best_at = i;
      }
    }
    if (best_id < 0) break;
    ids[best_at] = best_id;
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
  }
  out.insert(out.end(), ids.begin(), ids.end());
}

// Byte-level BPE on one pre-tokenized piece: its bytes as the first symbols, then the adjacent pair with the lowest
// merge rank merges (with no merges list, tiktoken's rule: the pair whose concatenation is the best-scoring token).
void Tokenizer::encode_bpe_piece(const std::string& piece, std::vector<int32_t>& out) const {
  if (ignore_merges_) {
    auto whole = piece_ids_.find(piece);
    if (whole != piece_ids_.end()) {
      out.push_back(whole->second);
      return;
    }
  }
  std::vector<int32_t> ids;
  for (char c : piece) {
    int32_t id = byte_ids_[static_cast<unsigned char>(c)];
    if (id >= 0) ids.push_back(id);  // a byte the vocabulary lacks is dropped, as `tokenizers` does without unk
  }
  const bool ranked = !merges_.empty();
  while (ids.size() > 1) {
    int64_t best = std::numeric_limits<int64_t>::max();
    int32_t best_id = -1;
    size_t best_at = 0;
    for (size_t i = 0; i + 1 < ids.size(); ++i) {
      int64_t rank;
      int32_t merged;
      if (ranked) {
        auto found = merges_.find(pair_key(ids[i], ids[i + 1]));
        if (found == merges_.end()) continue;
        rank = found->second.first;
        merged = found->second.second;
      } else {
        auto found = piece_ids_.find(pieces_[ids[i]] + pieces_[ids[i + 1]]);
        if (found == piece_ids_.end()) continue;
        rank = -static_cast<int64_t>(scores_[found->second]);
        merged = found->second;
      }
      if (rank < best) {
        best = rank;
        best_id = merged;
        best_at = i;
      }
    }
    if (best_id < 0) break;
    ids[best_at] = best_id;
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
  }
  out.insert(out.end(), ids.begin(), ids.end());
}

}  // namespace torchat
