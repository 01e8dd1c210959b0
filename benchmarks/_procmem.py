"""Peak memory of this process image, shared by the benchmark scripts (run from benchmarks/)."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """This process image's peak resident memory (VmHWM), MiB.

    Not ``getrusage().ru_maxrss``: Linux keeps that across ``execve``, so a child process would
    report its parent's peak (the parent here imports jax, optax and torch).
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
