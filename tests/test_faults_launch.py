"""Launch faults: every way of starting `moefuse train` either makes its processes one process group, or is refused
with one line that names the cause and the command to use, before the run folder is written (issue #24, item 7).

Through the real launchers (`accelerate launch`, `torchrun`) on 2 gloo CPU processes of one torch thread each, and
the real CLI in this process where only the environment a launcher sets matters. README.md's "Several GPUs or
nodes" commands are read from the README: the CPU ones run as written, the 8-GPU and 2-node ones mirrored with 2
processes (on one machine, over loopback); the test replaces only the run folder and appends the data and a
1-step run.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY

from moefuse.cli import main as cli

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (a test run under a launcher must not leak into these),
    one torch thread per process (two processes on 2 cores), offline, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(("ACCELERATE_", "PMI_",
                                                                                                "OMPI_", "MV2_"))}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def quick(shards: Path) -> list[str]:
    """What the test appends to a command: its data, no validation, one step, every sample id recorded (per rank)."""
    return [f"data.train_shards=[{shards}]", "data.val_shards=[]", "data.batch_size=4",
            "encoders.audio.max_seconds=0.5", "encoders.audio.layerdrop=0", "train.tensorboard=false",
            "train.warmup_steps=1", "train.max_steps=1", "train.save_every=1", "train.record_sample_ids=true"]


def runnable(argv: list[str], out: Path, shards: Path) -> list[str]:
    """A README command as this test runs it: the launchers through this Python, `train.output_dir` replaced by
    `out`, `configs/x.yaml` (the README's placeholder) by configs/tiny.yaml, `...` dropped, `quick` appended."""
    head = {"accelerate": LAUNCH, "torchrun": TORCHRUN}[argv[0]]
    rest = argv[2:] if argv[0] == "accelerate" else argv[1:]
    rest = [f"train.output_dir={out}" if a.startswith("train.output_dir=") else
            str(TINY) if a == "configs/x.yaml" else a for a in rest if a != "..."]
    if not any(a.startswith("train.output_dir=") for a in rest):
        rest.append(f"train.output_dir={out}")
    return [*head, *rest, *quick(shards)]


def readme_commands() -> list[list[str]]:
    """The launch commands of README.md's "Several GPUs or nodes" section (continued lines joined, comments off)."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Several GPUs or nodes", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


COMMANDS = readme_commands()
GPU = [c for c in COMMANDS if "configs/accelerate/multi-gpu.yaml" in c]
NODES = [c for c in COMMANDS if "--num_machines" in c]
CPU = [c for c in COMMANDS if c not in GPU and c not in NODES]


def run(cmd: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`cmd` in the repository, in `clean_env(**env)` -> the finished process, output as text."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=clean_env(**env))


def one_group(proc: subprocess.CompletedProcess, out: Path) -> None:
    """The run trained as ONE group of 2 processes: ranks 0 and 1 both recorded their samples in the run folder
    (two separate one-process runs would both be rank 0), and the model was exported."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "with 2 processes (MULTI_CPU" in output, output[-2000:]
    ids = [(out / "sample_ids" / f"epoch0000-rank{r:03d}.txt").read_text().split() for r in (0, 1)]
    assert ids[0] and ids[1], ids
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "results.json").is_file()


def sharding(cmd: list[str], out: Path) -> None:
    """What the command's sharding option leaves in its checkpoint: each rank's experts, or FSDP shards."""
    step = out / "checkpoints" / "step-0000001"
    if any(a.startswith("fusion.expert_parallel_size=") for a in cmd):
        assert sorted(p.name for p in step.glob("experts-*")) == ["experts-ep000-of-002.safetensors",
                                                                  "experts-ep001-of-002.safetensors"]
    if "train.fsdp=true" in cmd:
        assert (step / "fsdp").is_dir()


def refused(output: str, *expected: str) -> None:
    """One `moefuse train: error:` line naming the cause, and no traceback from moefuse or from what it refused
    (the launcher's own report of a failed child may follow)."""
    assert "moefuse train: error: " in output, output[-4000:]
    line = next(ln for ln in output.splitlines() if ln.startswith("moefuse train: error: "))
    for text in expected:
        assert text in line, line
    assert f'File "{REPO / "moefuse"}' not in output, output[-4000:]
    for symptom in ("ImportError", "Error initializing torch.distributed"):
        assert symptom not in output, output[-4000:]


# ----------------------------------------------------------------------------------------------------------------
# README's commands: one process group each


def test_readme_lists_the_launch_commands() -> None:
    """The commands the classes below run: 3 on 8 GPUs, 1 on 2 nodes, 3 on the CPU (a README edit that changes
    them is seen here)."""
    assert (len(GPU), len(NODES), len(CPU)) == (3, 1, 3), COMMANDS
    assert {c[0] for c in COMMANDS} == {"accelerate", "torchrun"}


class TestReadmeCpuCommandsRunAsWritten:
    """The CPU block (cpu-2.yaml; `--multi_gpu --num_processes 2` without ACCELERATE_USE_CPU; torchrun): before,
    the first two started two separate one-process runs into one folder (exit 0)."""

    @pytest.mark.slow
    @pytest.mark.parametrize("cmd", CPU, ids=lambda c: " ".join(c[:4]))
    def test_forms_one_group(self, cmd: list[str], fault_data: dict, tmp_path: Path) -> None:
        out = tmp_path / "run"
        proc = run(runnable(cmd, out, fault_data["shards"]))
        one_group(proc, out)
        sharding(cmd, out)


class TestReadmeGpuCommandsMirrored:
    """The 8-GPU block: its three lines are one launch (multi-gpu.yaml) with different moefuse options, which
    the CPU block runs each (expert_parallel_size, train.fsdp). The launch runs here with `--num_processes 2`
    after the config: the same accelerate config, 2 gloo processes."""

    @pytest.mark.slow
    def test_forms_one_group(self, fault_data: dict, tmp_path: Path) -> None:
        launches = {tuple(c[:c.index("-m") + 4]) for c in GPU}  # up to `-m moefuse train configs/x.yaml`
        assert len(launches) == 1, launches
        options = {a.split("=")[0] for c in GPU for a in c[c.index("-m") + 4:]}
        assert options <= {a.split("=")[0] for c in CPU for a in c}, options  # each run in the CPU block
        out = tmp_path / "run"
        argv = runnable(list(next(iter(launches))), out, fault_data["shards"])
        at = argv.index("-m", 3)  # the launcher's `-m moefuse train`
        one_group(run([*argv[:at], "--num_processes", "2", *argv[at:]]), out)


class TestReadmeTwoNodeCommandMirrored:
    """The 2-node command as two launchers on this machine (machine_rank 0 and 1, HOST = 127.0.0.1, one process
    each): the two form one group of 2."""

    @pytest.mark.slow
    def test_forms_one_group(self, fault_data: dict, tmp_path: Path) -> None:
        out = tmp_path / "run"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        base = [{"HOST": "127.0.0.1", "16": "2"}.get(a, a) for a in NODES[0]]
        assert base[base.index("--num_processes") + 1] == "2" and "127.0.0.1" in base
        procs = []
        try:
            for rank in ("0", "1"):
                argv = runnable([rank if a == "0" and base[i - 1] == "--machine_rank" else a
                                 for i, a in enumerate(base)], out, fault_data["shards"])
                at = argv.index("-m", 3)
                procs.append(subprocess.Popen([*argv[:at], "--main_process_port", port, *argv[at:]], cwd=REPO,
                                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                              text=True))
            outputs = [p.communicate(timeout=300)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
        assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
        one_group(subprocess.CompletedProcess([], 0, outputs[0], ""), out)


# ----------------------------------------------------------------------------------------------------------------
# launches that cannot do what they say: refused, no run folder


MULTI_CPU_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
use_cpu: true
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
"""


class TestRefusedThroughTheLaunchers:
    """Each through the real launcher: accelerate's one-process launcher asked for 2 (no MPI here), accelerate's
    FSDP and DeepSpeed engines (DeepSpeed was an ImportError traceback from the Accelerator), a launcher mixed
    precision the config does not have (accelerate's was silently overridden)."""

    CASES = {
        "num-processes-2-without-multi-gpu": ([*LAUNCH, "--num_processes", "2"], {},
                                              ["started this single process", "--multi_gpu --num_processes N"]),
        "cpu-num-processes-2": ([*LAUNCH, "--cpu", "--num_processes", "2"], {},
                                ["started this single process", "cpu-2.yaml"]),
        "multi-cpu-config": ([*LAUNCH, "--config_file", "{multi_cpu}"], {}, ["started this single process"]),
        "use-fsdp": ([*LAUNCH, "--use_fsdp", "--num_processes", "1", "--main_process_port", "0"], {},
                     ["ACCELERATE_USE_FSDP=true", "train.fsdp=true"]),
        "deepspeed-under-torchrun": ([*TORCHRUN, "--standalone", "--nproc_per_node", "1"],
                                     {"ACCELERATE_USE_DEEPSPEED": "true"},
                                     ["ACCELERATE_USE_DEEPSPEED=true", "DeepSpeed"]),
        "launcher-bf16": ([*LAUNCH, "--mixed_precision", "bf16"], {},
                          ["asks for bf16 mixed precision", "train.mixed_precision=no"]),
    }

    @pytest.mark.parametrize("case", list(CASES))
    def test_refused_before_the_run_folder(self, case: str, fault_data: dict, tmp_path: Path) -> None:
        launcher, env, expected = self.CASES[case]
        (tmp_path / "multi-cpu.yaml").write_text(MULTI_CPU_CONFIG)
        launcher = [a.replace("{multi_cpu}", str(tmp_path / "multi-cpu.yaml")) for a in launcher]
        out = tmp_path / "run"
        proc = run([*launcher, "-m", "moefuse", "train", str(TINY), f"train.output_dir={out}",
                    *quick(fault_data["shards"])], **env)
        assert proc.returncode != 0
        refused(proc.stdout + proc.stderr, *expected)
        assert not out.exists()


class TestLauncherVariablesThatDisagree:
    """The variables a launcher sets, left over or made by hand (`moefuse train`, no launcher): a size without its
    rank, a rank not below the size, a size that is not a number, a local rank past the local size, an MPI size;
    each refused before the Accelerator is built (which would wait for peers or fail in its rendezvous)."""

    CASES = {
        "stale-world-size": ({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2 is set but RANK is not", "Unset WORLD_SIZE"]),
        "rank-of-another-world": ({"WORLD_SIZE": "1", "RANK": "1"}, ["RANK=1 with WORLD_SIZE=1"]),
        "negative-rank": ({"WORLD_SIZE": "2", "RANK": "-1"}, ["RANK=-1 with WORLD_SIZE=2"]),
        "world-size-not-a-number": ({"WORLD_SIZE": "two", "RANK": "0"}, ["WORLD_SIZE='two'", "not an integer"]),
        "local-rank-past-local-size": ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
                                       ["LOCAL_RANK=2, LOCAL_WORLD_SIZE=2"]),
        "local-size-past-world": ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"},
                                  ["LOCAL_WORLD_SIZE=4"]),
        "stale-mpi-size": ({"OMPI_COMM_WORLD_SIZE": "4"}, ["OMPI_COMM_WORLD_SIZE=4 is set but OMPI_COMM_WORLD_RANK"]),
        "one-process-launcher-env": ({"ACCELERATE_MIXED_PRECISION": "no", "MASTER_PORT": "29500"},
                                     ["started this single process", "MASTER_PORT=29500"]),
    }

    @pytest.mark.parametrize("case", list(CASES))
    def test_refused_before_the_run_folder(self, case: str, fault_data: dict, tmp_path: Path, monkeypatch,
                                           capsys) -> None:
        env, expected = self.CASES[case]
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        out = tmp_path / "run"
        assert cli(["train", str(TINY), f"train.output_dir={out}", *quick(fault_data["shards"])]) == 2
        refused(capsys.readouterr().err, *expected)
        assert not out.exists()


class TestAccelerateEnginesAndPrecisionByEnvironment:
    """accelerate's engines and mixed precision as its launchers pass them (the variables), in any case of
    "true" (TestOneProcessLaunchesThatAskForNothingTrain: "false" is not refused)."""

    CASES = {
        "deepspeed": ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], ["ACCELERATE_USE_DEEPSPEED=true"]),
        "deepspeed-upper-case": ({"ACCELERATE_USE_DEEPSPEED": "TRUE"}, [], ["accelerate's DeepSpeed"]),
        "fsdp-plugin-with-train-fsdp": ({"ACCELERATE_USE_FSDP": "true"}, ["train.fsdp=true"],
                                        ["ACCELERATE_USE_FSDP=true"]),
        "megatron": ({"ACCELERATE_USE_MEGATRON_LM": "true"}, [], ["Megatron-LM"]),
        "fp16-launcher-bf16-config": ({"ACCELERATE_MIXED_PRECISION": "fp16"}, ["train.mixed_precision=bf16"],
                                      ["asks for fp16 mixed precision", "train.mixed_precision=bf16"]),
    }

    @pytest.mark.parametrize("case", list(CASES))
    def test_refused_before_the_run_folder(self, case: str, fault_data: dict, tmp_path: Path, monkeypatch,
                                           capsys) -> None:
        env, overrides, expected = self.CASES[case]
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        out = tmp_path / "run"
        assert cli(["train", str(TINY), f"train.output_dir={out}", *quick(fault_data["shards"]), *overrides]) == 2
        refused(capsys.readouterr().err, *expected)
        assert not out.exists()


class TestShardingInOneProcess:
    """train.fsdp=true in one process (was a rendezvous traceback, after config.yaml was written), in fp32 and
    bf16: refused before the Accelerator is built."""

    @pytest.mark.parametrize("extra", [[], ["train.mixed_precision=bf16"]], ids=["fp32", "bf16"])
    def test_fsdp_refused_naming_the_key_and_the_launch(self, extra: list[str], fault_data: dict, tmp_path: Path,
                                                        capsys) -> None:
        out = tmp_path / "run"
        assert cli(["train", str(TINY), f"train.output_dir={out}", *quick(fault_data["shards"]), "train.fsdp=true",
                    *extra]) == 2
        refused(capsys.readouterr().err, "train.fsdp=true", "this run has one", "--num_processes 2")
        assert not out.exists()


class TestOneProcessLaunchesThatAskForNothingTrain:
    """The checks refuse what a launch asks for, not its launcher: one process under torchrun with accelerate's
    variables all saying no, and `accelerate launch` with its defaults, train (in one process)."""

    CASES = {
        "torchrun-variables-false": ([*TORCHRUN, "--standalone", "--nproc_per_node", "1"],
                                     {"ACCELERATE_USE_DEEPSPEED": "false", "ACCELERATE_USE_FSDP": "False",
                                      "ACCELERATE_MIXED_PRECISION": "no"}),
        "accelerate-defaults": ([*LAUNCH, "--mixed_precision", "no"], {}),
    }

    @pytest.mark.slow
    @pytest.mark.parametrize("case", list(CASES))
    def test_trains(self, case: str, fault_data: dict, tmp_path: Path) -> None:
        launcher, env = self.CASES[case]
        out = tmp_path / "run"
        proc = run([*launcher, "-m", "moefuse", "train", str(TINY), f"train.output_dir={out}",
                    *quick(fault_data["shards"])], **env)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert "with 1 process (NO" in proc.stdout
        assert (out / "model" / "model.safetensors").is_file()


NO_GROUP = """import sys

import torch

torch.accelerator.is_available = lambda: True  # an accelerator accelerate cannot group (as Apple's MPS)

from moefuse.commands.train import main

sys.exit(main(sys.argv[1:]))
"""


class TestProcessesAccelerateDoesNotGroup:
    """The check after the Accelerator is built: torchrun started 2 processes and accelerate set up one each, as
    on a machine whose accelerator has no distributed backend (Apple's MPS) or none installed; here the machine
    reports an accelerator that accelerate then finds unusable. Without the check each process trained alone,
    as rank 0, into the same run folder."""

    @pytest.mark.slow
    def test_refused_before_the_run_folder(self, fault_data: dict, tmp_path: Path) -> None:
        script = tmp_path / "no_group.py"
        script.write_text(NO_GROUP)
        out = tmp_path / "run"
        proc = run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), str(TINY),
                    f"train.output_dir={out}", *quick(fault_data["shards"])], PYTHONPATH=str(REPO))
        assert proc.returncode != 0
        refused(proc.stdout + proc.stderr, "the launcher started 2 processes", "accelerate set up 1",
                "each process would train alone")
        assert not out.exists()
