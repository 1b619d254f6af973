"""The README runs: every Python block is executed as written, and every command in its shell blocks is run or
mirrored one for one, in a sandbox folder laid out like a checkout after `make demo`.

Placeholders in the README's commands are real there: `runs/x` is a trained run (the tiny fault-test run),
`data/manifest.jsonl` its manifest (the README's
build-shards line builds `data/shards` from it), `configs/x.yaml` configs/tiny.yaml, `clip.wav` a
recording, `samples.jsonl` a manifest. Commands that would take minutes run shorter (`SHORTER`: fewer steps or
samples, same flags). `accelerate launch` and `torchrun` lines are run or mirrored by
tests/test_faults_launch.py; `make` targets
must exist in the Makefile (CI runs `make test` and `make lint`; `make demo` is mirrored by a short demo here).
A command of a kind this file does not know fails the test: add a way to run it.
"""

from __future__ import annotations

import base64
import io
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, run_overrides
from PIL import Image

README = REPO / "README.md"


@dataclass
class Block:
    lang: str
    line: int  # of the opening fence
    text: str


def readme_blocks() -> list[Block]:
    blocks, current = [], None
    for number, line in enumerate(README.read_text().splitlines(), 1):
        fence = re.fullmatch(r"```(\w*)\s*", line)
        if current is None and fence:
            current = Block(fence.group(1), number, "")
        elif current is not None and line.startswith("```"):
            blocks.append(current)
            current = None
        elif current is not None:
            current.text += line + "\n"
    assert current is None, f"README.md: the code block at line {current.line} is never closed"
    return blocks


def readme_commands() -> list[tuple[int, list[str]]]:
    """(line of the block, argv) of every command line in the bash blocks, continuations joined, comments out."""
    found = []
    for block in readme_blocks():
        if block.lang not in ("bash", "sh"):
            continue
        for line in block.text.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                found.append((block.line, argv))
    return found


COMMANDS = readme_commands()
KINDS = {"moefuse", "make", "accelerate", "torchrun", "curl", "python"}


def test_the_readme_has_commands_and_python_and_every_command_is_of_a_known_kind() -> None:
    assert len(COMMANDS) > 20 and sum(b.lang == "python" for b in readme_blocks()) >= 2
    unknown = [f"line {n}: {shlex.join(a)}" for n, a in COMMANDS if a[0] not in KINDS]
    assert not unknown, f"README commands this test cannot run or mirror: {unknown}"


def test_every_launch_line_is_one_that_the_launch_tests_run_or_mirror() -> None:
    from test_faults_launch import readme_commands as launch_commands

    covered = launch_commands()
    launches = [(n, a) for n, a in COMMANDS if a[0] in ("accelerate", "torchrun")]
    assert launches and all(a in covered for _, a in launches), [a for _, a in launches if a not in covered]


