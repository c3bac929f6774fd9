"""What several benchmarks measure the same way: the peak memory of a process tree, free loopback
ports, and an untrained digits-sized checkpoint (speed of serving does not depend on the weights).

Run the benchmarks that import this as modules from the repository root (`python -m benchmarks.X`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import psutil

SAMPLE_EVERY_S = 1.0


def untrained_digits_checkpoint(directory: Path) -> Path:
    """A checkpoint of the default digits UNet with seeded random weights, under `directory`."""
    import torch

    from diffusion_core.checkpoint import DataSpec, ModelSpec, save_checkpoint
    from diffusion_core.objective import ObjectiveConfig
    from diffusion_core.schedule import ScheduleConfig
    from diffusion_core.unet import UNet, UNetConfig

    torch.manual_seed(0)
    config = UNetConfig.digits_default()
    spec = ModelSpec(unet=config, schedule=ScheduleConfig(), objective=ObjectiveConfig(),
                     data=DataSpec(image_size=8, channels=1, label_names=[str(i) for i in range(10)]))
    return save_checkpoint(directory / "checkpoint", UNet(config), spec)


class TreeMemory:
    """Peak of the summed PSS (RSS where PSS is unreadable) of a process tree, sampled every second
    in a thread: the process `pid` and its descendants, or only the descendants of this process when
    `pid` is None (the Ray processes a driver started, without the driver itself).

    `peak_top`: the largest processes at the peak, as (command line, MiB)."""

    def __init__(self, pid: int | None = None, period_s: float = SAMPLE_EVERY_S) -> None:
        self.root = psutil.Process(pid)
        self.include_root = pid is not None
        self.period_s = period_s
        self.peak_bytes = 0
        self.peak_top: list[tuple[str, float]] = []
        self.metric = "pss"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                procs = [*([self.root] if self.include_root else []), *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            sizes = [(name, size) for name, size in map(self._memory, procs) if size]
            total = sum(size for _, size in sizes)
            if total > self.peak_bytes:
                self.peak_bytes = total
                top = sorted(sizes, key=lambda s: -s[1])[:6]
                self.peak_top = [(name, round(size / 2**20, 1)) for name, size in top]

    def _memory(self, proc: psutil.Process) -> tuple[str, int]:
        try:
            with proc.oneshot():
                # Ray renames its workers' command lines (ray::ServeReplica:<app>:<deployment>)
                name = " ".join(proc.cmdline()[:2])[-60:] or proc.name()
                try:
                    return name, proc.memory_full_info().pss
                except (psutil.AccessDenied, AttributeError):
                    self.metric = "rss"
                    return name, proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return "", 0
