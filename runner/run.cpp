// run: generate or chat with an exported torchat model (runner-aoti: .pt2/.so, runner-et: .pte).
//
//   run MODEL -z tokenizer.bin -i "PROMPT" [-t 0.0] [-p 1.0] [-n 256] [-s SEED] [-m generate|chat] [-y SYSTEM] [-v]
//
// Generation follows torchat/generate.py step for step (one prefill of the prompt, then one token per call,
// stopping at a stop id, after -n tokens or when the KV cache is full), so greedy ids equal the Python loader's.
// Chat follows torchat/chat.py: each turn renders the whole conversation and prefills only what the KV cache
// does not already hold. Errors are one line on stderr and a non-zero exit. stdout holds the text (each answer
// ending in a newline); the stats line, and the backend's own log lines only with -v, go to stderr.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "chat.h"
#include "model.h"
#include "sampler.h"
#include "tokenizer.h"

namespace torchat {
namespace {

const char kUsage[] =
    "usage: run MODEL [-z TOKENIZER] [options]\n"
    "  MODEL          an exported artifact (%s) from `torchat export`\n"
    "  -z PATH        tokenizer.bin from `torchat tokenizer-bin` (or `doit tokenizer:MODEL`); default: the\n"
    "                 tokenizer.bin beside MODEL\n"
    "  -i TEXT        the prompt (chat: the first user message; further ones are read from stdin)\n"
    "  -t FLOAT       temperature, 0 (default) is greedy\n"
    "  -p FLOAT       top-p in (0, 1], default 1 (off)\n"
    "  -n INT         the most tokens to generate (per answer in chat), default 256\n"
    "  -s INT         random seed, default the time\n"
    "  -m MODE        generate (default) or chat\n"
    "  -y TEXT        chat: the system prompt\n"
    "  -o FORMAT      text (default) or ids: each answer's generated ids (with the stop id), one line each\n"
    "  -v, --verbose  also show the backend's informational log lines (ExecuTorch's `I 00:00:00.000 ...`)\n";

struct Options {
  std::string model, tokenizer, prompt, mode = "generate", system, output = "text";
  bool has_prompt = false;
  float temperature = 0.0f, top_p = 1.0f;
  int64_t steps = 256;
  uint64_t seed = 0;
  bool has_seed = false;
  bool verbose = false;
};

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "run: error: %s (see run -h)\n", message.c_str());
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options o;
  if (argc >= 2 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help")) {
    std::printf(kUsage, kSuffixes);
    std::exit(0);
  }
  if (argc < 2 || argv[1][0] == '-') usage_error("the first argument is the model file");
  o.model = argv[1];
  for (int i = 2; i < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "-v" || flag == "--verbose") {  // the one flag without a value
      o.verbose = true;
      --i;
      continue;
    }
    if (flag.size() != 2 || flag[0] != '-') usage_error("unexpected argument '" + flag + "'");
    if (i + 1 >= argc) usage_error("flag " + flag + " needs a value");
    std::string value = argv[i + 1];
    auto number = [&](auto parse) {
      try {
        size_t used = 0;
        auto parsed = parse(value, &used);
        if (used != value.size()) throw std::invalid_argument(value);
        return parsed;
      } catch (const std::exception&) {
        usage_error("flag " + flag + " needs a number, got '" + value + "'");
      }
    };
    auto to_float = [](const std::string& s, size_t* used) { return std::stof(s, used); };
    auto to_int = [](const std::string& s, size_t* used) { return std::stoll(s, used); };
    switch (flag[1]) {
      case 'z': o.tokenizer = value; break;
      case 'i': o.prompt = value; o.has_prompt = true; break;
      case 't': o.temperature = number(to_float); break;
      case 'p': o.top_p = number(to_float); break;
      case 'n': o.steps = number(to_int); break;
      case 's': o.seed = static_cast<uint64_t>(number(to_int)); o.has_seed = true; break;
      case 'm': o.mode = value; break;
      case 'y': o.system = value; break;
      case 'o': o.output = value; break;
      default: usage_error("unknown flag " + flag);
    }
  }
  if (o.mode != "generate" && o.mode != "chat") usage_error("-m is generate or chat, not '" + o.mode + "'");
  if (o.output != "text" && o.output != "ids") usage_error("-o is text or ids, not '" + o.output + "'");
  if (!(o.temperature >= 0) || !(o.top_p > 0 && o.top_p <= 1)) usage_error("need -t >= 0 and 0 < -p <= 1");
  if (o.steps < 1) usage_error("-n must be at least 1");
  return o;
}

