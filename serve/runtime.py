"""Small helpers every deployment shares: config from args, device choice, checkpoint path."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from orthovision.config import OrthoVisionConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def config_from(config: dict | OrthoVisionConfig) -> OrthoVisionConfig:
    return (
        config
        if isinstance(config, OrthoVisionConfig)
        else OrthoVisionConfig.model_validate(config)
    )


def checkpoint_path(cfg: OrthoVisionConfig) -> Path:
    """Relative checkpoint paths are relative to the project, wherever Ray starts a worker."""
    path = Path(os.environ.get("ORTHOVISION_CHECKPOINT", cfg.serve.checkpoint))
    return path if path.is_absolute() else PROJECT_ROOT / path


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_threads(num_cpus: float) -> int:
    """Threads for a replica reserving `num_cpus` (a fraction still gets one thread)."""
    return max(1, int(num_cpus))


def limit_cpu_threads(num_cpus: float) -> int:
    """One thread pool per replica sized to its CPUs: no oversubscription (DESIGN.md).

    Returns the thread count, for backends with their own pool (ONNX Runtime)."""
    import cv2

    threads = cpu_threads(num_cpus)
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    return threads


def yield_cpu_to_requests(niceness: int) -> None:
    """Lower this process's CPU priority (a CPU model replica): on a shared machine the short
    steps of the request path (proxy, ingress, preprocessing) then preempt long forwards
    instead of queueing behind them; the model still gets every cycle nobody else wants.

    Linux keeps a nice value per thread and a new thread inherits its creator's: every
    thread that exists now is lowered (Ray starts workers at nice 15; 19 is the floor)."""
    if niceness <= 0:
        return
    tasks = Path("/proc/self/task")
    for tid in [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]:
        try:
            now = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, now + niceness))
        except OSError:  # the thread ended meanwhile
            continue


def enable_cudnn_autotune() -> None:
    """Fixed 224x224 inputs: let cuDNN pick the fastest kernels once, at warm-up.

    (A function, not inline in a deployment class: Ray pickles deployment classes by value
    and torch.backends.cudnn is not picklable.)
    """
    torch.backends.cudnn.benchmark = True


def checkpoint_branches(cfg: OrthoVisionConfig) -> list[str]:
    """Branch names of the checkpoint that will be served (its card, not the serving config:
    a checkpoint may carry other backbones than today's defaults)."""
    from orthovision.checkpoint import branch_names, read_card

    return branch_names(read_card(checkpoint_path(cfg)))
