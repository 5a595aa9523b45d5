// torchat::linear_q4 and torchat::linear_q8 for torch on CPU: the arithmetic of the .pte kernels (linear_core.h)
// behind torch's dispatcher, so that eager 8da4w / 8da8w models run the same kernel as a .pte rather than the ops'
// torch form (torchat/quant/asym4.py, intx.py: the weights dequantized on every call); and torchat::linear_w4, the
// same 4-bit weights against a float input (int4 weight-only on CPU, torchat/quant/int4.py). All three also as C
// functions for the .pt2 and .so files AOT Inductor compiles: Inductor calls an op it knows a C shim for directly
// (torch._inductor.config.aot_inductor.custom_ops_to_c_shims, set by torchat/lowering/aoti.py with the declarations
// of torchat/kernels/__init__.py's TORCH_C_SHIMS), where otherwise its proxy executor would look the op up in the
// dispatcher on every call and a bare .so could not run it at all. The compiled model leaves the shims undefined:
// the process provides them (the Python loader loads this library RTLD_GLOBAL first; runner-aoti compiles this file
// into its executable and exports its symbols). The work is split over torch's intra-op threads (at::parallel_for).
//
// The ops' schemas are Python's (the loader defines them before it loads this library, which registers the CPU
// kernels only). x may be float32, bfloat16 or float16 (a .pt2 in bf16): the kernel reads it as float32 and the
// result comes back in x's dtype, as the torch form's does. Built by torchat/kernels/__init__.py
// (torch_kernels_library) and into runner-aoti (runner-aoti/CMakeLists.txt).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <optional>

#include "linear_core.h"

namespace torchat {
namespace {

// The checks both ops share; x (..., k) and the float32 copies the kernel reads
struct Inputs {
  at::Tensor x, norm, residual;
  int64_t k = 0, tokens = 0;
};

Inputs checked_inputs(const char* name, const at::Tensor& x, int64_t n, int64_t kp,
                      const std::optional<at::Tensor>& norm, const std::optional<at::Tensor>& residual, bool gated) {
  TORCH_CHECK(x.dim() >= 1 && x.is_floating_point(), name, ": x must be float (..., in_features), got ",
              x.scalar_type(), " with ", x.dim(), " dims");
  const int64_t k = x.size(-1);
  TORCH_CHECK(kp % kPair == 0 && k <= kp && (!gated || n % 2 == 0), name,
              ": the weights' padded_in must be a multiple of 64 and >= x's in_features (", k,
              "), out_features even if gated");
  Inputs in;
  in.k = k;
  in.tokens = k == 0 ? 0 : x.numel() / k;
  in.x = x.contiguous().to(at::kFloat);
  if (norm.has_value()) {
    TORCH_CHECK(norm->dim() == 1 && norm->size(0) == k, name, ": norm must be (in_features)");
    in.norm = norm->contiguous().to(at::kFloat);
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->numel() == in.tokens * (gated ? n / 2 : n), name,
                ": residual must be shaped as the output");
    in.residual = residual->contiguous().to(at::kFloat);
  }
  return in;
}

template <Format F>
at::Tensor run(const Inputs& in, Problem p, const at::Tensor& x, float eps, bool gated) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = gated ? p.n / 2 : p.n;
  at::Tensor out = at::empty(sizes, x.options().dtype(at::kFloat));
  linear<F>(p, in.x.const_data_ptr<float>(), in.k, in.tokens,
            in.norm.defined() ? in.norm.const_data_ptr<float>() : nullptr, eps,
            in.residual.defined() ? in.residual.const_data_ptr<float>() : nullptr, gated,
            out.mutable_data_ptr<float>(), [](int64_t begin, int64_t end, const auto& fn) {
              at::parallel_for(begin, end, 1, fn);
            });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

bool is_contiguous(const at::Tensor& t, at::ScalarType dtype, int64_t dim) {
  return t.scalar_type() == dtype && t.dim() == dim && t.is_contiguous();
}

// linear_q4 (the input quantized to int8) and linear_w4 (the input quantized to 16 bits) on linear_q4's weights
template <Format F>
at::Tensor linear_4bit(const char* name, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const at::Tensor& offsets, const std::optional<at::Tensor>& norm, double eps,
                       const std::optional<at::Tensor>& residual, bool gated) {
  TORCH_CHECK(is_contiguous(codes, at::kByte, 2), name,
              ": codes must be contiguous uint8 (out_features, padded_in / 2)");
  const int64_t n = codes.size(0), kp = codes.size(1) * 2;
  TORCH_CHECK(is_contiguous(scales, at::kHalf, 2) && is_contiguous(offsets, at::kHalf, 2) && scales.size(0) == n &&
                  offsets.size(0) == n && scales.size(1) == kp / kBlock && offsets.size(1) == kp / kBlock,
              name, ": scales and offsets must be contiguous float16 (out_features, padded_in / 32)");
  const Inputs in = checked_inputs(name, x, n, kp, norm, residual, gated);
  Problem p{};
  p.n = n;
  p.kp = kp;
  p.codes = codes.const_data_ptr<uint8_t>();
  p.scales = reinterpret_cast<const uint16_t*>(scales.const_data_ptr());
  p.offsets = reinterpret_cast<const uint16_t*>(offsets.const_data_ptr());
  return run<F>(in, p, x, static_cast<float>(eps), gated);
}

at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
                     const std::optional<at::Tensor>& norm, double eps, const std::optional<at::Tensor>& residual,
                     bool gated) {
  return linear_4bit<Format::q4>("torchat::linear_q4", x, codes, scales, offsets, norm, eps, residual, gated);
}

