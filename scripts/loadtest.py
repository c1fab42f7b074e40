#!/usr/bin/env python3
"""Load test for `ternlm serve`, loopback only, bounded in time and count.

Starts the server itself (on 127.0.0.1, a free port), then
  1. throughput: for each concurrency in --streams (default 1 4 8 16), that many clients stream completions
     (--gen-tokens each, EOS ignored so every request generates the same count) for --phase-seconds; reports
     aggregate generated tokens/s and time to first token (p50/p99);
  2. soak: --soak-clients clients (default 64) send mixed chat / completion requests, streaming and not, for
     --soak-seconds; every request must succeed; the server's RSS is sampled every second.
Prints a table and writes the numbers as JSON (--json FILE). Exit status 1 if any request failed.

Standard library only (a minimal asyncio HTTP/1.1 client, so the client costs little CPU next to the server).
Example:
  scripts/loadtest.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf --parallel 16
"""
import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request

from urllib.parse import urlsplit


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(a):
    cmd = [a.bin, "serve", "-m", a.model, "--host", "127.0.0.1", "--port", "0", "--parallel", str(a.parallel),
           "-c", str(a.ctx), "--max-queue", str(max(256, a.soak_clients * 2))]
    if a.threads:
        cmd += ["-t", str(a.threads)]
    cmd += a.server_arg
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            sys.exit(f"loadtest: the server exited before listening: {' '.join(cmd)}")
        print("  server:", line.rstrip(), file=sys.stderr)
        if "listening on http://" in line:
            addr = line.split("listening on http://")[1].split()[0]
            assert addr.startswith("127.0.0.1:"), addr
            return proc, "http://" + addr
    proc.kill()
    sys.exit("loadtest: the server did not start in time")


class HttpError(Exception):
    pass


async def http_request(base, path, body):
    """POST `body` as JSON; yields (status, body-bytes pieces as they arrive). Connection: close."""
    u = urlsplit(base)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    data = json.dumps(body).encode()
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data)
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
        yield status, None
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                chunk = await reader.readexactly(size)
                await reader.readexactly(2)
                yield status, chunk
        else:
            n = int(headers.get("content-length", "-1"))
            yield status, (await reader.readexactly(n)) if n >= 0 else await reader.read()
    finally:
        writer.close()


async def stream_request(base, path, body, stats):
    """One streaming request; records time to first token and generated tokens. Returns True on success."""
    t0 = time.perf_counter()
    first = None
    usage = None
    buf = b""
    status = None
    done = False
    async for status, piece in http_request(base, path, body):
        if piece is None:
            continue
        buf += piece
        if status != 200:
            continue
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            j = json.loads(data)
            if "error" in j:
                stats["errors"].append(str(j["error"]))
                return False
            if j.get("usage"):
                usage = j["usage"]
            for c in j.get("choices", []):
                piece_text = c.get("text") or (c.get("delta") or {}).get("content")
                if piece_text and first is None:
                    first = time.perf_counter()
    if status != 200:
        stats["errors"].append(f"{status} {buf[:200]!r}")
        return False
    if usage is None or not done:
        stats["errors"].append("stream ended without usage or [DONE]")
        return False
    stats["ttft"].append((first or time.perf_counter()) - t0)
    stats["tokens"] += usage["completion_tokens"]
    stats["requests"] += 1
    return True


async def plain_request(base, path, body, stats):
    t0 = time.perf_counter()
    out = b""
    status = None
    async for status, piece in http_request(base, path, body):
        if piece:
            out += piece
    if status != 200:
        stats["errors"].append(f"{status} {out[:200]!r}")
        return False
    j = json.loads(out)
    stats["tokens"] += j["usage"]["completion_tokens"]
    stats["requests"] += 1
    stats["ttft"].append(time.perf_counter() - t0)  # the whole request, for non-streaming
    return True


async def throughput_phase(base, n_streams, seconds, gen_tokens, seed):
    stats = {"ttft": [], "tokens": 0, "requests": 0, "errors": []}
    rng = random.Random(seed)
    prompts = ["Once upon a time", "The history of the city begins", "In a small village by the sea",
               "The recipe calls for", "Scientists have discovered"]
    deadline = time.perf_counter() + seconds

    async def client_loop(i):
        while time.perf_counter() < deadline:
            body = {"prompt": rng.choice(prompts) + f" ({i})", "max_tokens": gen_tokens, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.8,
                    "seed": rng.randrange(1 << 30)}
            try:
                await stream_request(base, "/v1/completions", body, stats)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                stats["errors"].append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(n_streams)))
    wall = time.perf_counter() - t0
    return {"streams": n_streams, "wall_s": wall, "requests": stats["requests"], "tokens": stats["tokens"],
            "tokens_per_s": stats["tokens"] / wall, "ttft_p50_s": percentile(stats["ttft"], 50),
            "ttft_p99_s": percentile(stats["ttft"], 99), "errors": stats["errors"]}


