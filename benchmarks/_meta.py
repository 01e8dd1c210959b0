"""The machine and commit lines that the benchmark scripts write into their results files."""

from __future__ import annotations

import os
import platform
import subprocess

import jax

HERE = os.path.dirname(os.path.abspath(__file__))


def machine() -> str:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.system()} {cpu}, {os.cpu_count()} cores, jax {jax.__version__}, "
            f"device {dev.platform} ({dev.device_kind}), load average at the end {load}")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
