"""Which devices a `tensorq worker` runs on: one worker process per selected GPU, or one on CPU.

The launcher never imports torch: CUDA must not be initialised before a worker forks its pool.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePlan:
    node: str  # Celery node name prefix: gpu0@host, cpu@host
    device: str  # recorded on jobs: cuda:<physical index> or cpu
    cuda_visible_devices: str  # "" hides every GPU from a CPU worker


def detect_gpu_count() -> int:
    """GPUs as nvidia-smi lists them (0 when there is no driver)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def plan_devices(spec: str, gpu_count: int) -> list[DevicePlan]:
    """`none` -> CPU; `all` (or `auto`) -> every GPU, CPU if there is none; `0,2` -> those GPUs."""
    spec = spec.strip().lower()
    cpu = DevicePlan(node="cpu", device="cpu", cuda_visible_devices="")
    if spec == "none":
        return [cpu]
    if spec in ("all", "auto"):
        return [gpu(i) for i in range(gpu_count)] or [cpu]
    indices: list[int] = []
    for part in spec.split(","):
        if not part.strip().isdigit():
            raise ValueError(f"--gpus takes 'all', 'none' or indices like '0,2'; got {spec!r}")
        index = int(part)
        if index >= gpu_count:
            raise ValueError(f"GPU {index} does not exist ({gpu_count} found)")
        if index not in indices:
            indices.append(index)
    return [gpu(i) for i in indices]


def gpu(index: int) -> DevicePlan:
    return DevicePlan(node=f"gpu{index}", device=f"cuda:{index}", cuda_visible_devices=str(index))
