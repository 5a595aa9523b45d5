// ChatML (the Jinja template SmolLM2's GGUF carries, recognised by the writer), Meta's Llama-3 headers and
// Llama-2 [INST]; each mirrors its torchat/templates.py counterpart token for token.
#include "chat.h"

namespace torchat {
namespace {

std::string strip(const std::string& s) {  // Python's str.strip() on ASCII whitespace
  const char* space = " \t\n\r\f\v";
  size_t b = s.find_first_not_of(space);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(space) - b + 1);
}

int32_t need_special(const Tokenizer& tokenizer, const std::string& spelling) {
  int32_t id = tokenizer.special_id(spelling);
  if (id < 0) throw RunnerError(tokenizer.path() + ": the chat format needs " + spelling + ", which it lacks");
  return id;
}

void append(std::vector<int32_t>& ids, const std::vector<int32_t>& more) {
  ids.insert(ids.end(), more.begin(), more.end());
}

std::vector<int32_t> render_chatml(const Tokenizer& tokenizer, const std::vector<Message>& messages) {
  std::string text;
  if (!tokenizer.default_system().empty() && (messages.empty() || messages[0].role != "system"))
    text += "<|im_start|>system\n" + tokenizer.default_system() + "<|im_end|>\n";
  for (const Message& m : messages) text += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  text += "<|im_start|>assistant\n";
  return tokenizer.encode_with_special(text);
}

std::vector<int32_t> render_llama3(const Tokenizer& tokenizer, const std::vector<Message>& messages) {
  int32_t start = need_special(tokenizer, "<|start_header_id|>"), end = need_special(tokenizer, "<|end_header_id|>");
  int32_t eot = need_special(tokenizer, "<|eot_id|>");
  auto header = [&](std::vector<int32_t>& ids, const std::string& role) {
    ids.push_back(start);
    append(ids, tokenizer.encode(role));
    ids.push_back(end);
    append(ids, tokenizer.encode("\n\n"));
  };
  std::vector<int32_t> ids = {need_special(tokenizer, "<|begin_of_text|>")};
  for (const Message& m : messages) {
    header(ids, m.role);
    append(ids, tokenizer.encode(strip(m.content)));
    ids.push_back(eot);
  }
  header(ids, "assistant");
  return ids;
}

std::vector<int32_t> render_llama2(const Tokenizer& tokenizer, const std::vector<Message>& messages) {
  if (tokenizer.bos_id() < 0 || tokenizer.eos_id() < 0)
    throw RunnerError(tokenizer.path() + ": the llama2 chat format needs BOS and EOS tokens");
  std::vector<Message> rest = messages;
  if (!rest.empty() && rest[0].role == "system") {
    std::string system = strip(rest[0].content);
    rest.erase(rest.begin());
    if (!rest.empty()) rest[0].content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + strip(rest[0].content);
  }
  std::vector<int32_t> ids;
  for (size_t i = 0; i < rest.size(); i += 2) {
    ids.push_back(tokenizer.bos_id());
    if (i + 1 < rest.size()) {
      std::string turn = "[INST] " + strip(rest[i].content) + " [/INST] " + strip(rest[i + 1].content) + " ";
      append(ids, tokenizer.encode(turn));
      ids.push_back(tokenizer.eos_id());
    } else {
      append(ids, tokenizer.encode("[INST] " + strip(rest[i].content) + " [/INST]"));
    }
  }
  return ids;
}

}  // namespace

std::vector<int32_t> render_chat(const Tokenizer& tokenizer, const std::vector<Message>& messages) {
  switch (tokenizer.chat_format()) {
    case ChatFormat::kChatML: return render_chatml(tokenizer, messages);
    case ChatFormat::kLlama3: return render_llama3(tokenizer, messages);
    case ChatFormat::kLlama2: return render_llama2(tokenizer, messages);
    case ChatFormat::kNone: break;
  }
  throw RunnerError(tokenizer.path() + ": records no chat format this runner renders; write it with "
                    "`torchat tokenizer-bin --chat-format chatml|llama3|llama2`, or use -m generate");
}

}  // namespace torchat
