"""`moefuse serve` under load, beside `moefuse predict`'s offline batch throughput, measured in one run.

What is measured (CPU; the server on loopback in processes of its own, started here with `moefuse serve` and
--serve-flags, by default `--workers 2 --threads 1`: a worker process of one torch thread per core):

* Inputs: --rows evenly spaced rows of --split of a manifest (default: the AV-digits validation split,
  `runs/avdigits/data`; every task), their media files read into memory once; every request uploads one row's
  fields and files (multipart), round-robin.
* ``offline``: `predict`'s path without the process start: `load_media_sample` on every row's files (decoding,
  as `predict --manifest` does) and `predict_samples(model, samples, batch_size=32)`, in this process; samples/s.
* ``server, concurrency C`` for C in --concurrency (1 8 32): C client threads, each with its own keep-alive
  HTTP/1.1 connection, post rows until the round's --requests are answered or --seconds have passed (every loop
  is bounded in count and time); requests/s, p50 and p95 latency, and the share of answers equal to offline's.
  Each row's request is encoded once (by httpx) and sent as bytes, and a response is read by its Content-Length
  and parsed as JSON: the clients' cost per request is small, as a native load generator's (wrk, hey) would be.

How: the server first answers every row once and offline runs once, untimed. Then --rounds rounds; each times
offline, then each concurrency, in an order that rotates between rounds. The client threads share the 2 cores
with the server, so server figures include the clients' own cost. The table leads with the medians over rounds
of the ratio server requests/s ÷ offline samples/s (± half their interquartile range), measured side by side.

    python benchmarks/serve_load.py --checkpoint runs/avdigits/moe/model --manifest runs/avdigits/data/manifest.jsonl
    python benchmarks/serve_load.py ... --quick     # 2 rounds of 64 requests: a smoke run, not figures
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import threading
import time
from pathlib import Path

import httpx
from _bench import command_line, manifest_rows, start_server, stop_server, summary

from moefuse.fusion.loading import load_inference_model
from moefuse.inference.predict import export_media, load_media_sample, predict_samples

REPO = Path(__file__).resolve().parents[1]


def rows_of(manifest: Path, split: str, count: int, model) -> list[dict]:
    """The rows (evenly spaced: every task), each with its files' bytes in `uploads`."""
    rows = manifest_rows(manifest, split, count, model)
    for r in rows:
        r["uploads"] = {f: path.read_bytes() for f, path in r["files"].items()}
    return rows


def offline(model, media: dict, manifest: Path, rows: list[dict]) -> tuple[float, list[str]]:
    """predict's path: decode each row's files, predict in batches of 32 -> (samples/s, predictions)."""
    start = time.perf_counter()
    samples = [load_media_sample(model, r["id"], r["task"], media=media, text=r.get("text"),
                                 question=r.get("question"), **r["files"])
               for r in rows]
    results = predict_samples(model, samples, batch_size=32)
    return len(rows) / (time.perf_counter() - start), [r["prediction"] for r in results]


def encode_request(url: str, row: dict) -> bytes:
    """A row's POST /predict as the bytes on the wire (multipart, keep-alive), built once by httpx."""
    data = {k: row[k] for k in ("task", "text", "question") if row.get(k)}
    files = {f: (f"{row['id']}.{Path(row[f]).suffix.lstrip('.')}", b) for f, b in row["uploads"].items()}
    request = httpx.Request("POST", f"{url}/predict", data=data, files=files)
    body = request.read()
    head = ["POST /predict HTTP/1.1", f"Host: {request.url.netloc.decode()}", "Connection: keep-alive",
            f"Content-Type: {request.headers['content-type']}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection that sends pre-encoded requests and reads each response whole: the
    client's own cost per request is a send and a few reads (as wrk's), so that the server is what is measured."""

    def __init__(self, url: str) -> None:
        host, port = httpx.URL(url).host, httpx.URL(url).port
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def post(self, request: bytes) -> tuple[float, str | None]:
        start = time.perf_counter()
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(self.buffer) < length:
            self.buffer += self._recv()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        elapsed = time.perf_counter() - start
        ok = head.split(b" ", 2)[1] == b"200"
        return elapsed, json.loads(body).get("prediction") if ok else None

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def load(url: str, rows: list[dict], concurrency: int, requests: int, seconds: float) -> dict:
    """C threads, each on its own connection, post rows round-robin until `requests` are answered or `seconds`
    pass."""
    lock, counter, latencies, answers = threading.Lock(), [0], [], {}
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        conn = Connection(url)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if counter[0] >= requests:
                        return
                    i = counter[0]
                    counter[0] += 1
                elapsed, prediction = conn.post(rows[i % len(rows)]["request"])
                with lock:
                    latencies.append(elapsed)
                    answers[i % len(rows)] = prediction
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"rps": len(lat) / wall, "p50": lat[len(lat) // 2], "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "answers": answers, "done": len(lat)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=REPO / "runs" / "avdigits" / "moe" / "model")
    p.add_argument("--manifest", type=Path, default=REPO / "runs" / "avdigits" / "data" / "manifest.jsonl")
    p.add_argument("--split", default="val")
    p.add_argument("--rows", type=int, default=256, help="manifest rows used (default 256)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=256, help="requests per concurrency and round")
    p.add_argument("--seconds", type=float, default=60.0, help="time bound per concurrency and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve-flags", default="--workers 2 --threads 1",
                   help="more `moefuse serve` flags (default: '--workers 2 --threads 1', a worker per core)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.requests, args.rounds = 64, 64, 2
    model, media = load_inference_model(args.checkpoint), export_media(args.checkpoint)
    rows = rows_of(args.manifest, args.split, args.rows, model)
    proc, url = start_server(args.checkpoint, ["--max-batch-size", "32", "--max-queue", "1024",
                                               "--max-connections", "128", *shlex.split(args.serve_flags)])
    for r in rows:
        r["request"] = encode_request(url, r)
    try:
        _, expected = offline(model, media, args.manifest, rows)  # warm-up, and the answers to compare with
        for c in args.concurrency:
            load(url, rows, c, len(rows), args.seconds)
        measured = {c: [] for c in args.concurrency}
        base = []
        for r in range(args.rounds):
            order = args.concurrency[r % len(args.concurrency):] + args.concurrency[:r % len(args.concurrency)]
            base.append(offline(model, media, args.manifest, rows)[0])
            for c in order:
                measured[c].append(load(url, rows, c, args.requests, args.seconds))
    finally:
        stop_server(proc)
    report(base, measured, expected, args)


def report(base: list[float], measured: dict[int, list[dict]], expected: list[str], args) -> None:
    print(f"offline (predict, batch 32): {summary(base)[0]:.1f} samples/s (median of {len(base)} rounds)")
    print("| concurrency | requests/s ÷ offline samples/s | requests/s | p50 ms | p95 ms | answers as offline |")
    print("|---|---|---|---|---|---|")
    for c, runs in measured.items():
        ratio, spread = summary([m["rps"] / b for m, b in zip(runs, base)])
        same = [m["answers"][i] == expected[i] for m in runs for i in m["answers"]]
        print(f"| {c} | {ratio:.2f} ± {spread:.2f} | {summary([m['rps'] for m in runs])[0]:.1f} | "
              f"{1000 * summary([m['p50'] for m in runs])[0]:.0f} | {1000 * summary([m['p95'] for m in runs])[0]:.0f} "
              f"| {sum(same) / max(1, len(same)):.3f} |")
    print(f"\ncommand: {command_line()}")


if __name__ == "__main__":
    main()
