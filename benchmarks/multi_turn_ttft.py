"""Multi-turn chat TTFT, prefix cache on vs off (issue "Automatic prefix caching").

Each turn resends the whole history, as chat clients do. With the prefix cache the
history's KV is reused, so TTFT should stay flat as the conversation grows.

    .venv/bin/python benchmarks/multi_turn_ttft.py [--turns 8] [--conversations 3]

Starts `tokenloom serve` twice on 127.0.0.1 (cache on, then --no-prefix-caching),
runs the same conversations (greedy, fixed lengths) one at a time against each, and
prints TTFT p50 per turn and the turn-N / turn-1 ratio.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

import httpx
from openai import OpenAI

SYSTEM = ("You are a careful assistant for a small bakery. You answer questions about opening hours, "
          "ingredients, allergens, custom cake orders, delivery areas and prices. Keep answers short, "
          "friendly and accurate; when you do not know, say so and suggest calling the shop. ") * 3
QUESTIONS = ["Do you have gluten free bread?", "What time do you open on Sunday?",
             "Can I order a birthday cake for Friday?", "Do you deliver to the harbour district?",
             "How much is a loaf of rye?", "Are your croissants made with butter?",
             "Can I pay by card?", "Do you sell coffee as well?", "Is there parking nearby?",
             "What is your most popular pastry?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tokenloom.entrypoints.cli", "serve", model, "--port", str(port),
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy in 300 s")


def ttft_per_turn(client: OpenAI, model: str, turns: int, conversation: int, max_tokens: int) -> list[float]:
    messages = [{"role": "system", "content": SYSTEM}]
    ttfts = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[(conversation + turn) % len(QUESTIONS)]})
        start = time.perf_counter()
        first = None
        text = ""
        stream = client.chat.completions.create(
            model=model, messages=messages, stream=True, temperature=0, max_tokens=max_tokens,
            extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
        ttfts.append((first or time.perf_counter()) - start)
        messages.append({"role": "assistant", "content": text})
    return ttfts


def measure(model: str, extra: list[str], args: argparse.Namespace) -> list[float]:
    port = free_port()
    proc = start_server(model, port, extra)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        served = client.models.list().data[0].id
        ttft_per_turn(client, served, 1, 99, 4)  # warm up
        runs = [ttft_per_turn(client, served, args.turns, c, args.max_tokens) for c in range(args.conversations)]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return [statistics.median(run[t] for run in runs) for t in range(args.turns)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    on = measure(args.model, [], args)
    off = measure(args.model, ["--no-prefix-caching"], args)
    print("| turn | TTFT p50, cache on (s) | TTFT p50, cache off (s) |")
    print("|---|---|---|")
    for t, (a, b) in enumerate(zip(on, off), start=1):
        print(f"| {t} | {a:.3f} | {b:.3f} |")
    print(f"\nturn {args.turns} / turn 1: cache on {on[-1] / on[0]:.2f}x, cache off {off[-1] / off[0]:.2f}x")


if __name__ == "__main__":
    main()
