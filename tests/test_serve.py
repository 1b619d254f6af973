"""`moefuse serve`: the dynamic batcher alone, then the server in its own process on a free loopback port, with
valid, invalid and concurrent requests; its answers are `moefuse predict`'s for the same inputs."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO, run_cli

from moefuse.inference.batcher import DynamicBatcher, QueueFull

# -- the batcher ---------------------------------------------------------------------------------------------------


def test_concurrent_items_are_batched_and_each_gets_its_own_result() -> None:
    seen: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        seen.append(items)
        time.sleep(0.02)
        return [2 * x for x in items]

    async def main() -> list[int]:
        batcher = DynamicBatcher(run, max_batch_size=4, max_wait_s=0.05)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert max(map(len, seen)) == 4 and len(seen) < 10 and sorted(x for b in seen for x in b) == list(range(10))


def test_a_full_queue_refuses_and_a_failed_batch_fails_its_callers() -> None:
    def fail(items: list[int]) -> list[int]:
        raise RuntimeError("boom")

    async def main() -> None:
        batcher = DynamicBatcher(fail, max_batch_size=2, max_wait_s=0.0, max_queue=1)
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.submit(1)
            batcher.queue.put_nowait((0, asyncio.get_running_loop().create_future()))  # the one free place
            with pytest.raises(QueueFull):
                await batcher.submit(2)
        finally:
            await batcher.stop()

    asyncio.run(main())


# -- the server ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`moefuse serve` on a free loopback port, once it answers /health."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moefuse.cli", "serve", "--checkpoint", str(model), "--port",
                             str(port), *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            if proc.poll() is not None:
                pytest.fail(f"moefuse serve exited: {proc.stderr.read()}")
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moefuse serve did not answer /health within 60 s")
    return proc, url


@pytest.fixture(scope="module")
def server(fault_run: Path):
    proc, url = start(fault_run / "model", "--max-upload-mb", "0.5", "--max-text-chars", "100", "--max-wait-ms", "30",
                      "--max-image-pixels", "10000", "--max-audio-seconds", "3")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def files(fault_data: dict) -> dict[str, Path]:
    rows = [json.loads(line) for line in fault_data["manifest"].read_text().splitlines()]
    base = fault_data["manifest"].parent
    return {m: base / next(r[m] for r in rows if r.get(m)) for m in ("image", "audio")}


def post(url: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/predict", timeout=60, **kwargs)


def test_health_and_info(server: str) -> None:
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    info = httpx.get(f"{server}/info").json()
    assert set(info["tasks"]) == {"digit", "avqa"} and info["tasks"]["avqa"]["type"] == "qa"
    assert set(info["modalities"]) == {"text", "image", "audio"} and "question" in info["fields"]
    assert info["limits"]["max_text_chars"] == 100


def test_a_form_upload_answers_as_predict_does(server: str, files: dict, fault_run: Path) -> None:
    answer = post(server, data={"task": "avqa", "question": "what digit is written?"},
                  files={"image": files["image"].open("rb"), "audio": files["audio"].open("rb")})
    assert answer.status_code == 200, answer.text
    got = answer.json()
    done = run_cli("predict", "--checkpoint", str(fault_run / "model"), "--task", "avqa", "--question",
                   "what digit is written?", "--image", str(files["image"]), "--audio", str(files["audio"]))
    expected = json.loads(done.stdout)
    assert set(got) - {"id"} == set(expected) - {"id"}
    assert got["prediction"] == expected["prediction"] and got["votes"] == expected["votes"]
    assert got["probability"] == pytest.approx(expected["probability"], abs=1e-5)


def test_a_json_body_with_base64_media(server: str, files: dict) -> None:
    body = {"task": "digit", "image": base64.b64encode(files["image"].read_bytes()).decode()}
    answer = post(server, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["modalities"] == "image"


@pytest.mark.parametrize("how, status, field", [
    (dict(data={"task": "weather", "text": "hi"}), 422, "task"),
    (dict(data={"task": "avqa", "text": "no question"}), 422, "question"),
    (dict(data={"task": "digit"}), 422, None),
    (dict(data={"task": "digit", "colour": "red"}), 422, "colour"),
    (dict(data={"task": "digit"}, files={"image": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40)}), 422, "image"),
    (dict(data={"task": "digit"}, files={"audio": ("x.wav", b"RIFF1234WAVEfmt ")}), 422, "audio"),
    (dict(data={"task": "digit"}, files={"image": ("big.png", b"\0" * 600_000)}), 413, None),
    (dict(data={"task": "avqa", "question": "why " * 30}), 413, "question"),
    (dict(data={"task": "digit", "image": "not a file"}), 422, "image"),
    (dict(json={"task": "digit", "image": "%%% not base64"}), 422, "image"),
    (dict(json={"task": "digit", "text": 5}), 422, "text"),
    (dict(json=["task", "digit"]), 422, None),
    (dict(content=b"task=digit", headers={"content-type": "text/plain"}), 415, None),
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 422, None),
])
def test_bad_requests_get_a_4xx_naming_the_field(server: str, how: dict, status: int, field: str | None) -> None:
    answer = post(server, **how)
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field and answer.json()["error"]
    assert "--" not in answer.json()["error"]  # a field of the request, not a command-line flag


def _png(side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float) -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format="WAV")
    return buf.getvalue()


@pytest.mark.parametrize("field, make, limit", [("image", lambda: _png(101), "10000"),
                                                ("audio", lambda: _wav(4.0), "3")])
def test_media_over_a_limit_get_a_413_naming_the_field(server: str, field: str, make, limit: str) -> None:
    """Pixels and seconds, found only by reading the file (the body itself is small): 413 by the error's type."""
    answer = post(server, data={"task": "digit"}, files={field: (f"x.{'png' if field == 'image' else 'wav'}", make())})
    assert answer.status_code == 413, answer.text
    assert answer.json()["field"] == field and f"over the limit of {limit}" in answer.json()["error"]
    assert "moefuse-serve-" not in answer.json()["error"]  # no temporary path leaks into a message
    assert httpx.get(f"{server}/health").status_code == 200


