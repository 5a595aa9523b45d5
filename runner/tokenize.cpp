// tokenize: the C++ tokenizer alone, for parity tests against the Python tokenizers.
//
//   tokenize tokenizer.bin [--special] < texts     texts separated by NUL bytes; one line of ids per text
//   tokenize tokenizer.bin --decode < id lines      one line of ids per text; each text as "LENGTH\nBYTES"
//
// --special encodes special tokens' spellings as their ids (what a chat template does).
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "tokenizer.h"

int main(int argc, char** argv) {
  std::string mode = argc == 3 ? argv[2] : "";
  if (argc < 2 || argc > 3 || (argc == 3 && mode != "--special" && mode != "--decode")) {
    std::fprintf(stderr, "usage: tokenize tokenizer.bin [--special | --decode] < NUL-separated texts\n");
    return 2;
  }
  try {
    torchat::Tokenizer tokenizer(argv[1]);
    bool special = mode == "--special";
    std::string text;
    if (mode == "--decode") {
      while (std::getline(std::cin, text)) {
        std::vector<int32_t> ids;
        size_t pos = 0;
        while (pos < text.size()) {
          size_t used = 0;
          ids.push_back(std::stoi(text.substr(pos), &used));
          pos += used;
        }
        std::string decoded = tokenizer.decode(ids);
        std::printf("%zu\n", decoded.size());
        std::fwrite(decoded.data(), 1, decoded.size(), stdout);
      }
      return 0;
    }
    while (std::getline(std::cin, text, '\0')) {
      auto ids = special ? tokenizer.encode_with_special(text) : tokenizer.encode(text);
      std::string line;
      for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
      std::printf("%s\n", line.c_str());
    }
  } catch (const torchat::RunnerError& error) {
    std::fprintf(stderr, "tokenize: error: %s\n", error.what());
    return 1;
  }
  return 0;
}
