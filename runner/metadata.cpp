// A minimal JSON reader for the artifact metadata (torchat/exported.py's ArtifactMetadata.to_json()).
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "model.h"
#include "tokenizer.h"

namespace torchat {
namespace {

class JsonScanner {
 public:
  explicit JsonScanner(const std::string& text) : s_(text) {}

  // the integer at `path` below the value starting here; sets found_ when it is there
  void find(const std::vector<std::string>& path, size_t depth) {
    ws();
    if (peek() == '{') {
      ++i_;
      ws();
      if (peek() == '}') {
        ++i_;
        return;
      }
      while (true) {
        std::string key = string();
        ws();
        expect(':');
        if (depth < path.size() && key == path[depth]) {
          find(path, depth + 1);
        } else {
          skip();
        }
        ws();
        if (peek() == ',') {
          ++i_;
          ws();
          continue;
        }
        expect('}');
        return;
      }
    }
    if (depth == path.size() && (peek() == '-' || std::isdigit(static_cast<unsigned char>(peek())))) {
      size_t start = i_;
      skip();
      value_ = std::strtoll(s_.c_str() + start, nullptr, 10);
      found_ = true;
      return;
    }
    skip();
  }

  bool found_ = false;
  int64_t value_ = 0;

 private:
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  void expect(char c) {
    if (peek() != c) throw RunnerError(std::string("malformed metadata JSON: expected '") + c + "'");
    ++i_;
  }
  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') ++i_;
      if (i_ < s_.size()) out += s_[i_++];
    }
    expect('"');
    return out;
  }
  void skip() {  // any value
    ws();
    char c = peek();
    if (c == '"') {
      string();
    } else if (c == '{' || c == '[') {
      char close = c == '{' ? '}' : ']';
      ++i_;
      ws();
      if (peek() == close) {
        ++i_;
        return;
      }
      while (true) {
        ws();
        if (c == '{') {
          string();
          ws();
          expect(':');
        }
        skip();
        ws();
        if (peek() == ',') {
          ++i_;
          continue;
        }
        expect(close);
        return;
      }
    } else {
      while (i_ < s_.size() && std::string(",}] \n\t\r").find(s_[i_]) == std::string::npos) ++i_;
    }
  }

  const std::string& s_;
  size_t i_ = 0;
};

}  // namespace

int64_t json_int(const std::string& json, const std::vector<std::string>& path, int64_t fallback) {
  JsonScanner scanner(json);
  scanner.find(path, 0);
  return scanner.found_ ? scanner.value_ : fallback;
}

}  // namespace torchat
