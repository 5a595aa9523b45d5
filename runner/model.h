// The exported model behind one small interface; runner-aoti/ and runner-et/ each compile one implementation,
// chosen by the compile definition their CMakeLists.txt sets.
#pragma once

#if defined(TORCHAT_BACKEND_AOTI) + defined(TORCHAT_BACKEND_ET) != 1
// runner-aoti/ and runner-et/ CMakeLists.txt each define one
#error "define exactly one of TORCHAT_BACKEND_AOTI or TORCHAT_BACKEND_ET"
#endif

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace torchat {

#if defined(TORCHAT_BACKEND_AOTI)
constexpr const char* kBackend = "aoti";
constexpr const char* kSuffixes = ".pt2 or .so";
#else
constexpr const char* kBackend = "et";
constexpr const char* kSuffixes = ".pte";
#endif

// What the artifact says about itself (torchat/exported.py: the metadata JSON inside .pt2, .so and .pte).
struct ModelInfo {
  int64_t max_seq_len = 0;  // the KV cache: positions 0 .. max_seq_len-1
  int64_t vocab_size = 0;
  int64_t bos_id = -1;      // -1: the artifact names none
  int64_t eos_id = -1;
};

class Model {
 public:
  virtual ~Model() = default;
  // logits (vocab_size,) of the last of `tokens`, fed at positions start_pos .. start_pos+len-1
  virtual std::vector<float> forward(const std::vector<int64_t>& tokens, int64_t start_pos) = 0;
  const ModelInfo& info() const { return info_; }

 protected:
  ModelInfo info_;
};

// Whether the backend's own informational log lines reach stderr (-v); call before load_model. Its errors
// always do, since they explain the one-line error that follows.
void set_backend_verbose(bool verbose);

// The artifact at `path`; throws RunnerError (a missing, foreign or corrupt file) with the file named.
std::unique_ptr<Model> load_model(const std::string& path);

// An integer at `path` (object keys) in a JSON text; `fallback` when absent or null. Enough JSON for the metadata.
int64_t json_int(const std::string& json, const std::vector<std::string>& path, int64_t fallback);

}  // namespace torchat
