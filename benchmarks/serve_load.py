"""Load on `llm-modules serve`: N concurrent streaming clients on loopback against two modules that share one
knowledge source (SmolLM2-135M-Instruct, real weights; the modules' bridge and trunk are random-init, which
does not change the cost). Reports requests/s, time to first token and per-token latency (p50/p95), errors,
and the server's memory: one module alone, then two, so the second module's cost shows.

    python benchmarks/serve_load.py [--clients 1 8 32] [--requests-per-client 2] [--max-tokens 32]

Every level sends a fixed number of requests, so the run ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def build_modules(out: Path, source: str) -> dict[str, str]:
    """Two modules on the same source, one per conditioning mode, saved as `llm-modules train` would."""
    import torch
    from transformers import GPTNeoConfig

    from llm_modules.model import LLMModule

    small = out / "small_config"
    GPTNeoConfig(vocab_size=8, hidden_size=256, num_layers=4, num_heads=8,
                 attention_types=[[["global", "local"], 2]], max_position_embeddings=2048, bos_token_id=None,
                 eos_token_id=None).save_pretrained(str(small))
    paths = {}
    for name, conditioning in (("module-token", "token"), ("module-prompt", "prompt")):
        torch.manual_seed(len(paths))
        m = LLMModule.build(source, str(small), init_small="scratch", source_dtype="float32", conditioning=conditioning,
                            prompt={"format": "paper", "system_prompt": "Answer briefly."})
        with torch.no_grad():
            m.generation.lm_head.weight.normal_(0, 0.05)
        m.save_pretrained(out / name)
        paths[name] = str(out / name)
        del m
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_server(models: dict[str, str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "llm_modules.cli", "serve", "--port", str(port), "--threads", str(threads),
           "--max-batch", "32"]
    for name, path in models.items():
        cmd += ["--model", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit("the server exited while loading")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not become ready in 120 s")


async def one_request(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, i: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": f"Question {i}: what is the capital of France?"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return {"error": ev["error"]["message"]}
                if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    if not stamps:
        return {"error": "no text"}
    per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return {"ttft": stamps[0] - t0, "per_token": per_token, "end": time.perf_counter() - t0, "pieces": len(stamps)}


async def level(url: str, models: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(w: int) -> list[dict]:
            return [await one_request(client, url, models[(w + k) % len(models)], max_tokens, w * 100 + k)
                    for k in range(per_client)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")

    ttft = [r["ttft"] for r in ok]
    tok = [r["per_token"] for r in ok if r["per_token"] is not None]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
            "req_per_s": len(results) / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "tok_p50": pct(tok, 0.5), "tok_p95": pct(tok, 0.95),
            "pieces_mean": statistics.mean(r["pieces"] for r in ok) if ok else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="knowledge source folder (default: SmolLM2 via `llm-modules fetch-source smollm2`)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from llm_modules.fetch_source import fetch_source

    source = args.source or str(fetch_source("smollm2", log=lambda s: None))
    with tempfile.TemporaryDirectory() as tmp:
        models = build_modules(Path(tmp), source)
        mib = lambda folder: sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20  # noqa: E731
        print(f"weights on disk: source {mib(source):.0f} MiB, each module's own part "
              + ", ".join(f"{n} {mib(p):.0f} MiB" for n, p in models.items()))
        first = dict(list(models.items())[:1])
        proc, url = start_server(first, args.threads)
        one_rss, _ = memory_mib(proc.pid)
        proc.terminate(), proc.wait()
        proc, url = start_server(models, args.threads)
        try:
            two_rss, _ = memory_mib(proc.pid)
            print(f"source {source}; server RSS after loading: one module {one_rss:.0f} MiB, two modules {two_rss:.0f} MiB "
                  f"(+{two_rss - one_rss:.0f} MiB for the second)")
            print("| clients | requests | errors | requests/s | TTFT p50 | TTFT p95 | per-token p50 | per-token p95 |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for n in args.clients:
                r = level(url, list(models), n, args.requests_per_client, args.max_tokens)
                r = asyncio.run(r)
                print(f"| {n} | {r['requests']} | {r['errors']} | {r['req_per_s']:.2f} | {r['ttft_p50']:.2f} s "
                      f"| {r['ttft_p95']:.2f} s | {r['tok_p50'] * 1000:.0f} ms | {r['tok_p95'] * 1000:.0f} ms |", flush=True)
            _, peak = memory_mib(proc.pid)
            print(f"peak server RSS over the run: {peak:.0f} MiB")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