def test_every_make_target_the_readme_names_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    for _, argv in COMMANDS:
        if argv[0] == "make":
            for target in argv[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"make {target}: no such target"


def test_every_python_script_the_readme_runs_exists_and_takes_help() -> None:
    scripts = {a[1] for _, a in COMMANDS if a[0] == "python" and a[1].endswith(".py")}
    for script in scripts:
        out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        assert out.returncode == 0 and "usage" in out.stdout, (script, out.stderr[-500:])


# ---------------------------------------------------------------------------------------------------------------
# the sandbox: a checkout after `make demo`, with the README's placeholder paths real


@pytest.fixture(scope="module")
def sandbox(fault_run: Path, fault_data: dict, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    data = fault_data["root"] / "data"
    (root / "configs").mkdir()
    for item in (REPO / "configs").iterdir():
        (root / "configs" / item.name).symlink_to(item)
    shutil.copy(REPO / "configs" / "tiny.yaml", root / "configs" / "x.yaml")
    demo = root / "outputs" / "demo"
    demo.mkdir(parents=True)
    (demo / "run").symlink_to(fault_run)
    (demo / "shards").symlink_to(fault_data["shards"])
    (demo / "data").symlink_to(data)
    (root / "runs").mkdir()
    shutil.copytree(fault_run, root / "runs" / "x")
    (root / "data").mkdir()
    (root / "data" / "media").symlink_to(data / "media")
    (root / "media").symlink_to(data / "media")
    shutil.copy(data / "manifest.jsonl", root / "data" / "manifest.jsonl")
    shutil.copy(data / "manifest.jsonl", root / "samples.jsonl")
    shutil.copy(next((data / "media" / "audio").iterdir()), root / "clip.wav")
    return root


# Commands that would take minutes run with these appended: the same flags, less work.
SHORTER = {
    "train": run_overrides(Path("data/shards"), Path("runs/readme"))[2:],  # fewer steps, small batches
    "demo-data": ["--count", "60"],
}


def _shorter(argv: list[str], previous_train: list[str]) -> list[str]:
    command, rest = argv[1], argv[2:]
    if command == "train":
        rest = [a for a in rest if not a.startswith("train.max_steps=")]
        if "..." in rest:  # `moefuse train configs/tiny.yaml ... --resume`: the overrides of the one before
            i = rest.index("...")
            rest = rest[:i] + previous_train + rest[i + 1:]
        if "--resume" not in rest:
            rest += SHORTER["train"]
        return [command, *rest]
    return [command, *rest, *SHORTER.get(command, [])]


def _run_moefuse(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moefuse", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


def test_every_moefuse_command_in_the_readme_runs(sandbox: Path) -> None:
    """Each `moefuse` line but `serve` (run by the next test), in README order, exits 0 (`predict` with
    `--min-confidence` may exit 1: it reports errors per sample; none are expected here)."""
    previous_train: list[str] = []
    ran = 0
    for line, argv in COMMANDS:
        if argv[0] != "moefuse" or argv[1] == "serve":
            continue
        args = _shorter(argv, previous_train)
        if args[0] == "train" and "--resume" not in args:
            previous_train = [a for a in args[2:] if "=" in a]
            shutil.rmtree(sandbox / "runs" / "readme", ignore_errors=True)
        out = _run_moefuse(args, sandbox)
        assert out.returncode == 0, f"README line {line}: moefuse {shlex.join(args)}\n{out.stderr[-2000:]}"
        assert "Traceback" not in out.stderr
        ran += 1
    assert ran >= 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "the server exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the server did not answer /health in time")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed: the README's curl lines need it")
def test_every_serve_and_curl_line_in_the_readme_runs(sandbox: Path) -> None:
    """Each `moefuse serve` line starts a server that answers /health; against the first, every curl line of the
    README answers 200 with JSON (the README's port 8000 becomes a free one; `<base64>` a real PNG)."""
    import json

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    serves = [(n, a) for n, a in COMMANDS if a[:2] == ["moefuse", "serve"]]
    curls = [(n, a) for n, a in COMMANDS if a[0] == "curl"]
    assert serves and curls
    for i, (line, argv) in enumerate(serves):
        port = _free_port()
        args = [a for a in argv[1:]]
        args = args[:args.index("--port")] + args[args.index("--port") + 2:] if "--port" in args else args
        proc = subprocess.Popen([sys.executable, "-m", "moefuse", *args, "--port", str(port)], cwd=sandbox,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_healthy(port, proc)
            if i > 0:
                continue
            for curl_line, curl in curls:
                cmd = [a.replace("localhost:8000", f"127.0.0.1:{port}").replace("<base64>", png) for a in curl]
                out = subprocess.run([*cmd, "-w", "\n%{http_code}"], capture_output=True, text=True, cwd=sandbox,
                                     timeout=120)
                body, _, status = out.stdout.rpartition("\n")
                assert status == "200", f"README line {curl_line}: {shlex.join(curl)} -> {status} {body[:500]}"
                assert isinstance(json.loads(body), dict)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        assert line


def test_every_python_block_in_the_readme_runs_as_written(sandbox: Path) -> None:
    for block in readme_blocks():
        if block.lang != "python":
            continue
        script = sandbox / f"readme_block_{block.line}.py"
        script.write_text(block.text)
        out = subprocess.run([sys.executable, script.name], capture_output=True, text=True, cwd=sandbox,
                             timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, f"README block at line {block.line}:\n{out.stderr[-3000:]}"


def test_make_demo_is_mirrored_by_a_short_demo(tmp_path: Path) -> None:
    """`make demo` runs `moefuse demo --out outputs/demo`; the same command, on fewer samples and steps."""
    out = _run_moefuse(["demo", "--out", str(tmp_path / "demo"), "--count", "200", "train.max_steps=3",
                        "train.eval_every=3", "train.save_every=3"], REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "accuracy per split" in out.stdout and "eval-test.json" in out.stdout
    assert (tmp_path / "demo" / "eval-test.json").is_file() and (tmp_path / "demo" / "predictions.jsonl").is_file()