at::Tensor linear_w4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets,
                     const std::optional<at::Tensor>& norm, double eps, const std::optional<at::Tensor>& residual,
                     bool gated) {
  return linear_4bit<Format::w4>("torchat::linear_w4", x, codes, scales, offsets, norm, eps, residual, gated);
}

at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& norm, double eps, const std::optional<at::Tensor>& residual,
                     bool gated) {
  constexpr const char* name = "torchat::linear_q8";
  TORCH_CHECK(is_contiguous(weight, at::kChar, 2), name, ": weight must be contiguous int8 (out_features, padded_in)");
  const int64_t n = weight.size(0), kp = weight.size(1);
  TORCH_CHECK(is_contiguous(scales, at::kFloat, 1) && scales.size(0) == n, name,
              ": scales must be contiguous float32 (out_features)");
  const Inputs in = checked_inputs(name, x, n, kp, norm, residual, gated);
  Problem p{};
  p.n = n;
  p.kp = kp;
  p.codes = reinterpret_cast<const uint8_t*>(weight.const_data_ptr());
  p.row_scales = scales.const_data_ptr<float>();
  return run<Format::q8>(in, p, x, static_cast<float>(eps), gated);
}

using Linear4 = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&, bool);

// a 4-bit op (linear_q4, linear_w4) on the shims' arguments
AOTITorchError call_4bit(Linear4 op, AtenTensorHandle x, AtenTensorHandle codes, AtenTensorHandle scales,
                         AtenTensorHandle offsets, AtenTensorHandle* norm, double eps, AtenTensorHandle* residual,
                         int32_t gated, AtenTensorHandle* ret0) {
  using namespace torch::aot_inductor;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = new_tensor_handle(op(*tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(codes),
                                 *tensor_handle_to_tensor_pointer(scales), *tensor_handle_to_tensor_pointer(offsets),
                                 pointer_to_optional<at::Tensor>(norm), eps, pointer_to_optional<at::Tensor>(residual),
                                 gated != 0));
  });
}
}  // namespace
}  // namespace torchat

// The C shims AOT Inductor's generated code calls (declared to it as TORCH_C_SHIMS in torchat/kernels/__init__.py):
// optional tensors as pointers to handles (nullptr for None), bools as int32, the result as a new handle
extern "C" {
AOTITorchError aoti_torch_cpu_linear_q4(AtenTensorHandle x, AtenTensorHandle codes, AtenTensorHandle scales,
                                        AtenTensorHandle offsets, AtenTensorHandle* norm, double eps,
                                        AtenTensorHandle* residual, int32_t gated, AtenTensorHandle* ret0) {
  return torchat::call_4bit(torchat::linear_q4, x, codes, scales, offsets, norm, eps, residual, gated, ret0);
}

AOTITorchError aoti_torch_cpu_linear_w4(AtenTensorHandle x, AtenTensorHandle codes, AtenTensorHandle scales,
                                        AtenTensorHandle offsets, AtenTensorHandle* norm, double eps,
                                        AtenTensorHandle* residual, int32_t gated, AtenTensorHandle* ret0) {
  return torchat::call_4bit(torchat::linear_w4, x, codes, scales, offsets, norm, eps, residual, gated, ret0);
}

AOTITorchError aoti_torch_cpu_linear_q8(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle scales,
                                        AtenTensorHandle* norm, double eps, AtenTensorHandle* residual, int32_t gated,
                                        AtenTensorHandle* ret0) {
  using namespace torch::aot_inductor;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = new_tensor_handle(torchat::linear_q8(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(weight),
        *tensor_handle_to_tensor_pointer(scales), pointer_to_optional<at::Tensor>(norm), eps,
        pointer_to_optional<at::Tensor>(residual), gated != 0));
  });
}
}

TORCH_LIBRARY_IMPL(torchat, CPU, m) {
  m.impl("linear_q4", &torchat::linear_q4);
  m.impl("linear_q8", &torchat::linear_q8);
  m.impl("linear_w4", &torchat::linear_w4);
}
