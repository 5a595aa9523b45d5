// Hand-written scanners for the few split regexes byte-level BPE vocabularies use (no regex engine):
//   gpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)
//   smollm: \p{N} (each digit alone), then gpt2 on what is left
//   llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+
//           |\s+(?!\S)|\s+            (qwen2: the same with \p{N} one digit at a time)
// Each regex is applied like the `tokenizers` library's Split(behavior="isolated"): matches and the text between
// them are pieces. A regex picks the first alternative that matches at the leftmost position, which is what
// match_* below return (the match's length in code points, 0 for none).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer.h"
#include "unicode_tables.h"

namespace torchat {
namespace {

template <size_t N>
bool in_ranges(const uint32_t (&table)[N][2], uint32_t cp) {
  size_t lo = 0, hi = N;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (cp < table[mid][0]) {
      hi = mid;
    } else if (cp > table[mid][1]) {
      lo = mid + 1;
    } else {
      return true;
    }
  }
  return false;
}

bool is_letter(uint32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return in_ranges(kLetterRanges, cp);
}

bool is_number(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(kNumberRanges, cp);
}

// \s: Unicode White_Space, what the Rust regex engines behind tiktoken and tokenizers mean by it
bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

bool is_other(uint32_t cp) { return !is_space(cp) && !is_letter(cp) && !is_number(cp); }
bool is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// code points of a UTF-8 string with their byte offsets; a malformed byte stands alone (as U+FFFD would)
struct CodePoints {
  std::vector<uint32_t> cp;
  std::vector<size_t> offset;  // offset[i] = byte offset of cp[i]; offset[size] = the text's length
};

CodePoints decode_utf8(const std::string& text, size_t begin, size_t end) {
  CodePoints out;
  size_t i = begin;
  while (i < end) {
    auto b = static_cast<unsigned char>(text[i]);
    int len = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
    uint32_t value = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
    bool ok = len > 0 && i + len <= end;
    for (int k = 1; ok && k < len; ++k) {
      auto c = static_cast<unsigned char>(text[i + k]);
      ok = (c & 0xC0) == 0x80;
      value = (value << 6) | (c & 0x3F);
    }
    out.cp.push_back(ok ? value : 0xFFFD);
    out.offset.push_back(i);
    i += ok ? len : 1;
  }
  out.offset.push_back(end);
  return out;
}

using Matcher = size_t (*)(const std::vector<uint32_t>& s, size_t i);

size_t run_of(const std::vector<uint32_t>& s, size_t i, bool (*pred)(uint32_t)) {
  size_t j = i;
  while (j < s.size() && pred(s[j])) ++j;
  return j - i;
}

size_t contraction(const std::vector<uint32_t>& s, size_t i, bool any_case) {
  if (s[i] != '\'' || i + 1 >= s.size()) return 0;
  auto lower = [&](size_t k) -> uint32_t {
    if (k >= s.size()) return 0;
    return any_case && s[k] >= 'A' && s[k] <= 'Z' ? s[k] + 32 : s[k];
  };
  uint32_t a = lower(i + 1), b = lower(i + 2);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  return 0;
}

// \s+(?!\S): a whitespace run, less its last character when a non-space follows it
size_t spaces_not_before_text(const std::vector<uint32_t>& s, size_t i) {
  size_t run = run_of(s, i, is_space);
  if (run == 0) return 0;
  if (i + run == s.size()) return run;
  return run - 1;
}

size_t match_gpt2(const std::vector<uint32_t>& s, size_t i) {
  if (size_t n = contraction(s, i, false)) return n;
  size_t lead = s[i] == ' ' && i + 1 < s.size() ? 1 : 0;
  for (auto pred : {is_letter, is_number, is_other}) {
    if (lead && pred(s[i + 1])) return 1 + run_of(s, i + 1, pred);
    if (pred(s[i])) return run_of(s, i, pred);
  }
  return spaces_not_before_text(s, i);
}

size_t match_llama3_like(const std::vector<uint32_t>& s, size_t i, size_t max_digits) {
  if (size_t n = contraction(s, i, true)) return n;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (is_letter(s[i])) return run_of(s, i, is_letter);
  if (!is_newline(s[i]) && !is_number(s[i]) && i + 1 < s.size() && is_letter(s[i + 1]))
    return 1 + run_of(s, i + 1, is_letter);
  // \p{N}{1,3}
  if (is_number(s[i])) return std::min(max_digits, run_of(s, i, is_number));
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  size_t lead = s[i] == ' ' && i + 1 < s.size() && is_other(s[i + 1]) ? 1 : 0;
  if (lead || is_other(s[i])) {
    size_t j = i + lead;
    j += run_of(s, j, is_other);
    return j + run_of(s, j, is_newline) - i;
  }
  // \s*[\r\n]+: the whitespace run up to and including its last newline
  size_t run = run_of(s, i, is_space);
  for (size_t k = i + run; k > i; --k) {
    if (is_newline(s[k - 1])) return k - i;
  }
  // \s+(?!\S), then \s+
  size_t n = spaces_not_before_text(s, i);
  return n ? n : run;
}

size_t match_llama3(const std::vector<uint32_t>& s, size_t i) { return match_llama3_like(s, i, 3); }
size_t match_qwen2(const std::vector<uint32_t>& s, size_t i) { return match_llama3_like(s, i, 1); }
size_t match_digit(const std::vector<uint32_t>& s, size_t i) { return is_number(s[i]) ? 1 : 0; }

// Split text[begin, end) like Split(regex, "isolated"): each match a piece, each gap between matches a piece.
void split_isolated(const std::string& text, size_t begin, size_t end, Matcher match,
                    std::vector<std::pair<size_t, size_t>>& out) {
  CodePoints cps = decode_utf8(text, begin, end);
  size_t n = cps.cp.size(), gap = 0, i = 0;
  while (i < n) {
    size_t len = match(cps.cp, i);
    if (len == 0) {
      ++i;
      continue;
    }
    if (gap < i) out.emplace_back(cps.offset[gap], cps.offset[i]);
    out.emplace_back(cps.offset[i], cps.offset[i + len]);
    i += len;
    gap = i;
  }
  if (gap < n) out.emplace_back(cps.offset[gap], cps.offset[n]);
}

}  // namespace

std::vector<std::string> pre_tokenize(PreTokenizer pre, const std::string& text) {
  std::vector<Matcher> steps;
  switch (pre) {
    case PreTokenizer::kNone: return {text};
    case PreTokenizer::kGpt2: steps = {match_gpt2}; break;
    case PreTokenizer::kSmolLM: steps = {match_digit, match_gpt2}; break;
    case PreTokenizer::kLlama3: steps = {match_llama3}; break;
    case PreTokenizer::kQwen2: steps = {match_qwen2}; break;
  }
  std::vector<std::pair<size_t, size_t>> pieces = {{0, text.size()}};
  for (Matcher step : steps) {
    std::vector<std::pair<size_t, size_t>> next;
    for (auto [b, e] : pieces) split_isolated(text, b, e, step, next);
    pieces.swap(next);
  }
  std::vector<std::string> out;
  out.reserve(pieces.size());
  for (auto [b, e] : pieces) out.emplace_back(text, b, e - b);
  return out;
}

}  // namespace torchat
