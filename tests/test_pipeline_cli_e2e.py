"""A user's day through the console script, in a fresh folder: `run` interrupted by Ctrl-C during
training, `run` again (it resumes), `serve` with no flags, then every command `run` printed.

The CLI runs as a subprocess in its own process group with SIGINT at its default, as a terminal
runs it; Ctrl-C is SIGINT to that whole group. The config file comes from DIFFUSION_PIPELINE_CONFIG
(tiny settings, a free port), so the commands themselves carry no flags. Each process gets its own
Ray temp dir and Prefect home, so that leftovers can be told apart from other processes on the
machine.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from local_services import free_port

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).with_name("diffusion-pipeline"))
INTERRUPT_WITHIN_S = 60  # generous for a loaded 2-core CI machine; measured ~20 s
# A background job of a non-interactive shell (how CI may run pytest) starts with SIGINT ignored, its
# children inherit that, and Python then never raises KeyboardInterrupt: Ctrl-C would be ignored by
# design. A terminal starts commands with SIGINT at its default; this shim does the same.
AS_A_TERMINAL = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                 "os.execv(sys.argv[1], sys.argv[1:])")
TINY = {
    "train": {"steps": 200, "batch_size": 32, "warmup_steps": 5, "checkpoint_every": 20, "log_every": 10,
              "num_sample_images": 8, "sample_steps": 5, "unet": {"base_channels": 16, "num_res_blocks": 1}},
    "evaluate": {"num_samples": 40, "steps": 5, "batch_size": 40, "feature_net": {"steps": 50}},
}


@dataclass(frozen=True)
class Day:
    folder: Path
    env: dict[str, str]
    ray_tmp: str
    port: int
    interrupted: subprocess.CompletedProcess
    interrupt_seconds: float
    leftovers_after_interrupt: list[str]
    rerun: subprocess.CompletedProcess


def start(args: list[str], day_env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """`args` started as a terminal starts a command: its own process group, SIGINT at its default."""
    return subprocess.Popen([sys.executable, "-c", AS_A_TERMINAL, *args], cwd=cwd, env=day_env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_text(log: Path, pattern: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {pattern!r}:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    raise AssertionError(f"no {pattern!r} after {timeout_s}s:\n{log.read_text()[-3000:]}")


def processes_of(pgid: int | None, marker: str | None) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes in process group `pgid` or with `marker` (a temp
    dir) in their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z" and (int(stat[2]) == pgid or (marker is not None and marker in cmdline)):
            found.append((int(entry.name), cmdline[:160]))
    return found


def wait_gone(pgid: int | None, marker: str | None, timeout_s: float = 30) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_of(pgid, marker)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def stop(proc: subprocess.Popen, marker: str | None = None) -> None:
    """Ctrl-C for a process group the test started, then make sure nothing of it is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=INTERRUPT_WITHIN_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid, _ in wait_gone(proc.pid, marker, timeout_s=10):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Day]:
    folder = tmp_path_factory.mktemp("day")
    port = free_port()
    config = folder / "pipeline.yaml"
    evaluate = {**TINY["evaluate"], "cache_dir": str(folder / "fcache")}
    config.write_text(yaml.safe_dump({**TINY, "evaluate": evaluate,
                                      "serve": {"port": port, "max_images_per_batch": 8}}))
    ray_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_TRACKING", "PREFECT_API", "RAY_ADDRESS"))}
    env.update(DIFFUSION_PIPELINE_CONFIG=str(config), RAY_TMPDIR=ray_tmp,
               PREFECT_HOME=str(folder / "prefect"))
    log = folder / "run-interrupted.log"
    proc = start([CLI, "run", "-n", "8"], env, folder, log)
    try:
        wait_for_text(log, r"train: step [3-9]0/200", proc, timeout_s=600)  # past the checkpoint at 20
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=INTERRUPT_WITHIN_S)
        seconds = time.monotonic() - sent
        leftovers = wait_gone(proc.pid, ray_tmp)
    finally:
        stop(proc, ray_tmp)
    interrupted = subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text())
    rerun = subprocess.run([CLI, "run", "-n", "8"], cwd=folder, env=env, capture_output=True, text=True,
                           timeout=900)
    (folder / "rerun.log").write_text(rerun.stdout + rerun.stderr)
    yield Day(folder, env, ray_tmp, port, interrupted, seconds, leftovers, rerun)
    assert not wait_gone(None, ray_tmp), "processes of the day outlived it"


