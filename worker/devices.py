"""What a worker runs on, described without initialising CUDA (the Celery worker forks its pool after this)."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path


def cuda_index(device: str) -> int:
    """`cuda` → 0, `cuda:3` → 3."""
    return int(device.split(":", 1)[1]) if ":" in device else 0


def normalise_device(device: str) -> str:
    """`cuda` → `cuda:0`, so that records and provenance name the card."""
    return f"cuda:{cuda_index(device)}" if device.startswith("cuda") else device


def device_name(device: str) -> str | None:
    """The GPU's name from nvidia-smi (no CUDA context is created), or the CPU's model name; None if unknown."""
    if device.startswith("cuda"):
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader", "-i", str(cuda_index(device))],
                capture_output=True, text=True, timeout=10, check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None
