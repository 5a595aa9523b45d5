"""GPTQ (Frantar et al., 2022) for int4 group-wise weights, on CPU, calibrated on the model's own activations.

torchao 0.18's `GPTQConfig` is CUDA-only (an assert and `torch.cuda.synchronize()`) and its int4 base needs
mslk, so torchat owns this. The result is an ordinary `Int4WeightOnlyLinear` (same codes, scales and zeros
layout as plain int4), so it runs, bakes and lowers exactly like `linear:int4`.

Per transformer block, in order: run the calibration activations through the block with its float weights,
collecting each quantized linear's input Hessian H = X^T X; quantize each linear column by column, spreading
each column's rounding error over the not-yet-quantized columns through the inverse Hessian's Cholesky factor
(lazy batch updates of `blocksize` columns); then run the block again with the quantized weights to give the
next block its inputs, so that later blocks calibrate against earlier blocks' quantization error.
Group (scale, zero) are chosen by min/max when the group's first column is reached, on the error-updated weights.
"""

import torch
from torch import nn

from torchat.errors import TorchatError
from torchat.quant.base import pad_columns, padded_size
from torchat.quant.int4 import MID, Int4WeightOnlyLinear, minmax_qparams


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, blocksize: int,
                         percdamp: float, scale_dtype: torch.dtype):
    """Codes (out, in) uint8, scale and zero (out, in / group_size) in scale_dtype for a padded weight (out, in)
    and its input Hessian (in, in)."""
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    columns = w.shape[1]
    assert columns % group_size == 0 and h.shape == (columns, columns), (w.shape, h.shape, group_size)
    dead = torch.diag(h) == 0  # padding columns and inputs that never fire: weight 0, no constraint
    h[dead, dead] = 1
    w[:, dead] = 0
    h_inv = _inverse_hessian_factor(h, percdamp)
    blocksize = max(blocksize, group_size)  # a group never straddles two blocks

    codes = torch.zeros_like(w, dtype=torch.uint8)
    scales = torch.zeros(w.shape[0], columns // group_size, dtype=scale_dtype)
    zeros = torch.zeros_like(scales)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = w[:, start:end].clone()  # (out, b): updated as the block's columns are quantized
        errors = torch.zeros_like(block)
        h_inv_block = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                scale, zero = minmax_qparams(block[:, i:i + group_size], group_size)
                g = column // group_size
                scales[:, g], zeros[:, g] = scale[:, 0].to(scale_dtype), zero[:, 0].to(scale_dtype)
                s, z = scales[:, g].float(), zeros[:, g].float()
            q = torch.round((block[:, i] - (z - MID * s)) / s).clamp(0, 15)
            codes[:, column] = q.to(torch.uint8)
            error = (block[:, i] - ((q - MID) * s + z)) / h_inv_block[i, i]
            block[:, i:] -= error[:, None] * h_inv_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return codes, scales, zeros


def _inverse_hessian_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damping raised until H is positive definite."""
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for damp in (percdamp, percdamp * 10, percdamp * 100):
        factor, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            inverse, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0:
                return inverse
    raise TorchatError(f"GPTQ: the calibration Hessian is not positive definite even with damping "
                       f"{percdamp * 100}; raise percdamp or calibration_limit")


class _HessianHook:
    """Accumulates X^T X over every row of a module's input, zero-padded to `columns`.

    wq/wk/wv (and w1/w3) are called one after another on the same input: `shared` keeps the last product so
    that it is computed once per input, not once per module."""

    def __init__(self, columns: int, shared: dict):
        self.sum = torch.zeros(columns, columns)
        self.rows = 0
        self.shared = shared

    def __call__(self, module, args):
        x = args[0]
        # the same tensor object (held here, so its memory cannot be reused by another) and the same padding
        if self.shared.get("input") is not x or self.shared["columns"] != self.sum.shape[0]:
            rows = pad_columns(x.detach().float(), self.sum.shape[0]).reshape(-1, self.sum.shape[0])
            self.shared.update(input=x, columns=self.sum.shape[0], gram=rows.T @ rows, rows=rows.shape[0])
        self.sum += self.shared["gram"]
        self.rows += self.shared["rows"]

    def hessian(self) -> torch.Tensor:
        return 2 * self.sum / max(self.rows, 1)


def gptq_quantize_model(model: nn.Module, names: list[str], tokens: torch.Tensor, group_size: int,
                        blocksize: int, percdamp: float, batch_size: int = 4) -> dict[str, Int4WeightOnlyLinear]:
    """Replace the named nn.Linear modules of a Transformer by GPTQ-quantized Int4WeightOnlyLinear (plain
    form), block by block; tokens (samples, seq) int64. Returns name -> new module."""
    wanted = set(names)
    done: dict[str, Int4WeightOnlyLinear] = {}
    saved_caches = [layer.attention.kv_cache for layer in model.layers]
    saved_cache_len = model.cache_len
    for layer in model.layers:  # plain causal passes over whole calibration sequences
        layer.attention.kv_cache = None
    model.cache_len = 0
    try:
        seq = tokens.shape[1]
        if seq > model.rope_cos.shape[0]:
            raise TorchatError(f"calibration_seq_length {seq} exceeds the model's context {model.rope_cos.shape[0]}")
        input_pos = torch.arange(seq, device=tokens.device)
        cos, sin = model.rope_cos[input_pos], model.rope_sin[input_pos]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()
        with torch.no_grad():
            hidden = [model.tok_embeddings(chunk) for chunk in tokens.split(batch_size)]

            def run_block(layer, xs):
                return [layer(x, cos, sin, input_pos, mask) for x in xs]

            for index, layer in enumerate(model.layers):
                prefix = f"layers.{index}."
                targets = {n: m for n, m in layer.named_modules() if prefix + n in wanted and isinstance(m, nn.Linear)}
                if targets:
                    _quantize_group(layer, prefix, targets, lambda: run_block(layer, hidden), group_size, blocksize,
                                    percdamp, done)
                hidden = run_block(layer, hidden)
            if "output" in wanted and isinstance(model.output, nn.Linear):
                normed = [model.norm(x) for x in hidden]
                # only the head's inputs are needed: feed them to its Hessian, skip the (tokens x vocab) matmul
                _quantize_group(model, "", {"output": model.output}, None, group_size, blocksize, percdamp, done,
                                inputs=normed)
    finally:
        for layer, cache in zip(model.layers, saved_caches):
            layer.attention.kv_cache = cache
        model.cache_len = saved_cache_len
    return done


def _quantize_group(parent: nn.Module, prefix: str, targets: dict[str, nn.Linear], run, group_size: int,
                    blocksize: int, percdamp: float, done: dict, inputs: list[torch.Tensor] | None = None) -> None:
    """Hessians from `run()` (a forward pass that calls the targets) or, for one target, from `inputs` given
    directly; then GPTQ on each target and swap it for its quantized module."""
    shared: dict = {}
    hooks = {name: _HessianHook(padded_size(linear.in_features, group_size), shared)
             for name, linear in targets.items()}
    if inputs is not None:
        for x in inputs:
            for name, hook in hooks.items():
                hook(targets[name], (x,))
    else:
        handles = [targets[name].register_forward_pre_hook(hook) for name, hook in hooks.items()]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
    for name, linear in targets.items():
        weight = pad_columns(linear.weight.detach().float(), hooks[name].sum.shape[0])
        codes, scale, zero = gptq_quantize_weight(weight, hooks[name].hessian(), group_size, blocksize, percdamp,
                                                  linear.weight.dtype)
        module = Int4WeightOnlyLinear.from_codes(codes, scale, zero, group_size, linear.in_features)
        parent.set_submodule(name, module)
        done[prefix + name] = module
