"""The generation engine: one worker thread runs every request, batched where requests allow it.

What is batched: requests for the same module with the same sampling settings that arrive within
`batch_window` seconds of each other form a *cohort*: one source pass reads all their prompts (left
padded), and every decoding step advances all of them at once (one source step in token mode, none
in prompt mode, one bridge and trunk step, one head). Cohorts then take turns one decoding step at a
time, so no request waits for another's whole answer; a new cohort's prompt pass runs between two
steps of the others. Requests with a `seed` decode alone (their samples must not depend on neighbours).
Rows that finish (end of sequence, stop sequence, max_tokens, client gone) stop producing events at
once; a cohort is dropped when all its rows are done.

Events go back to the caller through `Request.emit` (thread-safe towards asyncio, see `app.py`).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..data import Example, left_padded, pad_id
from ..decode import context_limit, decode
from .metrics import ROW_BUCKETS, Metrics


@dataclass
class Request:
    """One answer to generate. `emit(kind, value)` receives ("token", id), then ("done", finish_reason)
    or ("error", message)."""

    module_name: str
    prompt: Example
    max_tokens: int
    emit: Callable[[str, Any], None]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    id: int = field(default_factory=itertools.count().__next__)
    tag: str = ""  # the id its client sees (e.g. chatcmpl-...), for the logs
    ended: str | None = None  # set by the server when it ends the answer itself (a stop sequence): the outcome
    cancelled: bool = False
    produced: int = 0
    done: bool = False
    arrived: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None

    def cohort_key(self) -> tuple:
        sampling = (self.temperature, self.top_p) if self.temperature > 0 else ("greedy",)
        return (self.module_name, *sampling, ("seed", self.seed, self.id) if self.seed is not None else None)


class Cohort:
    """Requests decoded together: one `decode` generator over their left-padded prompts."""

    def __init__(self, module: Any, requests: list[Request], metrics: Metrics | None = None,
                 log: Callable[[str], None] | None = None):
        self.requests, self.metrics, self.log = requests, metrics or Metrics(), log
        first = requests[0]
        ids, mask, answer = left_padded([r.prompt for r in requests], pad_id(module.tokenizer))
        dev = module.device
        sample = first.temperature > 0
        self.steps: Iterator = decode(
            module, ids.to(dev), mask.to(dev), answer_mask=answer.to(dev),
            max_new_tokens=max(r.max_tokens for r in requests), do_sample=sample,
            temperature=first.temperature if sample else 1.0, top_p=first.top_p if sample else None,
            seed=first.seed)

    def advance(self) -> bool:
        """One decoding step for every row; False once every row is done."""
        try:
            nxt, _, finished = next(self.steps)
        except StopIteration:
            for r in self.requests:
                self._finish(r, "length")
            return False
        self.metrics.observe("llm_modules_batch_rows", sum(not r.done for r in self.requests), ROW_BUCKETS)
        for i, r in enumerate(self.requests):
            if r.done:
                continue
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            if bool(finished[i]):
                self._finish(r, "stop")  # end of sequence
                continue
            self._token(r, int(nxt[i]))
            if r.produced >= r.max_tokens:
                self._finish(r, "length")
        if all(r.done for r in self.requests):
            self.steps.close()
            return False
        return True

    def _token(self, r: Request, token: int) -> None:
        now = time.monotonic()
        if r.last_token_at is None:
            self.metrics.observe("llm_modules_time_to_first_token_seconds", now - r.arrived, module=r.module_name)
        else:
            self.metrics.observe("llm_modules_time_per_output_token_seconds", now - r.last_token_at,
                                 module=r.module_name)
        r.last_token_at, r.produced = now, r.produced + 1
        self.metrics.inc("llm_modules_generated_tokens_total", module=r.module_name)
        r.emit("token", token)

    def _finish(self, r: Request, reason: str) -> None:
        if r.done:
            return
        r.done = True
        outcome = r.ended or ("cancelled" if r.cancelled else reason)
        if not r.cancelled:
            r.emit("done", reason)
        finish(r, outcome, self.metrics, self.log)


def finish(r: Request, outcome: str, metrics: Metrics, log: Callable[[str], None] | None) -> None:
    """Count a request that has ended and log it (its id, module, outcome, tokens and time)."""
    metrics.inc("llm_modules_requests_total", module=r.module_name, outcome=outcome)
    if log is not None:
        log(f"request {r.tag or r.id} ({r.module_name}): {outcome} after {r.produced} tokens in "
            f"{time.monotonic() - r.arrived:.2f} s")


def fail(requests: list[Request], message: str, metrics: Metrics | None = None,
         log: Callable[[str], None] | None = None) -> None:
    """End these requests with an error event (the engine itself keeps serving)."""
    for r in requests:
        if not r.done:
            r.done = True
            r.emit("error", message)
            finish(r, "error", metrics or Metrics(), log)


def split_batches(reqs: list[Request], max_batch: int, limit: int | None) -> list[list[Request]]:
    """Requests in arrival order, grouped so that each batch's longest prompt plus its largest max_tokens fits the
    context (rows are left-padded to the longest prompt and decoded for the largest max_tokens)."""
    batches: list[list[Request]] = []
    for r in reqs:
        b = batches[-1] if batches else None
        if b is not None and len(b) < max_batch and (limit is None or max(len(x.prompt.input_ids) for x in [*b, r])
                                                     + max(x.max_tokens for x in [*b, r]) <= limit):
            b.append(r)
        else:
            batches.append([r])
    return batches


class Engine:
    def __init__(self, modules: dict[str, Any], batch_window: float = 0.01, max_batch: int = 16,
                 threads: int | None = None, metrics: Metrics | None = None, log: Callable[[str], None] | None = None):
        self.modules = modules  # name -> LLMModule
        self.metrics, self.log = metrics or Metrics(), log
        self.metrics.gauges["llm_modules_queued_requests"] = lambda: self.queued
        self.metrics.gauges["llm_modules_active_requests"] = lambda: self.active
        self.batch_window, self.max_batch, self.threads = batch_window, max_batch, threads
        self._pending: list[Request] = []
        self._cohorts: list[Cohort] = []
        self._lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="llm-modules-engine", daemon=True)
        self.steps = 0  # decoding steps run (all cohorts), for tests and metrics
        self.max_rows = 0  # the largest cohort seen

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        with self._lock:
            self._pending.append(request)
            self._lock.notify_all()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (not those whose client has gone)."""
        with self._lock:
            return sum(1 for r in self._pending if not r.cancelled)

    @property
    def active(self) -> int:
        """Requests queued or generating (a queued request whose client has gone no longer counts)."""
        with self._lock:
            return (sum(1 for r in self._pending if not r.cancelled)
                    + sum(1 for c in self._cohorts for r in c.requests if not r.done))

    def _admit(self) -> None:
        """Group the waiting requests into new cohorts (called with the lock held)."""
        groups: dict[tuple, list[Request]] = {}
        for r in self._pending:
            if not r.cancelled:
                groups.setdefault(r.cohort_key(), []).append(r)
            elif not r.done:  # its client left before it started
                r.done = True
                finish(r, "cancelled", self.metrics, self.log)
        self._pending = []
        for key, reqs in groups.items():
            module = self.modules[key[0]]
            for batch in split_batches(reqs, self.max_batch, context_limit(module)):
                try:
                    self._cohorts.append(Cohort(module, batch, self.metrics, self.log))
                except Exception as e:  # a bad prompt fails its requests, never the engine
                    fail(batch, f"{type(e).__name__}: {e}", self.metrics, self.log)

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._lock:
                while not self._stop and not self._pending and not self._cohorts:
                    self._lock.wait()
                if self._stop:
                    return
                if self._pending and not self._cohorts:
                    # Idle engine: wait a moment so requests arriving together share one batch.
                    deadline = time.monotonic() + self.batch_window
                    while (not self._stop and len(self._pending) < self.max_batch
                           and (left := deadline - time.monotonic()) > 0):
                        self._lock.wait(timeout=left)
                self._admit()
                cohorts = list(self._cohorts)
            for c in cohorts:
                self.max_rows = max(self.max_rows, len(c.requests))
                try:
                    alive = c.advance()
                except Exception as e:  # e.g. out of memory: fail these requests, keep serving
                    fail(c.requests, f"generation failed: {type(e).__name__}: {e}", self.metrics, self.log)
                    alive = False
                self.steps += 1
                self.metrics.inc("llm_modules_decode_steps_total")
                if not alive:
                    with self._lock:
                        self._cohorts.remove(c)
            time.sleep(0)  # let request threads in between steps
