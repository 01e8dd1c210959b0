"""Multi-host (multi-process) scoregrad: one estimate sharded over every device of every process.

Run two processes on one machine (CPU, gloo collectives) to try it::

    python examples/multihost.py --num-processes 2 --process-id 0 &
    python examples/multihost.py --num-processes 2 --process-id 1

On a cluster, call ``jax.distributed.initialize()`` with your launcher's arguments (SLURM and
TPU pods fill them in), then pass ``devices=jax.devices()`` (all devices of all processes).
Unit ``i`` still draws from ``fold_in(key, i)``, so the result equals the one-device result up
to summation order. Everything runs inside ``jax.jit``: outputs are replicated to every process.
"""

import argparse

import jax
import jax.numpy as jnp

import scoregrad as sg


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--coordinator", default="127.0.0.1:12355")
    p.add_argument("--local-devices", type=int, default=2)
    a = p.parse_args()
    jax.config.update("jax_num_cpu_devices", a.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(a.coordinator, a.num_processes, a.process_id)

    theta = {"loc": jnp.array([1.0, -0.5]), "scale": jnp.array([1.0, 2.0])}
    f = lambda x: jnp.sum(x**2)  # noqa: E731  E[f] = sum(loc^2 + scale^2)
    devices = jax.devices()  # global: every process's devices

    @jax.jit
    def grad(theta, key):
        return jax.grad(lambda th: sg.expectation(
            f, sg.families.normal(), th, key, num_samples=100_000, devices=devices))(theta)

    g = grad(theta, jax.random.key(0))
    g = jax.tree_util.tree_map(lambda a: a.addressable_data(0), g)
    print(f"process {a.process_id}/{a.num_processes}, {len(devices)} devices: grad = {g}"
          f" (exact: loc {2 * theta['loc']}, scale {2 * theta['scale']})")


if __name__ == "__main__":
    main()
