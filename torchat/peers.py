"""What users would otherwise pick, behind the same TextModel interface, so one timing loop measures everyone.

    PEERS["llama.cpp"](gguf, threads, max_seq_len) -> PeerModel   (llama-cpp-python, the GGUF as it is)
    PEERS["transformers"](gguf, threads, max_seq_len) -> PeerModel (Hugging Face, the GGUF dequantized to fp32)

Both are optional (`pip install torchat[bench]` for llama-cpp-python; transformers comes with the test extra) and
imported only when asked for. Each takes the prompt as token ids from torchat's tokenizer of the same GGUF, so
every system sees the same tokens; each returns the logits of the last position only, which is all generation
reads (their own generate loops would add their own sampling overheads, so they are not used).
"""

from pathlib import Path

import numpy as np
import torch

from torchat.errors import TorchatError, unknown_key_error

# GGML type ids -> the precision class a peer is compared in (torchat.bench.peer_for)
GGML_PRECISION = {0: "fp32", 1: "fp16", 30: "bf16", 2: "int4", 3: "int4", 8: "int8", 12: "int4", 14: "int6"}


class PeerModel:
    """A peer's forward behind TextModel: tokens (1, seq) at positions (seq,) -> logits (1, 1, vocab) float32."""

    max_seq_len: int
    device = torch.device("cpu")
    labels: dict
    weight_bytes: int
    artifact_bytes: int

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """The last position's logits (1, 1, vocab), whatever last_only asks: a peer runs generation only."""
        raise NotImplementedError


def gguf_weight_facts(path: Path) -> dict:
    """Bytes one decode step reads (every matrix once; the embedding only as a tied head) and the precision class
    of the transformer blocks' matrices, read from the GGUF's tensor table."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    blocks = [t for name, t in tensors.items() if name.startswith("blk.")]
    types = {}
    for t in blocks:
        if len(t.shape) == 2:
            types[int(t.tensor_type)] = types.get(int(t.tensor_type), 0) + int(t.n_bytes)
    main_type = max(types, key=types.get)
    type_name = {int(t.tensor_type): t.tensor_type.name for t in blocks}[main_type]
    return {"weight_bytes": sum(int(t.n_bytes) for t in blocks) + int(head.n_bytes),
            "precision": GGML_PRECISION.get(main_type, type_name.lower()), "ggml_type": type_name,
            "head_type": head.tensor_type.name}


class LlamaCppModel(PeerModel):
    """llama.cpp through llama-cpp-python: the GGUF's own kernels, `threads` threads for prefill and decode."""

    def __init__(self, gguf: Path, threads: int, max_seq_len: int):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise TorchatError("the llama.cpp peer needs llama-cpp-python: pip install 'torchat[bench]' (it builds "
                               "from source: CMAKE_ARGS=-DGGML_NATIVE=ON)") from None
        import llama_cpp

        self._llm = Llama(model_path=str(gguf), n_ctx=max_seq_len, n_batch=max_seq_len, n_ubatch=max_seq_len,
                          n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        self.max_seq_len = max_seq_len
        self._n_vocab = self._llm.n_vocab()
        facts = gguf_weight_facts(gguf)
        self.weight_bytes, self.artifact_bytes = facts["weight_bytes"], Path(gguf).stat().st_size
        self.labels = {"system": "llama.cpp", "mode": "llama.cpp", "quant": f"{facts['ggml_type']} (head "
                       f"{facts['head_type']})", "precision": facts["precision"], "dtype": facts["ggml_type"],
                       "model": Path(gguf).name, "peer_version": llama_cpp.__version__}

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        start = int(input_pos[0])
        if start == 0:
            self._llm.reset()
        assert self._llm.n_tokens == start, (self._llm.n_tokens, start)
        self._llm.eval(tokens[0].tolist())
        # without logits_all, llama.cpp computes the logits of the batch's last token only, as the first row
        logits = np.ctypeslib.as_array(self._llm._ctx.get_logits(), shape=(self._n_vocab,))
        return torch.from_numpy(logits.copy()).view(1, 1, -1)


class TransformersModel(PeerModel):
    """Hugging Face transformers' llama on the GGUF dequantized to fp32, with its dynamic KV cache."""

    def __init__(self, gguf: Path, threads: int, max_seq_len: int):
        try:
            import transformers
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise TorchatError("the transformers peer needs transformers and accelerate: pip install "
                               "'torchat[test]'") from None
        gguf = Path(gguf)
        self._model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
        self._cache = None
        self.max_seq_len = max_seq_len
        params = sum(p.numel() for n, p in self._model.named_parameters() if "embed_tokens" not in n)
        tied = self._model.config.tie_word_embeddings
        head = self._model.get_output_embeddings().weight.numel() if tied else 0
        self.weight_bytes = (params + head) * 4
        self.artifact_bytes = gguf.stat().st_size
        self.labels = {"system": "transformers", "mode": "transformers", "quant": "fp32 (GGUF dequantized)",
                       "precision": "fp32", "dtype": "fp32", "model": gguf.name,
                       "peer_version": transformers.__version__}

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        from transformers import DynamicCache

        if int(input_pos[0]) == 0:
            self._cache = DynamicCache()
        assert self._cache.get_seq_length() == int(input_pos[0]), (self._cache.get_seq_length(), input_pos)
        out = self._model(input_ids=tokens, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits.float()


PEERS = {"llama.cpp": LlamaCppModel, "transformers": TransformersModel}


def load_peer(name: str, gguf: Path, threads: int, max_seq_len: int) -> PeerModel:
    if name not in PEERS:
        raise unknown_key_error("peer", name, PEERS)
    if not Path(gguf).is_file():
        raise TorchatError(f"{gguf}: no such GGUF for the {name} peer; pass --peer-gguf")
    return PEERS[name](Path(gguf), threads, max_seq_len)
