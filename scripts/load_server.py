"""Load test for `mlxedge serve`: concurrent streaming clients through the real `openai` client.

Starts `mlxedge serve` as its own process (127.0.0.1, a free port; the clients never share its CPU time
or its interpreter lock) unless --url is given, then:

1. `--clients` concurrent streaming clients × `--requests` each, every prompt unique (a shared system
   prompt, then a per-request question): all must complete with `data: [DONE]`; p50/p99 time to first
   token, aggregate generated tok/s; RSS of the server process after 20 and after all requests.
2. No stream mixed with another: a sample of the requests is replayed one at a time (greedy, so the
   reply is determined by the prompt) and must give exactly the streamed text.
3. Aggregate throughput with 4 concurrent clients vs 1 client (same number of requests per client),
   in `--scaling-trials` alternating pairs (on a shared machine a burst of load hits one run, not the
   comparison): each pair's ratio, their median, and best 4-client vs best 1-client throughput.

Concurrent requests of the model decode in one batched forward per step (continuous batching); the
report carries the engine's batching status (forwards, mean and largest batch). The machine's load
average is recorded around every phase: on a shared machine the figures mean little without it.

    python scripts/load_server.py                       # default model (smollm2), 8 × 25, max_tokens 32
    python scripts/load_server.py --model /path/tiny --clients 4 --requests 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
if not os.path.exists(os.environ.get("SSL_CERT_FILE", "/")):
    os.environ.pop("SSL_CERT_FILE", None)

SYSTEM = "You are a helpful assistant. Answer in one short sentence."
TOPICS = ["apples", "rivers", "the moon", "bicycles", "violins", "glaciers", "owls", "bread", "trains", "tea",
          "volcanoes", "chess", "maps", "bees", "clocks", "salt", "kites", "copper", "rain", "mirrors"]


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def question(client: int, j: int) -> str:
    return f"Request {client}-{j}: tell me one fact about {TOPICS[(client * 7 + j) % len(TOPICS)]}."


class Runner:
    def __init__(self, url: str, model: str, max_tokens: int, server_pid: int):
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key="load", max_retries=0, timeout=3600)
        self.model, self.max_tokens = model, max_tokens
        self.lock = threading.Lock()
        self.completed = 0
        self.rss_marks = {}
        self.server_pid = server_pid

    def stream_one(self, content: str) -> dict:
        started = time.perf_counter()
        first = None
        parts, usage, finish, ids = [], None, None, set()
        for chunk in self.client.chat.completions.create(
                model=self.model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
                max_tokens=self.max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True}):
            ids.add(chunk.id)
            if chunk.choices:
                delta = chunk.choices[0].delta.content or ""
                if delta and first is None:
                    first = time.perf_counter()
                parts.append(delta)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        end = time.perf_counter()
        with self.lock:
            self.completed += 1
            self.rss_marks[self.completed] = rss_bytes(self.server_pid)
            if self.completed % 10 == 0:
                print(f"  {self.completed} requests done", file=sys.stderr, flush=True)
        return {"content": content, "text": "".join(parts), "ttft": (first or end) - started, "total": end - started,
                "tokens": usage.completion_tokens if usage else 0, "cached": usage.prompt_tokens_details.cached_tokens
                if usage and usage.prompt_tokens_details else 0, "finish": finish, "ids": len(ids)}

    def clients(self, n_clients: int, n_requests: int, tag: str):
        results, errors = [], []

        def client(c):
            for j in range(n_requests):
                try:
                    results.append(self.stream_one(question(c, j) + tag))
                except Exception as exc:  # counted: the run reports every failure
                    errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, errors, time.perf_counter() - started


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, max_active: int, log_path: str):
    """`mlxedge serve model=MODEL` in its own process; (process, base URL) once /health answers."""
    import subprocess
    import urllib.request

    port = free_port()
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlxedge.cli", "serve", f"model={model}", "--port", str(port),
                             "--max-active", str(max_active), "--max-queue", "256"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited with status {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    sys.exit(f"error: the server did not answer /health in time; see {log_path}")


def batching_counters(url: str) -> dict:
    """The engine's decode counters from /metrics: forwards and rows by mode, the largest batch."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        for name in ("mlxedge_decode_forwards_total", "mlxedge_decode_rows_total", "mlxedge_batch_rows_max",
                     "mlxedge_unbatched_requests_total"):
            if line.startswith(name):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--url", default=None, help="an already running server (its model name is --served-name)")
    ap.add_argument("--served-name", default="model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-active", type=int, default=8)
    ap.add_argument("--replay", type=int, default=12, help="requests replayed alone to check for mixing")
    ap.add_argument("--scaling-requests", type=int, default=4, help="requests per client in the 1-vs-4 runs")
    ap.add_argument("--scaling-trials", type=int, default=3, help="alternating 1-client / 4-client pairs")
    ap.add_argument("--server-log", default=os.path.join(tempfile.gettempdir(), "mlxedge-load-server.log"),
                    help="where the server's output goes")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    load_before = os.getloadavg()
    proc = None
    if args.url:
        url, pid = args.url, None
    else:
        proc, url = start_server(args.model, args.max_active, args.server_log)
        pid = proc.pid
    try:
        run_all(args, url, pid, load_before)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