def test_ctrl_c_during_training_stops_everything_within_seconds(day: Day) -> None:
    out = day.interrupted.stdout
    assert day.interrupted.returncode == 130, out[-3000:]
    assert day.interrupt_seconds < INTERRUPT_WITHIN_S, out[-3000:]
    assert "interrupted" in out and "rerun the same command" in out
    assert "ConnectError" not in out and "Traceback" not in out and "Crash detected" not in out
    assert day.leftovers_after_interrupt == []


def test_the_rerun_resumes_training_without_logging_a_step_twice(day: Day) -> None:
    from mlflow import MlflowClient

    assert day.rerun.returncode == 0, day.rerun.stdout[-3000:] + day.rerun.stderr[-3000:]
    match = re.search(r"resumed at step (\d+)", day.rerun.stdout)
    assert match and int(match.group(1)) >= 20, day.rerun.stdout
    client = MlflowClient(f"sqlite:///{day.folder}/diffusion-pipeline-work/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("diffusion").experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    # every scheduled point once; on a slow machine LogCadence adds points between them by time
    assert len(steps) == len(set(steps)) and set(range(10, 201, 10)) <= set(steps)


def printed_commands(stdout: str) -> list[str]:
    """The commands of the summary: the indented lines after the blank line that ends its facts
    (model, evaluation, samples, time)."""
    tail = stdout[stdout.rindex("\nmodel "):]
    commands = tail[tail.index("\n\n") + 2:]
    return [line.strip() for line in commands.splitlines() if line.startswith("  ")]


def test_serve_with_no_flags_and_every_printed_command_work_after_run(day: Day) -> None:
    from mlflow import MlflowClient

    commands = printed_commands(day.rerun.stdout)
    assert commands[0] == "diffusion-pipeline serve", commands  # the one command that brings it back
    assert "the endpoint" in day.rerun.stdout.lower() and "stopped" in day.rerun.stdout
    champion = MlflowClient(f"sqlite:///{day.folder}/diffusion-pipeline-work/mlflow.db") \
        .get_model_version_by_alias("diffusion-digits", "champion").version
    champion = str(champion)
    grid = re.search(r"samples\s+(\S+\.png) \(8 images by diffusion-digits version (\d+)", day.rerun.stdout)
    assert grid and grid.group(2) == champion
    assert Path(grid.group(1)).name == f"diffusion-digits-v{champion}.png"

    serve_log = day.folder / "serve.log"
    server = start([CLI, *shlex.split(commands[0])[1:]], day.env, day.folder, serve_log)
    try:
        wait_for_text(serve_log, r"Ctrl-C stops", server, timeout_s=300)
        info = httpx.get(f"http://127.0.0.1:{day.port}/model", timeout=60).json()
        assert (info["name"], info["version"], info["alias"]) == ("diffusion-digits", champion, "champion")
        for command in commands[1:]:
            run_printed(command, day)
    finally:
        stop(server, day.ray_tmp)
    assert server.returncode == 0, serve_log.read_text()[-2000:]
    assert (day.folder / "samples" / "grid.png").is_file()  # written by the printed `generate`


def run_printed(command: str, day: Day) -> None:
    """Run one printed command as a user would; `mlflow ui` is a server: it must answer, then stop.
    Its port (5000) is swapped for a free one, as on a shared machine 5000 may be taken."""
    words = shlex.split(command)
    if words[0] == "diffusion-pipeline":
        words[0] = CLI
    if words[:2] == ["mlflow", "ui"]:
        assert words[-2:] == ["--port", "5000"], command
        port = free_port()
        words = [str(Path(sys.executable).with_name("mlflow")), *words[1:-1], str(port)]
        log = day.folder / "mlflow-ui.log"
        ui = start(words, day.env, day.folder, log)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and ui.poll() is None, log.read_text()[-2000:]
                time.sleep(1)
        finally:
            stop(ui)
    done = subprocess.run(words, cwd=day.folder, env=day.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