struct Stats {
  int64_t prompt_tokens = 0, new_tokens = 0;
  double prefill_s = 0, decode_s = 0;
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Yields (through `emit`) the new ids after `prompt` at positions start_pos..; the stop id that ends it included.
std::vector<int32_t> generate(Model& model, const Tokenizer& tokenizer, Sampler& sampler,
                              const std::vector<int32_t>& prompt, int64_t start_pos, int64_t max_new_tokens,
                              Stats& stats, const std::function<void(int32_t)>& emit) {
  int64_t max_seq_len = model.info().max_seq_len;
  if (prompt.empty()) throw RunnerError("the prompt is empty; pass -i TEXT");
  int64_t end_of_prompt = start_pos + static_cast<int64_t>(prompt.size());
  if (end_of_prompt > max_seq_len) {
    throw RunnerError("the prompt ends at position " + std::to_string(end_of_prompt) + ", beyond the context of " +
                      std::to_string(max_seq_len) + " tokens; shorten it or re-export with a larger --max-seq-length");
  }
  std::vector<int32_t> produced;
  int64_t budget = std::min(max_new_tokens, max_seq_len - end_of_prompt + 1);
  auto start = std::chrono::steady_clock::now();
  std::vector<int64_t> input(prompt.begin(), prompt.end());
  int32_t token = sampler.sample(model.forward(input, start_pos));
  stats.prompt_tokens += static_cast<int64_t>(prompt.size());
  stats.prefill_s += seconds_since(start);
  start = std::chrono::steady_clock::now();
  int64_t pos = end_of_prompt;
  for (int64_t n = 1; n <= budget; ++n) {
    produced.push_back(token);
    emit(token);
    if (tokenizer.is_stop(token) || n == budget) break;
    token = sampler.sample(model.forward({token}, pos));
    ++pos;
  }
  stats.new_tokens += static_cast<int64_t>(produced.size());
  stats.decode_s += seconds_since(start);
  return produced;
}

class Printer {
 public:
  Printer(const Tokenizer& tokenizer, bool ids) : tokenizer_(tokenizer), ids_(ids) {}
  void start() { first_ = true; }
  void operator()(int32_t id) {
    if (ids_) {
      std::printf(first_ ? "%d" : " %d", id);
    } else if (!tokenizer_.is_control(id)) {  // special tokens print nothing
      std::string text = tokenizer_.token_bytes(id);
      if (first_ && answer_ && !text.empty() && text[0] == ' ') text.erase(0, 1);  // the answer's leading space
      std::fwrite(text.data(), 1, text.size(), stdout);
    }
    first_ = false;
    std::fflush(stdout);
  }
  bool answer_ = false;  // chat: strip the leading space of an answer's first token

 private:
  const Tokenizer& tokenizer_;
  bool ids_;
  bool first_ = true;
};

size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}

void run_generate(Model& model, const Tokenizer& tokenizer, Sampler& sampler, const Options& o, Stats& stats) {
  std::vector<int32_t> prompt;
  if (tokenizer.add_bos()) prompt.push_back(tokenizer.bos_id());
  for (int32_t id : tokenizer.encode(o.prompt)) prompt.push_back(id);
  Printer print(tokenizer, o.output == "ids");
  if (o.output == "text") std::fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
  generate(model, tokenizer, sampler, prompt, 0, o.steps, stats, [&](int32_t id) {
    if (o.output == "ids" || !tokenizer.is_stop(id)) print(id);
  });
  // flushed now: a piped stdout is block-buffered, and the stats line written to stderr next would otherwise
  // land before this newline wherever both streams go to one place ("...withachieved tok/s")
  std::printf("\n");
  std::fflush(stdout);
}