async def soak_phase(base, pid, n_clients, seconds, seed):
    stats = {"ttft": [], "tokens": 0, "requests": 0, "errors": []}
    rng = random.Random(seed)
    deadline = time.perf_counter() + seconds
    rss = []
    topics = ["the sea", "a robot", "the moon", "bread", "a library", "winter", "trains", "music"]

    async def sampler():
        while time.perf_counter() < deadline:
            rss.append(rss_mib(pid))
            await asyncio.sleep(1.0)

    async def client_loop(i):
        while time.perf_counter() < deadline:
            topic = rng.choice(topics)
            common = {"max_tokens": rng.randint(8, 96), "temperature": rng.choice([0, 0.7, 1.0]),
                      "seed": rng.randrange(1 << 30)}
            if rng.random() < 0.6:
                path = "/v1/chat/completions"
                body = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user", "content": f"Tell me something about {topic}."}], **common}
            else:
                path = "/v1/completions"
                body = {"prompt": f"A short story about {topic}:", **common}
            try:
                if rng.random() < 0.7:
                    body["stream"] = True
                    body["stream_options"] = {"include_usage": True}
                    await stream_request(base, path, body, stats)
                else:
                    await plain_request(base, path, body, stats)
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as e:
                stats["errors"].append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.gather(sampler(), *(client_loop(i) for i in range(n_clients)))
    wall = time.perf_counter() - t0
    rss = [x for x in rss if x == x]
    return {"clients": n_clients, "wall_s": wall, "requests": stats["requests"], "failed": len(stats["errors"]),
            "errors": stats["errors"][:10], "tokens_per_s": stats["tokens"] / wall,
            "rss_start_mib": rss[0] if rss else None, "rss_max_mib": max(rss) if rss else None,
            "rss_end_mib": rss[-1] if rss else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/ternlm")
    ap.add_argument("--model", required=True)
    ap.add_argument("--parallel", type=int, default=16, help="server slots")
    ap.add_argument("--ctx", type=int, default=512, help="context per slot")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--phase-seconds", type=float, default=30)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--soak-clients", type=int, default=64)
    ap.add_argument("--soak-seconds", type=float, default=180)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for ternlm serve")
    a = ap.parse_args()
    assert a.phase_seconds <= 600 and a.soak_seconds <= 1800 and a.soak_clients <= 256, "keep the test bounded"

    proc, base = start_server(a)
    results = {"model": os.path.basename(a.model), "parallel": a.parallel, "phases": []}
    try:
        for n in a.streams:
            r = asyncio.run(throughput_phase(base, n, a.phase_seconds, a.gen_tokens, a.seed + n))
            results["phases"].append(r)
            print(f"{n:>3} streams: {r['tokens_per_s']:7.1f} tokens/s aggregate, {r['requests']:4d} requests, "
                  f"TTFT p50 {r['ttft_p50_s']*1000:7.0f} ms  p99 {r['ttft_p99_s']*1000:7.0f} ms, "
                  f"errors {len(r['errors'])}", flush=True)
        if a.soak_seconds > 0:
            s = asyncio.run(soak_phase(base, proc.pid, a.soak_clients, a.soak_seconds, a.seed))
            results["soak"] = s
            print(f"soak: {s['clients']} clients for {s['wall_s']:.0f} s: {s['requests']} requests, {s['failed']} failed, "
                  f"{s['tokens_per_s']:.1f} tokens/s, RSS start {s['rss_start_mib']:.0f} MiB, "
                  f"max {s['rss_max_mib']:.0f} MiB, end {s['rss_end_mib']:.0f} MiB", flush=True)
            for e in s["errors"]:
                print("  error:", e)
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        results["metrics"] = {l.split()[0]: float(l.split()[1]) for l in metrics.splitlines()
                              if l and not l.startswith("#") and "time_to_first_token" not in l}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = sum(len(p["errors"]) for p in results["phases"]) + results.get("soak", {}).get("failed", 0)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
