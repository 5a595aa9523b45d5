// The ExecuTorch model: a .pte (XNNPACK-delegated) run by the C++ libraries the executorch pip wheel ships.
// The metadata is the program's constant method get_torchat_metadata (torchat/lowering/et.py).
#ifndef TORCHAT_BACKEND_ET
#error "model_et.cpp is runner-et's backend; compile it with TORCHAT_BACKEND_ET"
#endif

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>

#include <cstdio>
#include <fstream>

#include "model.h"
#include "tokenizer.h"

namespace torchat {
namespace {

using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

std::string error_name(Error error) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "ExecuTorch error 0x%x", static_cast<unsigned>(error));
  return buf;
}

class ETModel : public Model {
 public:
  // share_memory_arenas: a .pte's forward methods write one KV cache (torchat/lowering/et.py lower_et)
  explicit ETModel(const std::string& path)
      : path_(path), module_(path, Module::LoadMode::MmapUseMlockIgnoreErrors, nullptr, nullptr, nullptr, true) {
    // forward_last: the last position's logits only, so a prompt skips the output layer for the others; a .pte
    // exported before it has forward alone
    auto names = module_.method_names();
    method_ = names.ok() && names->count("forward_last") ? "forward_last" : "forward";
    Error loaded = module_.load_method(method_);
    if (loaded != Error::Ok)
      throw RunnerError(path + ": ExecuTorch cannot load it (" + error_name(loaded) +
                        "); re-export it with `torchat export --output-pte-path`");
    auto json = module_.execute("get_torchat_metadata");
    if (!json.ok() || json->empty() || !json->at(0).isString())
      throw RunnerError(path + ": a .pte without torchat metadata; export it with `torchat export`");
    std::string text(json->at(0).toString());
    info_.max_seq_len = json_int(text, {"max_seq_len"}, 0);
    info_.vocab_size = json_int(text, {"model_args", "vocab_size"}, 0);
    info_.bos_id = json_int(text, {"bos_id"}, -1);
    info_.eos_id = json_int(text, {"eos_id"}, -1);
    if (info_.max_seq_len <= 0 || info_.vocab_size <= 0)
      throw RunnerError(path + ": its metadata lacks max_seq_len or model_args.vocab_size; re-export it");
  }

  std::vector<float> forward(const std::vector<int64_t>& tokens, int64_t start_pos) override {
    auto n = static_cast<executorch::aten::SizesType>(tokens.size());
    std::vector<int64_t> ids(tokens), positions(tokens.size());
    for (size_t i = 0; i < positions.size(); ++i) positions[i] = start_pos + static_cast<int64_t>(i);
    auto input = executorch::extension::from_blob(ids.data(), {1, n}, executorch::aten::ScalarType::Long);
    auto pos = executorch::extension::from_blob(positions.data(), {n}, executorch::aten::ScalarType::Long);
    auto result = module_.execute(method_, {EValue(input), EValue(pos)});
    if (!result.ok()) throw RunnerError(path_ + ": forward failed (" + error_name(result.error()) + ")");
    const auto& logits = result->at(0).toTensor();  // (1, n or 1, vocab) float32
    if (logits.scalar_type() != executorch::aten::ScalarType::Float)
      throw RunnerError(path_ + ": logits are not float32; this runner reads fp32 programs");
    auto vocab = static_cast<size_t>(logits.size(2));
    const float* last = logits.const_data_ptr<float>() + static_cast<size_t>(logits.size(1) - 1) * vocab;
    return std::vector<float>(last, last + vocab);
  }

 private:
  std::string path_;
  Module module_;
  std::string method_;
};

}  // namespace

// ExecuTorch's logging goes through its platform layer (PAL), whose default writes every message to stderr; the
// wheel's libraries are built with Info as the lowest level (ET_MIN_LOG_LEVEL is fixed when they are compiled, so
// this project's compile definitions cannot lower it), hence `I ... cpuinfo_utils.cpp ...` on every run. The PAL's
// log hook can be replaced at run time: ours passes errors on to the default writer and the rest only with -v.
namespace {

bool g_verbose = false;
pal_emit_log_message_method g_default_emit = nullptr;  // the PAL default (posix: to stderr)

void emit_log_message(et_timestamp_t timestamp, et_pal_log_level_t level, const char* filename,
                      const char* function, size_t line, const char* message, size_t length) {
  if (g_verbose || level == kError || level == kFatal) {
    g_default_emit(timestamp, level, filename, function, line, message, length);
  }
}

}  // namespace

void set_backend_verbose(bool verbose) {
  g_verbose = verbose;
  if (g_default_emit == nullptr) {
    g_default_emit = executorch::runtime::get_pal_impl()->emit_log_message;
    if (g_default_emit == nullptr) g_default_emit = et_pal_emit_log_message;
    executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_log_message, __FILE__));
  }
}

std::unique_ptr<Model> load_model(const std::string& path) {
  if (path.size() < 4 || path.compare(path.size() - 4, 4, ".pte") != 0)
    throw RunnerError(path + ": runner-et runs .pte artifacts (`torchat export --output-pte-path`); for .pt2/.so "
                      "use runner-aoti");
  if (!std::ifstream(path)) throw RunnerError(path + ": no such model file");
  return std::make_unique<ETModel>(path);
}

}  // namespace torchat
