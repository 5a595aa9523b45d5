// The AOT Inductor model: a .pt2 package (AOTIModelPackageLoader) or a bare .so (AOTIModelContainerRunnerCpu),
// with libtorch from the pip torch. The metadata JSON is the package's "torchat" metadata key, or the .so's trailer.
#ifndef TORCHAT_BACKEND_AOTI
#error "model_aoti.cpp is runner-aoti's backend; compile it with TORCHAT_BACKEND_AOTI"
#endif

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/inductor/aoti_runner/model_container_runner_cpu.h>

#include <cstring>
#include <fstream>

#include "model.h"
#include "tokenizer.h"

namespace torchat {
namespace {

constexpr char kDsoTrailerMagic[] = "TORCHAT1";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// <json bytes><u64 little-endian length><b"TORCHAT1"> after the ELF image
std::string read_dso_trailer(const std::string& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  auto size = static_cast<uint64_t>(file.tellg());
  if (file && size > 16) {
    char tail[16];
    file.seekg(static_cast<std::streamoff>(size - 16));
    file.read(tail, 16);
    uint64_t length;
    std::memcpy(&length, tail, 8);
    if (file && std::memcmp(tail + 8, kDsoTrailerMagic, 8) == 0 && length <= size - 16) {
      std::string json(length, '\0');
      file.seekg(static_cast<std::streamoff>(size - 16 - length));
      file.read(json.data(), static_cast<std::streamsize>(length));
      if (file) return json;
    }
  }
  throw RunnerError(path + ": no torchat metadata trailer; export it with `torchat export --output-dso-path`");
}

class AOTIModel : public Model {
 public:
  explicit AOTIModel(const std::string& path) {
    std::string json;
    if (ends_with(path, ".pt2")) {
      package_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
      auto metadata = package_->get_metadata();
      if (metadata.count("torchat") == 0)
        throw RunnerError(path + ": an AOTI package without torchat metadata; export it with `torchat export`");
      json = metadata["torchat"];
    } else {
      json = read_dso_trailer(path);
      dso_ = std::make_unique<torch::inductor::AOTIModelContainerRunnerCpu>(path, 1);
    }
    if (json.find("\"device\": \"cpu\"") == std::string::npos)  // json.dumps's spelling of the metadata
      throw RunnerError(path + ": exported for another device than cpu; runner-aoti drives CPU artifacts, export "
                        "with --device cpu");
    info_.max_seq_len = json_int(json, {"max_seq_len"}, 0);
    info_.vocab_size = json_int(json, {"model_args", "vocab_size"}, 0);
    info_.bos_id = json_int(json, {"bos_id"}, -1);
    info_.eos_id = json_int(json, {"eos_id"}, -1);
    if (info_.max_seq_len <= 0 || info_.vocab_size <= 0)
      throw RunnerError(path + ": its metadata lacks max_seq_len or model_args.vocab_size; re-export it");
  }

  std::vector<float> forward(const std::vector<int64_t>& tokens, int64_t start_pos) override {
    c10::InferenceMode guard;
    auto n = static_cast<int64_t>(tokens.size());
    at::Tensor input = at::from_blob(const_cast<int64_t*>(tokens.data()), {1, n}, at::kLong).clone();
    at::Tensor positions = at::arange(start_pos, start_pos + n, at::kLong);
    std::vector<at::Tensor> outputs = package_ ? package_->run({input, positions}) : dso_->run({input, positions});
    at::Tensor last = outputs.at(0).select(1, n - 1).reshape({-1}).to(at::kFloat).contiguous();  // (vocab,)
    const float* data = last.data_ptr<float>();
    return std::vector<float>(data, data + last.numel());
  }

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package_;
  std::unique_ptr<torch::inductor::AOTIModelContainerRunnerCpu> dso_;
};

}  // namespace

// libtorch logs nothing on a normal run of an AOTI artifact, so there is nothing for -v to switch on.
void set_backend_verbose(bool) {}

std::unique_ptr<Model> load_model(const std::string& path) {
  if (!ends_with(path, ".pt2") && !ends_with(path, ".so"))
    throw RunnerError(path + ": runner-aoti runs .pt2 or .so artifacts (`torchat export`); for .pte use runner-et");
  if (!std::ifstream(path)) throw RunnerError(path + ": no such model file");
  try {
    return std::make_unique<AOTIModel>(path);
  } catch (const c10::Error& error) {
    std::string what = error.what_without_backtrace();
    throw RunnerError(path + ": AOT Inductor cannot load it (" + what.substr(0, what.find('\n')) +
                      "); re-export it with `torchat export`");
  }
}

}  // namespace torchat
