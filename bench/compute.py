"""Model-only compute limit: both backbones on synthetic uint8 batches, no I/O, no decode.

Two layouts, each at several batch sizes; the compute limit is the best of all of them:
- ``shared``: one process, all CPU threads, the two backbones one after the other per batch;
- ``split``: one process per backbone, CPUs divided between them, running at the same time
  (what the service's two backbone replicas do); its rate is the slower of the two.
Normalisation (uint8 -> float, mean/std, channels_last) is included, as in a replica.

Child entry point: ``python -m bench.compute --branches NAME[,NAME] ...`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from bench.procs import MemorySampler

Runner = Callable[[object], None]


def make_runner(model, branch: str, backend: str, device: str, threads: int) -> Runner:
    """uint8 (B, 1, S, S) CPU tensor -> logits, on the backend a Backbone replica would use."""
    import torch

    from orthovision.model.tensors import to_model_input

    norm = model.norms[branch]
    mean, std = norm.mean.tolist(), norm.std.tolist()
    net = model.branches[branch].eval()
    if backend.startswith("onnx"):
        from orthovision.model.onnx_export import exported_branch
        from orthovision.model.quantize import int8_graph

        graph = None
        if backend == "onnx-int8":
            graph = int8_graph(model._bench_path, branch, _sha(model))
            if graph is None:
                raise SystemExit(f"no int8 graph for {branch}: run python -m bench.int8 first")
        size = 224
        onnx = exported_branch(
            net,
            weights_sha256=_sha(model),
            branch=branch,
            image_size=size,
            threads=threads,
            graph=graph,
        )

        def run(x):
            onnx(to_model_input(x, mean, std))

        return run
    dtype = torch.float16 if device == "cuda" else torch.float32
    net = net.to(device, dtype).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(x):
        y = net(to_model_input(x, mean, std, device=device, dtype=dtype, channels_last=True))
        if device == "cuda":
            y.float().cpu()  # the host copy a replica makes; also synchronises

    return run


def _sha(model) -> str:
    return getattr(model, "_bench_sha", "unknown")


def child(args: argparse.Namespace) -> dict:
    import torch

    from orthovision.model.checkpoint import load_checkpoint
    from serve.runtime import checkpoint_path, config_from

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    ckpt = load_checkpoint(checkpoint_path(config_from({})))
    ckpt.model._bench_sha = ckpt.card["weights_sha256"]
    ckpt.model._bench_path = ckpt.path
    branches = args.branches.split(",")
    runners = [
        make_runner(ckpt.model, b, args.backend, args.device, args.threads) for b in branches
    ]
    inputs = {b: torch.randint(0, 256, (b, 1, 224, 224), dtype=torch.uint8) for b in args.batches}
    for x in inputs.values():
        for r in runners:  # warm-up (allocators, oneDNN primitives, cudnn autotune)
            r(x)
            r(x)
    # Every process of a layout measures in the same windows: tell the parent, get the start.
    print("READY", flush=True)
    start_at = float(sys.stdin.readline())
    results, cpu_per_img = {}, {}
    for k, batch in enumerate(args.batches):
        x = inputs[batch]
        window_start = start_at + k * (args.seconds + args.gap_s)
        while time.time() < window_start:
            time.sleep(0.005)
        t0, c0 = time.perf_counter(), time.process_time()
        images = 0
        while time.perf_counter() - t0 < args.seconds:
            for r in runners:
                r(x)
            images += batch
        results[str(batch)] = round(images / (time.perf_counter() - t0), 2)
        cpu_per_img[str(batch)] = (time.process_time() - c0) / images
    return {
        "branches": branches,
        "threads": args.threads,
        "img_per_s": results,
        "cpu_s_per_img": cpu_per_img,
    }


def _spawn(branches: str, threads: int, backend: str, device: str, batches, seconds):
    cmd = [
        sys.executable,
        "-m",
        "bench.compute",
        "--branches",
        branches,
        "--threads",
        str(threads),
        "--backend",
        backend,
        "--device",
        device,
        "--seconds",
        str(seconds),
        "--batches",
        *map(str, batches),
    ]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def compute_limit(
    branch_names: Sequence[str],
    backend: str,
    device: str,
    cpus: int,
    batches: Sequence[int],
    seconds: float,
) -> dict:
    """Both layouts at every batch size; returns every rate and the best one."""
    layouts: dict[str, list[tuple[str, int]]] = {"shared": [(",".join(branch_names), cpus)]}
    if device == "cpu" and cpus >= len(branch_names):
        layouts["split"] = [(b, cpus // len(branch_names)) for b in branch_names]
    table: dict[str, dict[str, float]] = {}
    peak_mb: dict[str, float] = {}
    per_cpu: dict[str, dict[str, float]] = {}
    for layout, jobs in layouts.items():
        procs = [_spawn(b, t, backend, device, batches, seconds) for b, t in jobs]
        samplers = [MemorySampler(p.pid, 0.5).start() for p in procs]
        try:
            for p in procs:
                if p.stdout.readline().strip() != "READY":
                    raise RuntimeError(f"compute-limit child failed ({layout})")
            start_at = str(time.time() + 0.5)
            for p in procs:
                p.stdin.write(start_at + "\n")
                p.stdin.close()
            outs = [json.loads(p.stdout.read().strip().splitlines()[-1]) for p in procs]
            for p in procs:
                p.wait()
        finally:
            for p in procs:  # never leave a child behind (error, Ctrl-C)
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for s in samplers:
                s.stop()
        peak_mb[layout] = round(sum(s.peak_mb for s in samplers), 1)
        # Each image needs every branch: a layout runs at its slowest process's rate.
        table[layout] = {str(b): min(o["img_per_s"][str(b)] for o in outs) for b in batches}
        # CPU cost of one image: every process handles every image.
        per_cpu[layout] = {
            str(b): round(1 / sum(o["cpu_s_per_img"][str(b)] for o in outs), 3) for b in batches
        }
    best_layout, best_batch = max(
        ((lay, b) for lay in table for b in table[lay]), key=lambda lb: table[lb[0]][lb[1]]
    )
    return {
        "backend": backend,
        "device": device,
        "img_per_s": table[best_layout][best_batch],
        "best_layout": best_layout,
        "best_batch": int(best_batch),
        "by_layout_and_batch": table,
        # Images per CPU-second, best point: a load-robust limit when the CPUs are shared.
        "img_per_cpu_s": max(v for lay in per_cpu.values() for v in lay.values()),
        "img_per_cpu_s_by_layout_and_batch": per_cpu,
        "peak_mem_mb": peak_mb[best_layout],
        "seconds_per_point": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--branches", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batches", type=int, nargs="+", default=[8])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--gap-s", type=float, default=1.0)
    print(json.dumps(child(p.parse_args())))


if __name__ == "__main__":
    main()
