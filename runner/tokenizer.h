// The C++ tokenizers: tokenizer.bin (written by `torchat tokenizer-bin`, format in torchat/tokenizer_bin.py) read
// into one Tokenizer that runs llama2.c's sentencepiece-BPE encoder or byte-level BPE after a pre-tokenizer.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace torchat {

// A user mistake (bad file, bad flag): main prints its message on one line and exits non-zero.
struct RunnerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class TokenizerKind : uint32_t { kSentencePiece = 1, kBpe = 2 };
enum class TokenType : uint8_t { kNormal = 0, kControl = 1, kByte = 2, kUserDefined = 3, kUnused = 4 };
enum class PreTokenizer : uint32_t { kNone = 0, kGpt2 = 1, kSmolLM = 2, kLlama3 = 3, kQwen2 = 4 };
enum class ChatFormat : uint32_t { kNone = 0, kChatML = 1, kLlama3 = 2, kLlama2 = 3 };

constexpr uint32_t kTokenizerBinVersion = 1;

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& path);  // throws RunnerError naming the file

  // the ids of `text` as plain text: special tokens' spellings are never matched
  std::vector<int32_t> encode(const std::string& text) const;
  // special (control) tokens' spellings as their ids, the text between them as plain text (chat templates)
  std::vector<int32_t> encode_with_special(const std::string& text) const;
  // the bytes one token stands for: "▁the" -> " the", <0x0A> -> "\n"; a special token gives its spelling
  std::string token_bytes(int32_t id) const;
  // the text of `ids` as the Python tokenizers' decode gives it: special tokens contribute nothing, invalid UTF-8
  // becomes U+FFFD, sentencepiece drops its dummy-prefix space
  std::string decode(const std::vector<int32_t>& ids) const;
  int32_t special_id(const std::string& spelling) const;  // -1 if the vocabulary has no such special token

  int32_t vocab_size() const { return static_cast<int32_t>(types_.size()); }
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  bool add_bos() const { return add_bos_; }
  bool is_stop(int32_t id) const;
  bool is_control(int32_t id) const { return types_.at(id) == TokenType::kControl; }
  ChatFormat chat_format() const { return chat_format_; }
  const std::string& default_system() const { return default_system_; }
  const std::string& path() const { return path_; }

 private:
  void encode_plain(const std::string& text, std::vector<int32_t>& out) const;
  void encode_sentencepiece(const std::string& text, std::vector<int32_t>& out) const;
  void encode_bpe_piece(const std::string& piece, std::vector<int32_t>& out) const;
  void split_matches(const std::string& text, bool with_control, std::vector<int32_t>& out) const;

  std::string path_;
  TokenizerKind kind_ = TokenizerKind::kBpe;
  PreTokenizer pre_ = PreTokenizer::kNone;
  ChatFormat chat_format_ = ChatFormat::kNone;
  int32_t bos_id_ = -1, eos_id_ = -1;
  bool add_bos_ = false, add_dummy_prefix_ = false, byte_fallback_ = false, ignore_merges_ = false;
  std::vector<int32_t> stop_ids_;
  std::string default_system_;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<TokenType> types_;
  std::unordered_map<std::string, int32_t> piece_ids_;      // normal + user-defined pieces -> id (merge lookup)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (left, right) -> (rank, merged id)
  std::vector<std::pair<std::string, int32_t>> user_defined_, control_;  // matched whole, longest first
  int32_t byte_ids_[256];                                   // byte -> its fallback token (sp) or 1-byte token (bpe)
};

// The pre-tokenizer's pieces of `text` (byte offsets into it): the split of llama.cpp's `pre` regexes.
std::vector<std::string> pre_tokenize(PreTokenizer pre, const std::string& text);

}  // namespace torchat
