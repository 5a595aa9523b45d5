// tokenize: the C++ tokenizer alone, for parity tests against the Python tokenizers.
//
//   tokenize tokenizer.bin [--special] < texts     texts separated by NUL bytes; one line of ids per text
//
// --special encodes special tokens' spellings as their ids (what a chat template does).
#include <cstdio>
#include <iostream>
#include <iterator>
#include <string>

#include "tokenizer.h"

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3 || (argc == 3 && std::string(argv[2]) != "--special")) {
    std::fprintf(stderr, "usage: tokenize tokenizer.bin [--special] < NUL-separated texts\n");
    return 2;
  }
  try {
    torchat::Tokenizer tokenizer(argv[1]);
    bool special = argc == 3;
    std::string text;
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