def run_all(args, url: str, pid, load_before) -> None:
    import psutil

    runner = Runner(url, args.served_name, args.max_tokens, pid or psutil.Process().pid)
    runner.stream_one("warm-up: say hello")
    runner.completed, runner.rss_marks = 0, {}

    load_main = os.getloadavg()
    results, errors, wall = runner.clients(args.clients, args.requests, "")
    total = args.clients * args.requests
    complete = [r for r in results if r["finish"] in ("stop", "length") and r["ids"] == 1]
    ttfts = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    report = {
        "model": args.model, "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "requests": total, "completed": len(complete), "errors": errors[:5],
        "wall_s": wall, "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
        "aggregate_tok_s": tokens / wall, "generated_tokens": tokens,
        "cached_prompt_tokens_mean": statistics.mean(r["cached"] for r in results) if results else 0,
        "loadavg_main_run": [load_main, os.getloadavg()],
    }
    marks = runner.rss_marks
    last = max(marks) if marks else 0
    if 20 in marks:
        report.update(rss_after_20_mb=marks[20] / 1e6, rss_after_last_mb=marks[last] / 1e6, rss_last_count=last,
                      rss_growth_mb=(marks[last] - marks[20]) / 1e6)

    # no mixing: replay a sample alone; greedy replies depend only on the prompt
    sample = random.Random(0).sample(results, min(args.replay, len(results)))
    mismatched = [r["content"] for r in sample if runner.stream_one(r["content"])["text"] != r["text"]]
    report.update(replayed=len(sample), replay_mismatches=len(mismatched))

    # throughput: 1 client vs 4 clients, same requests per client, in alternating pairs
    trials, scaling_errors = [], []
    for trial in range(args.scaling_trials):
        pair = {}
        for n in (1, 4):
            load = os.getloadavg()
            done, errs, wall = runner.clients(n, args.scaling_requests, f" (trial {trial}, {n} clients)")
            scaling_errors += errs
            pair[n] = {"tok_s": sum(r["tokens"] for r in done) / wall, "loadavg": load}
        pair["ratio"] = pair[4]["tok_s"] / pair[1]["tok_s"] if pair[1]["tok_s"] else float("nan")
        trials.append(pair)
        print(f"  scaling trial {trial}: 1 client {pair[1]['tok_s']:.1f} tok/s (load {pair[1]['loadavg'][0]:.1f}), "
              f"4 clients {pair[4]['tok_s']:.1f} tok/s (load {pair[4]['loadavg'][0]:.1f}): {pair['ratio']:.2f}x",
              file=sys.stderr, flush=True)
    best1 = max(t[1]["tok_s"] for t in trials)
    best4 = max(t[4]["tok_s"] for t in trials)
    report.update(scaling_trials=trials, scaling_4_vs_1_median=statistics.median(t["ratio"] for t in trials),
                  scaling_4_vs_1_best=best4 / best1 if best1 else float("nan"), tok_s_1_client_best=best1,
                  tok_s_4_clients_best=best4, scaling_errors=scaling_errors[:5],
                  loadavg_before=load_before, loadavg_after=os.getloadavg(), batching=batching_counters(url))
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
