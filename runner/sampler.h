// Sampling one id from logits, as torchat/generate.py's sample(): greedy at temperature 0, else softmax of
// logits/temperature, cut to the top-p nucleus (a token is dropped once the tokens before it hold top_p of the
// mass; the first always stays), drawn with a seeded xorshift generator (llama2.c's).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace torchat {

class Sampler {
 public:
  Sampler(float temperature, float top_p, uint64_t seed)
      : temperature_(temperature), top_p_(top_p), state_(seed ? seed : 0x9E3779B97F4A7C15ull) {}

  int32_t sample(const std::vector<float>& logits) {
    // torch.argmax: the first of equal maxima
    if (temperature_ == 0.0f) {
      return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    }
    std::vector<double> probs(logits.size());
    double top = *std::max_element(logits.begin(), logits.end()), total = 0;
    for (size_t i = 0; i < logits.size(); ++i) total += probs[i] = std::exp((logits[i] - top) / temperature_);
    for (double& p : probs) p /= total;
    std::vector<int32_t> order(probs.size());
    std::iota(order.begin(), order.end(), 0);
    size_t keep = order.size();
    if (top_p_ < 1.0f) {
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return probs[a] > probs[b]; });
      double before = 0;
      for (keep = 0; keep < order.size() && (keep == 0 || before < top_p_); ++keep) before += probs[order[keep]];
    }
    double mass = 0;
    for (size_t k = 0; k < keep; ++k) mass += probs[order[k]];
    double r = uniform() * mass, cumulative = 0;
    for (size_t k = 0; k < keep; ++k) {
      cumulative += probs[order[k]];
      if (r < cumulative) return order[k];
    }
    return order[keep - 1];
  }

 private:
  double uniform() {  // [0, 1)
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return static_cast<double>((state_ * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
  }

  float temperature_, top_p_;
  uint64_t state_;
};

}  // namespace torchat
