// Chat formats (the kind tokenizer.bin records) rendered to prompt ids, as torchat/templates.py renders them.
#pragma once

#include <string>
#include <vector>

#include "tokenizer.h"

namespace torchat {

struct Message {
  std::string role;  // system, user or assistant
  std::string content;
};

// The whole conversation's ids, with the prompt for the assistant's answer at the end.
std::vector<int32_t> render_chat(const Tokenizer& tokenizer, const std::vector<Message>& messages);

}  // namespace torchat
