// ExecuTorch kernels for torchat's quantized linears, torchat::linear_q4.out and torchat::linear_q8.out: what a .pte's
// 8da4w and 8da8w layers call (torchat.lowering.et). What they compute, and how, is linear_core.h's (shared with the
// ops' torch form in C++, torch_linear.cpp); here their arguments are read off ExecuTorch's stack and checked, the
// output resized, and the work split over ExecuTorch's thread pool.
//
// Built into runner-et, and for the Python loader into the shared library beside et_sdpa.cpp
// (torchat/kernels/__init__.py).

#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>
#include <executorch/runtime/platform/log.h>

#include "linear_core.h"

namespace torchat {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

bool is_contiguous(const Tensor& t, ScalarType dtype, int64_t dim) {
  return t.scalar_type() == dtype && t.dim() == dim && executorch::runtime::tensor_is_contiguous(t);
}

const Tensor* optional_tensor(EValue* value) { return value->isNone() ? nullptr : &value->toTensor(); }

// What both ops take beside their weights: x first on the stack, then the `weights` tensors, then norm, eps, residual,
// gated and out
struct Call {
  const Tensor& x;
  const Tensor* norm;
  float eps;
  const Tensor* residual;
  bool gated;
  Tensor& out;
  Call(Span<EValue*> stack, size_t weights)
      : x(stack[0]->toTensor()),
        norm(optional_tensor(stack[1 + weights])),
        eps(static_cast<float>(stack[2 + weights]->toDouble())),
        residual(optional_tensor(stack[3 + weights])),
        gated(stack[4 + weights]->toBool()),
        out(stack[5 + weights]->toTensor()) {}
};

// Checks what `call` holds against the weights' n and kp (`why` set already where the weights are wrong), resizes
// the output and runs the linear (`p`, its weights set) on ExecuTorch's thread pool; an error fails the call,
// logged under `name`
template <Format F>
void run_linear(KernelRuntimeContext& context, const char* name, const Call& call, Problem p, const char* why) {
  const Tensor& x = call.x;
  const int64_t n = p.n, kp = p.kp;
  const int64_t k = x.dim() >= 1 ? x.size(x.dim() - 1) : 0, width = call.gated ? n / 2 : n;
  if (why == nullptr) {
    if (x.scalar_type() != ScalarType::Float || x.dim() < 1 || !executorch::runtime::tensor_is_contiguous(x))
      why = "x must be contiguous float32 (..., in_features)";
    else if (kp % kPair != 0 || k > kp || (call.gated && n % 2 != 0))
      why = "the weights' padded_in must be a multiple of 64 and >= x's in_features, out_features even if gated";
    else if (call.norm != nullptr && (!is_contiguous(*call.norm, ScalarType::Float, 1) || call.norm->size(0) != k))
      why = "norm must be contiguous float32 (in_features)";
  }
  if (why == nullptr) {
    executorch::aten::SizesType sizes[executorch::runtime::kTensorDimensionLimit];
    for (int64_t d = 0; d + 1 < x.dim(); ++d) sizes[d] = x.size(d);
    sizes[x.dim() - 1] = width;
    if (executorch::runtime::resize_tensor(call.out, {sizes, static_cast<size_t>(x.dim())}) != Error::Ok ||
        !is_contiguous(call.out, ScalarType::Float, x.dim()))
      why = "cannot resize the output to (..., out_features) float32";
    else if (call.residual != nullptr && (!is_contiguous(*call.residual, ScalarType::Float, x.dim()) ||
                                          call.residual->numel() != call.out.numel()))
      why = "residual must be contiguous float32 shaped as the output";
  }
  if (why != nullptr) {
    ET_LOG(Error, "%s: %s", name, why);
    context.fail(Error::InvalidArgument);
    return;
  }
  const int64_t tokens = k == 0 ? 0 : x.numel() / k;
  linear<F>(p, x.const_data_ptr<float>(), k, tokens,
            call.norm == nullptr ? nullptr : call.norm->const_data_ptr<float>(), call.eps,
            call.residual == nullptr ? nullptr : call.residual->const_data_ptr<float>(), call.gated,
            call.out.mutable_data_ptr<float>(), [](int64_t begin, int64_t end, const auto& fn) {
              executorch::extension::parallel_for(begin, end, 1, fn);
            });
}

// linear_q4.out(Tensor x, Tensor codes, Tensor scales, Tensor offsets, Tensor? norm, float eps, Tensor? residual,
//               bool gated, *, Tensor(a!) out) -> Tensor(a!)
void linear_q4_out(KernelRuntimeContext& context, Span<EValue*> stack) {
  const Call call(stack, 3);
  const Tensor& codes = stack[1]->toTensor();
  const Tensor& scales = stack[2]->toTensor();
  const Tensor& offsets = stack[3]->toTensor();
  const char* why = nullptr;
  const int64_t n = codes.dim() == 2 ? codes.size(0) : 0, kp = codes.dim() == 2 ? codes.size(1) * 2 : 0;
  if (!is_contiguous(codes, ScalarType::Byte, 2))
    why = "codes must be contiguous uint8 (out_features, padded_in / 2)";
  else if (!is_contiguous(scales, ScalarType::Half, 2) || !is_contiguous(offsets, ScalarType::Half, 2) ||
           scales.size(0) != n || offsets.size(0) != n || scales.size(1) != kp / kBlock ||
           offsets.size(1) != kp / kBlock)
    why = "scales and offsets must be contiguous float16 (out_features, padded_in / 32)";
  Problem p{};
  p.n = n;
  p.kp = kp;
  if (why == nullptr) {
    p.codes = codes.const_data_ptr<uint8_t>();
    p.scales = reinterpret_cast<const uint16_t*>(scales.const_data_ptr());
    p.offsets = reinterpret_cast<const uint16_t*>(offsets.const_data_ptr());
  }
  run_linear<Format::q4>(context, "torchat::linear_q4.out", call, p, why);
}

// linear_q8.out(Tensor x, Tensor weight, Tensor scales, Tensor? norm, float eps, Tensor? residual, bool gated, *,
//               Tensor(a!) out) -> Tensor(a!)
void linear_q8_out(KernelRuntimeContext& context, Span<EValue*> stack) {
  const Call call(stack, 2);
  const Tensor& weight = stack[1]->toTensor();
  const Tensor& scales = stack[2]->toTensor();
  const char* why = nullptr;
  const int64_t n = weight.dim() == 2 ? weight.size(0) : 0, kp = weight.dim() == 2 ? weight.size(1) : 0;
  if (!is_contiguous(weight, ScalarType::Char, 2))
    why = "weight must be contiguous int8 (out_features, padded_in)";
  else if (!is_contiguous(scales, ScalarType::Float, 1) || scales.size(0) != n)
    why = "scales must be contiguous float32 (out_features)";
  Problem p{};
  p.n = n;
  p.kp = kp;
  if (why == nullptr) {
    p.codes = reinterpret_cast<const uint8_t*>(weight.const_data_ptr());
    p.row_scales = scales.const_data_ptr<float>();
  }
  run_linear<Format::q8>(context, "torchat::linear_q8.out", call, p, why);
}

const executorch::runtime::Kernel kKernels[] = {
    executorch::runtime::Kernel("torchat::linear_q4.out", linear_q4_out),
    executorch::runtime::Kernel("torchat::linear_q8.out", linear_q8_out),
};
const Error kRegistered = executorch::runtime::register_kernels({kKernels, 2});

}  // namespace
}  // namespace torchat
