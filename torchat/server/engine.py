"""The scheduler: one thread owns the model and runs continuous batching over its slots. `run` is called from the
process's main thread, where `torchat generate` runs too: on a 2-core EPYC, SmolLM2 int4 decoded at 39-42 tok/s
there and at 14-20 tok/s from a second Python thread (the same CPU time a step, half the parallelism); uvicorn
serves HTTP from the other thread.

Each turn of the loop (1) drops requests whose client went away, (2) admits waiting requests, oldest first, into
free slots (each is prefilled alone, reusing whatever prefix its slot's cache still holds), (3) decodes one token
for every active request as one batch, and (4) samples, detokenizes and checks each request's stops. A request
thus joins and leaves between decode steps. With one slot (an exported artifact) this is a fair FIFO queue.

Requests talk to the HTTP side through `Job.deliver(kind, *values)`, called from this thread: ("start", reused)
once admitted, ("text", piece) as the answer grows, then ("end", finish_reason) or ("error", message).
"""

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from torchat.chat import common_prefix
from torchat.generate import Sampling, sample
from torchat.server.batch import Slots
from torchat.tokenizers import StreamDecoder


class StopText:
    """Cuts generated text at the first stop string. Text that could still grow into a stop string is held back
    until it cannot (so a streamed answer never shows part of a stop string)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def add(self, text: str) -> tuple[str, bool]:
        """(text that is safe to send, whether a stop string was met)."""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[:min(found)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Job:
    """One request as the engine sees it. `deliver` is thread-safe (the HTTP side queues what it gets)."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    deliver: Callable[..., None]
    stop: list[str] = field(default_factory=list)
    generator: torch.Generator | None = None
    cancelled: bool = False              # set by the HTTP side when the client goes away
    # filled in by the engine
    slot: int | None = None
    reused: int = 0                      # prompt tokens the slot's cache already held
    produced: int = 0                    # tokens the model produced (a stop token included)
    batch: int = 0                       # the most requests decoded together with this one (itself included)
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    ended: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def decode_tok_s(self) -> float:
        if self.first_token is None or self.ended is None or self.produced < 2:
            return 0.0
        return (self.produced - 1) / max(self.ended - self.first_token, 1e-9)


@dataclass
class _Active:
    job: Job
    fed: list[int]                       # what the slot's cache holds: positions 0 .. len-1
    decoder: StreamDecoder
    stopper: StopText
    token: int = -1                      # the last sampled token, fed at position len(fed) by the next step


class Engine:
    """Owns the slots (torchat.server.batch) and the thread that runs them."""

    def __init__(self, slots: Slots, tokenizer, max_waiting: int = 64, log=None):
        self.slots, self.tokenizer, self.max_waiting = slots, tokenizer, max_waiting
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: dict[int, _Active] = {}
        self._closing = False
        self.steps = 0

    def close(self) -> None:
        """Make `run` return (from any thread); what is queued or running gets an error."""
        with self._lock:
            self._closing = True
            self._lock.notify()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the waiting line is full or the engine is closing (the caller refuses it)."""
        with self._lock:
            if self._closing or len(self._waiting) >= self.max_waiting:
                return False
            self._waiting.append(job)
            self._lock.notify()
        return True

    def load(self) -> dict:
        with self._lock:
            return {"slots": self.slots.count, "active": len(self._active), "waiting": len(self._waiting),
                    "steps": self.steps}

    # --- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> None:
        """The loop, until `close`."""
        try:
            self._loop()
        finally:
            self._fail_all("the server is shutting down")

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._waiting or self._active):
                    self._lock.wait()
                if self._closing:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._step()
            except Exception as error:  # noqa: BLE001 - one bad step fails its requests, not the server
                self.log(f"torchat server: error in the model step: {error!r}")
                for slot in list(self._active):
                    self._finish(slot, error=f"the model failed: {error}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self._closing = True
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            job.deliver("error", message)
        for slot in list(self._active):
            self._finish(slot, error=message)

    def _drop_cancelled(self) -> None:
        with self._lock:
            self._waiting = deque(job for job in self._waiting if not job.cancelled)
        for slot, active in list(self._active.items()):
            if active.job.cancelled:
                self._finish(slot, "cancelled")

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        """(slot, prompt tokens its cache holds): the free slot holding the longest prefix of the prompt, the
        lowest such (slots in use stay consecutive, so the batch reads the cache without a copy)."""
        free = [s for s in range(self.slots.count) if s not in self._active]
        held = {s: common_prefix(self.slots.held[s], prompt) for s in free}
        slot = max(free, key=lambda s: (held[s], -s))
        return slot, min(held[slot], len(prompt) - 1)  # prefill at least one token for its logits

    def _admit(self) -> None:
        while len(self._active) < self.slots.count:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            slot, reused = self._pick_slot(job.prompt)
            job.slot, job.reused, job.admitted = slot, reused, time.perf_counter()
            job.deliver("start", reused)
            active = _Active(job, job.prompt[:reused], StreamDecoder(self.tokenizer), StopText(job.stop))
            self._active[slot] = active
            self.slots.held[slot] = active.fed  # the same list: it grows as the cache fills
            try:
                logits = self.slots.prefill(slot, job.prompt[reused:], reused)
            except Exception as error:  # noqa: BLE001 - this request fails, the others go on
                self.log(f"torchat server: error in prefill: {error!r}")
                self._finish(slot, error=f"the model failed: {error}")
                continue
            active.fed.extend(job.prompt[reused:])
            job.first_token = time.perf_counter()
            self._accept(slot, sample(logits, job.sampling, job.generator))

    def _step(self) -> None:
        order = sorted(self._active)
        actives = [self._active[s] for s in order]
        logits = self.slots.decode(order, [a.token for a in actives], [len(a.fed) for a in actives])
        self.steps += 1
        greedy = logits.argmax(-1).tolist()  # (batch,): one pass for every greedy request
        for i, (slot, active) in enumerate(zip(order, actives)):
            active.fed.append(active.token)
            job = active.job
            job.batch = max(job.batch, len(order))
            token = greedy[i] if job.sampling.temperature == 0 else sample(logits[i], job.sampling, job.generator)
            self._accept(slot, token)

    def _accept(self, slot: int, token: int) -> None:
        """A new token for the request in `slot`: send its text, or finish it."""
        active = self._active[slot]
        job = active.job
        job.produced += 1
        active.token = token
        if token in self.tokenizer.stop_ids:
            self._finish(slot, "stop")
            return
        text, stopped = active.stopper.add(active.decoder.add(token))
        if text:
            job.deliver("text", text)
        if stopped:
            self._finish(slot, "stop", flush=False)
        elif job.produced >= job.max_tokens or len(active.fed) >= self.slots.max_seq_len:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str | None = None, error: str | None = None, flush: bool = True) -> None:
        """End the request in `slot`; with `flush`, send what the decoder and the stop check still held back."""
        active = self._active.pop(slot)
        job = active.job
        self.slots.held[slot] = active.fed  # what the cache holds now, for the next request's prefix
        job.finish_reason, job.ended = reason, time.perf_counter()
        if error is not None:
            job.deliver("error", error)
            return
        if flush and reason != "cancelled":
            tail, stopped = active.stopper.add(active.decoder.flush())
            tail += "" if stopped else active.stopper.flush()
            if tail:
                job.deliver("text", tail)
        job.deliver("end", reason)
