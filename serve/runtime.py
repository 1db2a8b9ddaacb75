"""Small helpers every deployment shares: config from args, checkpoint path, thread pools.

Torch-free: the ingress, Preprocessor and Fusion replicas import it (docs/DESIGN.md)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orthovision.config import OrthoVisionConfig
from orthovision.paths import checkpoint_dir
from serve import replica_logs
from serve.loopback import confine_replica_grpc


def replica_setup() -> None:
    """What every deployment's constructor does first: keep the replica's gRPC server on
    loopback in local mode (serve/loopback.py), and log replica states once, not per
    retry (serve/replica_logs.py)."""
    confine_replica_grpc()
    replica_logs.install()


def config_from(config: dict | OrthoVisionConfig) -> OrthoVisionConfig:
    return (
        config
        if isinstance(config, OrthoVisionConfig)
        else OrthoVisionConfig.model_validate(config)
    )


def checkpoint_path(cfg: OrthoVisionConfig) -> Path:
    """Relative checkpoint paths are relative to the project, wherever Ray starts a worker."""
    return checkpoint_dir(cfg.serve.checkpoint)


def cpu_threads(num_cpus: float) -> int:
    """Threads for a replica reserving `num_cpus` (a fraction still gets one thread)."""
    return max(1, int(num_cpus))


def limit_cpu_threads(num_cpus: float) -> int:
    """One thread pool per replica sized to its CPUs: no oversubscription (docs/DESIGN.md).

    Sets OpenCV's pool; returns the count for the model replicas' own pools (torch, ONNX
    Runtime), which they set themselves: the CPU-side replicas never import torch."""
    import cv2

    threads = cpu_threads(num_cpus)
    cv2.setNumThreads(threads)
    return threads


def forward_thread(niceness: int, name: str) -> ThreadPoolExecutor:
    """The one thread a CPU model replica runs its forwards on, at a lower CPU priority.

    On a shared machine the short steps of the request path (proxy, ingress, preprocessing,
    and this replica's own Ray I/O threads) then preempt long forwards instead of queueing
    behind them; the model still gets every cycle nobody else wants. Linux keeps a nice
    value per thread: only this thread is lowered (Ray starts workers at 15; 19 is the
    floor)."""

    def lower_priority() -> None:
        now = os.getpriority(os.PRIO_PROCESS, 0)  # 0: the calling thread, on Linux
        os.setpriority(os.PRIO_PROCESS, 0, min(19, now + niceness))

    return ThreadPoolExecutor(
        1, thread_name_prefix=name, initializer=lower_priority if niceness > 0 else None
    )


def may_use_cuda(device: str) -> bool:
    """Whether a model replica may run on CUDA, decided without importing torch: asked for,
    or "auto" on a machine with an NVIDIA driver (torch then makes the final choice)."""
    return device == "cuda" or (device == "auto" and Path("/dev/nvidiactl").exists())


def checkpoint_branches(cfg: OrthoVisionConfig) -> list[str]:
    """Branch names of the checkpoint that will be served (its card, not the serving config:
    a checkpoint may carry other backbones than today's defaults)."""
    from orthovision.model.card import branch_names, read_card

    return branch_names(read_card(checkpoint_path(cfg)))