void run_chat(Model& model, const Tokenizer& tokenizer, Sampler& sampler, const Options& o, Stats& stats) {
  std::vector<Message> messages;
  if (!o.system.empty()) messages.push_back({"system", o.system});
  std::vector<int32_t> fed;  // the ids at cache positions 0 .. fed.size()-1
  int64_t max_seq_len = model.info().max_seq_len;
  int64_t reserve = std::min(o.steps, max_seq_len / 4);
  Printer print(tokenizer, o.output == "ids");
  print.answer_ = true;
  std::string line = o.prompt;
  bool have = o.has_prompt;
  while (have || std::getline(std::cin, line)) {
    have = false;
    if (line.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    std::vector<Message> turn = messages;
    turn.push_back({"user", line});
    std::vector<int32_t> ids = render_chat(tokenizer, turn);
    while (static_cast<int64_t>(ids.size()) + reserve > max_seq_len) {  // drop the oldest user turn and answer
      size_t first = !turn.empty() && turn[0].role == "system" ? 1 : 0;
      if (turn.size() - first <= 1) {
        throw RunnerError("this message alone needs " + std::to_string(ids.size()) + " tokens of the " +
                          std::to_string(max_seq_len) + "-token context; shorten it");
      }
      auto oldest = turn.begin() + static_cast<std::ptrdiff_t>(first);
      turn.erase(oldest, oldest + 2);
      ids = render_chat(tokenizer, turn);
      std::fprintf(stderr, "[context full: dropped the oldest turn to fit %lld tokens]\n",
                   static_cast<long long>(max_seq_len));
    }
    size_t start = std::min(common_prefix(fed, ids), ids.size() - 1);  // prefill at least one token
    std::vector<int32_t> fresh(ids.begin() + static_cast<std::ptrdiff_t>(start), ids.end());
    print.start();
    auto produced = generate(model, tokenizer, sampler, fresh, static_cast<int64_t>(start), o.steps, stats,
                             [&](int32_t id) {
                               if (o.output == "ids" || !tokenizer.is_stop(id)) print(id);
                             });
    std::printf("\n");
    std::fflush(stdout);
    fed = ids;
    fed.insert(fed.end(), produced.begin(), produced.end() - 1);  // the last one never went through the model
    std::vector<int32_t> answer;
    for (int32_t id : produced) {
      if (!tokenizer.is_stop(id)) answer.push_back(id);
    }
    turn.push_back({"assistant", tokenizer.decode(answer)});
    messages = turn;
  }
}

int run_main(int argc, char** argv) {
  Options o = parse_options(argc, argv);
  set_backend_verbose(o.verbose);
  if (o.mode == "generate" && !o.has_prompt) usage_error("pass the prompt with -i TEXT");
  if (o.tokenizer.empty()) {
    size_t slash = o.model.rfind('/');
    o.tokenizer = (slash == std::string::npos ? std::string() : o.model.substr(0, slash + 1)) + "tokenizer.bin";
    if (!std::ifstream(o.tokenizer)) {
      throw RunnerError("no tokenizer.bin beside " + o.model + "; pass one with -z (write it with `torchat "
                        "tokenizer-bin --tokenizer-path TOKENIZER --output tokenizer.bin`)");
    }
  }
  Tokenizer tokenizer(o.tokenizer);
  std::unique_ptr<Model> model = load_model(o.model);
  const ModelInfo& info = model->info();
  if (tokenizer.vocab_size() > info.vocab_size) {
    throw RunnerError(o.tokenizer + ": " + std::to_string(tokenizer.vocab_size()) + " tokens, but " + o.model +
                      " has " + std::to_string(info.vocab_size) + "; pass the model's own tokenizer.bin");
  }
  bool bos_differs = info.bos_id >= 0 && info.bos_id != tokenizer.bos_id();
  if (bos_differs || (info.eos_id >= 0 && info.eos_id != tokenizer.eos_id())) {
    throw RunnerError(o.tokenizer + ": BOS/EOS " + std::to_string(tokenizer.bos_id()) + "/" +
                      std::to_string(tokenizer.eos_id()) + " differ from the model's " + std::to_string(info.bos_id) +
                      "/" + std::to_string(info.eos_id) + "; pass the model's own tokenizer.bin");
  }
  Sampler sampler(o.temperature, o.top_p, o.has_seed ? o.seed : static_cast<uint64_t>(std::time(nullptr)));
  Stats stats;
  if (o.mode == "chat") {
    run_chat(*model, tokenizer, sampler, o, stats);
  } else {
    run_generate(*model, tokenizer, sampler, o, stats);
  }
  // the first new token comes from the prefill; decode made the rest
  double decode_rate = stats.new_tokens > 1 ? (stats.new_tokens - 1) / std::max(stats.decode_s, 1e-9) : 0.0;
  double overall = stats.new_tokens / std::max(stats.prefill_s + stats.decode_s, 1e-9);
  std::fflush(stdout);  // the text ends (with its newline) before the stats line starts
  std::fprintf(stderr,
               "achieved tok/s: %.2f (prompt %lld tok, prefill %.1f tok/s; "
               "generated %lld tok, decode %.2f tok/s; %s)\n",
               overall, static_cast<long long>(stats.prompt_tokens),
               stats.prompt_tokens / std::max(stats.prefill_s, 1e-9),
               static_cast<long long>(stats.new_tokens), decode_rate, kBackend);
  return 0;
}

}  // namespace
}  // namespace torchat

int main(int argc, char** argv) {
  try {
    return torchat::run_main(argc, argv);
  } catch (const torchat::RunnerError& error) {
    std::fprintf(stderr, "run: error: %s\n", error.what());
  } catch (const std::exception& error) {
    std::string what = error.what();
    std::fprintf(stderr, "run: error: %s\n", what.substr(0, what.find('\n')).c_str());
  }
  return 1;
}
