"""Counters and histograms the engine keeps, rendered as Prometheus text exposition (format 0.0.4).

Thread-safe: the worker records, any thread renders. No client library needed for this handful of series.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Dict, Iterable, Tuple

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

HELP = {  # the help line of each counter (a series without one is described by its name)
    "mlxedge_requests_total": "finished requests by model and outcome (stop, length, cancelled or an error code)",
    "mlxedge_prompt_tokens_total": "prompt tokens processed",
    "mlxedge_generated_tokens_total": "tokens generated",
    "mlxedge_rejected_total": "requests refused at the door",
    "mlxedge_http_requests_total": "HTTP requests by route and status",
}


class Histogram:
    def __init__(self, buckets: Iterable[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


def _labels(labels: Tuple[Tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)
    return "{" + inner + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: Dict[str, Dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tps = Histogram(TPS_BUCKETS)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self.counters[name][tuple(sorted(labels.items()))] += value

    def observe_generation(self, ttft_s: float, tokens_per_s: float) -> None:
        with self._lock:
            self.ttft.observe(ttft_s)
            if tokens_per_s > 0:
                self.tps.observe(tokens_per_s)

    def render(self, gauges: Dict[str, Tuple[str, float]], help_of: Callable[[str], str] = lambda n: n) -> str:
        """Prometheus text: every counter, the two histograms and the given gauges (name -> (help, value))."""
        out = []
        with self._lock:
            for name in sorted(self.counters):
                out += [f"# HELP {name} {help_of(name)}", f"# TYPE {name} counter"]
                for labels, value in sorted(self.counters[name].items()):
                    out.append(f"{name}{_labels(labels)} {value:g}")
            for name, hist, text in (("mlxedge_ttft_seconds", self.ttft, "time to first token"),
                                     ("mlxedge_generation_tokens_per_second", self.tps, "decode rate per request")):
                out += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
                for bound, count in zip(hist.buckets, hist.counts):
                    out.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
                out += [f'{name}_bucket{{le="+Inf"}} {hist.total}', f"{name}_sum {hist.sum:g}",
                        f"{name}_count {hist.total}"]
        for name, (text, value) in sorted(gauges.items()):
            out += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(out) + "\n"
