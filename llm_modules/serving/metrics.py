"""The server's metrics in Prometheus' text exposition format (`GET /metrics`), with no dependency.

Counters and histograms are kept here, thread-safely (the engine thread and the request handlers both record);
gauges are read when the page is rendered. Names follow Prometheus' conventions (a `llm_modules_` prefix, base
units, `_total` on counters); a histogram's buckets are cumulative with `+Inf`, `_sum` and `_count`.
"""

from __future__ import annotations

import threading
from typing import Callable

# Seconds: from a few milliseconds per token on a GPU to tens of seconds before a first token under load.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

HELP = {
    "llm_modules_requests_total": ("counter", "Requests answered, by module and outcome (stop, length, error, "
                                              "cancelled, rejected)."),
    "llm_modules_generated_tokens_total": ("counter", "Tokens generated, by module."),
    "llm_modules_decode_steps_total": ("counter", "Decoding steps run (one step advances one batch by a token)."),
    "llm_modules_time_to_first_token_seconds": ("histogram", "From a request's arrival to its first token."),
    "llm_modules_time_per_output_token_seconds": ("histogram", "Between two tokens of one answer."),
    "llm_modules_batch_rows": ("histogram", "Rows advanced by one decoding step."),
    "llm_modules_queued_requests": ("gauge", "Requests waiting for a batch."),
    "llm_modules_active_requests": ("gauge", "Requests queued or generating."),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters and histograms by name and labels; `gauges` are functions read at render time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = {}
        self._hist: dict[tuple[str, tuple], list] = {}  # [bucket counts..., sum, count]
        self._bounds: dict[str, tuple[float, ...]] = {}
        self.gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value

    def observe(self, name: str, value: float, buckets: tuple[float, ...] = LATENCY_BUCKETS, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._bounds.setdefault(name, buckets)
            h = self._hist.setdefault(key, [0] * len(self._bounds[name]) + [0.0, 0])
            for i, bound in enumerate(self._bounds[name]):
                if value <= bound:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def counter(self, name: str, **labels: str) -> float:
        """A counter's value (0 if never incremented)."""
        return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        """The exposition text: each metric's HELP and TYPE once, then its samples."""
        with self._lock:
            counters, hist = dict(self._counters), {k: list(v) for k, v in self._hist.items()}
        lines: list[str] = []
        for name, (kind, text) in HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "gauge" and name in self.gauges:
                lines.append(f"{name} {float(self.gauges[name]()):g}")
            for (n, labels), v in sorted(counters.items()):
                if n == name:
                    lines.append(f"{name}{_labels(dict(labels))} {v:g}")
            for (n, labels), h in sorted(hist.items()):
                if n != name:
                    continue
                base = dict(labels)
                for bound, count in zip(self._bounds[name], h):
                    lines.append(f"{name}_bucket{_labels({**base, 'le': f'{bound:g}'})} {count}")
                lines += [f"{name}_bucket{_labels({**base, 'le': '+Inf'})} {h[-1]}",
                          f"{name}_sum{_labels(base)} {h[-2]:g}", f"{name}_count{_labels(base)} {h[-1]}"]
        return "\n".join(lines) + "\n"