def test_concurrent_requests_are_batched_and_all_answered(server: str, files: dict) -> None:
    image = files["image"].read_bytes()

    def one(i: int) -> httpx.Response:
        return post(server, data={"task": "digit"}, files={"image": (f"{i}.png", image)})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(32)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:1]
    assert len({a.json()["prediction"] for a in answers}) == 1  # the same image, the same answer, in any batch
    assert len({a.json()["id"] for a in answers}) == 32
    assert max(httpx.get(f"{server}/info").json()["recent_batch_sizes"]) > 1


def test_worker_processes_answer_as_one_server(fault_run: Path, files: dict) -> None:
    """--workers 2: two processes, each with its own model and batcher, behind one port, answer as one does:
    every request, the same answer for the same input, and the limits of the flags in each worker."""
    proc, url = start(fault_run / "model", "--workers", "2", "--threads", "1", "--max-text-chars", "50")
    try:
        image = files["image"].read_bytes()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: post(url, data={"task": "digit"}, files={"image": (f"{i}.png", image)}),
                                    range(24)))
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:1]
        assert len({a.json()["prediction"] for a in answers}) == 1
        too_long = post(url, data={"task": "digit", "text": "x" * 51})
        assert too_long.status_code == 413 and too_long.json()["field"] == "text"
        assert httpx.get(f"{url}/info").json()["limits"]["max_text_chars"] == 50
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode is not None


def test_serve_refuses_a_bad_checkpoint_by_name(tmp_path: Path) -> None:
    done = run_cli("serve", "--checkpoint", str(tmp_path / "nothing"), "--port", str(free_port()))
    assert done.returncode == 2 and "nothing" in done.stderr and "Traceback" not in done.stderr


def test_a_request_past_the_timeout_gets_a_504(fault_run: Path, files: dict) -> None:
    proc, url = start(fault_run / "model", "--timeout-s", "0.001", "--max-wait-ms", "0")  # the wait must be shorter
    try:
        answer = post(url, data={"task": "digit"}, files={"image": files["image"].open("rb")})
        assert answer.status_code == 504 and "timeout_s" in answer.json()["error"]
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
