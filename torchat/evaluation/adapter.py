"""`TorchatLM`: lm-eval's model interface over any `TextModel` (eager, compiled, quantized, .pt2/.so, .pte).

One request at a time, batch 1: the exported artifacts hold one KV cache of batch 1 inside and cannot reset it.
Each scored sequence is prefilled in one call at positions 0..S-1; the causal mask hides whatever an earlier
request left in the cache beyond S, so requests never see one another.
"""

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from torchat.errors import TorchatError
from torchat.generate import Sampling, TextModel, generate
from torchat.tokenizers import StreamDecoder, Tokenizer

DEFAULT_MAX_GEN_TOKS = 256


class TorchatLM(TemplateLM):
    """loglikelihood, loglikelihood_rolling and generate_until for a TextModel and its tokenizer.

    max_length: the longest sequence one forward call sees (default and at most: the model's KV cache).
    """

    def __init__(self, model: TextModel, tokenizer: Tokenizer, max_length: int | None = None):
        super().__init__()
        if max_length is not None and max_length > model.max_seq_len:
            raise TorchatError(f"--max-seq-length {max_length} is beyond the model's KV cache of "
                               f"{model.max_seq_len} tokens; lower it (or re-export with a larger one)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length or model.max_seq_len
        self.forward_calls = 0  # one per scored window or request: tests check the prefill is one call
        self.tokens_scored = 0

    # --- tokens ------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        token = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id
        if token is None:
            raise TorchatError(f"{self.tokenizer.path}: the tokenizer has neither EOS nor BOS, which lm-eval needs "
                               "to start an empty context; pass a tokenizer that defines one")
        return token

    @property
    def prefix_token_id(self) -> int:
        # what the first token of a document is predicted from: BOS where the vocabulary has one (lm-eval's HF
        # model does the same), else EOS
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode_text(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # --- scoring -----------------------------------------------------------------------------------------

    def _log_probs(self, tokens: list[int], last: int) -> torch.Tensor:
        """Log-probabilities (last, vocab) of the tokens following the last `last` positions of `tokens`."""
        assert 0 < last <= len(tokens) <= self.max_length, (last, len(tokens), self.max_length)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.model.device)
        positions = torch.arange(len(tokens), device=self.model.device)
        self.forward_calls += 1
        logits = self.model.forward(ids, positions)[0, -last:]  # (last, vocab)
        return F.log_softmax(logits.float(), dim=-1)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether greedy decoding would produce the continuation)."""
        logp = self._log_probs((context + continuation)[:-1], len(continuation))
        target = torch.tensor(continuation, device=logp.device)
        self.tokens_scored += len(continuation)
        total = logp.gather(-1, target[:, None]).sum()
        return float(total), bool((logp.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for _, context, continuation in requests:
            if not continuation:
                raise TorchatError("lm-eval asked for the likelihood of an empty continuation; check the task's "
                                   "doc_to_target")
            if len(continuation) > self.max_length:
                raise TorchatError(f"a continuation of {len(continuation)} tokens does not fit the "
                                   f"--max-seq-length of {self.max_length}; raise it")
            # the context is cut from the left so that context + continuation - 1 fits one forward call
            keep = self.max_length + 1 - len(continuation)
            results.append(self._score(context[-keep:], continuation))
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """The whole document's log-likelihood, in disjoint windows of max_length tokens (wikitext-style: each
        window starts afresh, the first from the prefix token)."""
        results = []
        for (text,) in [request.args for request in requests]:
            windows = get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            results.append(sum(self._score(*make_disjoint_window(w))[0] for w in windows))
        return results

    # --- generation --------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        results = []
        for context, gen_kwargs in [request.args for request in requests]:
            results.append(self._generate_one(context, dict(gen_kwargs)))
        return results

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.pop("until", None) or []
        # stop strings; EOS and the end-of-turn tokens stop generation as ids (their text decodes to "")
        until = [s for s in ([until] if isinstance(until, str) else until) if s]
        max_new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        do_sample = gen_kwargs.pop("do_sample", False)
        temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
        sampling = Sampling(temperature, gen_kwargs.pop("top_k", None), gen_kwargs.pop("top_p", None))
        prompt = self.tok_encode(context) or [self.prefix_token_id]
        # the prompt is cut from the left so that the whole budget fits in the cache
        prompt = prompt[-max(1, self.max_length - max_new):]
        decoder, text = StreamDecoder(self.tokenizer), ""
        self.forward_calls += 1
        for token in generate(self.model, prompt, max_new, sampling, self.tokenizer.stop_ids):
            if token in self.tokenizer.stop_ids:
                break
            text += decoder.add(token)
            if any(stop in text for stop in until):
                break
        text += decoder.flush()
        for stop in until:  # lm-eval's convention: the text before the first stop sequence
            text = text.split(stop)[0]
        return text
