"""The side-by-side performance harness: `python -m bench [--quick] [--gpu] [--json FILE]`.
(Over 400 lines: the run order below is the report's order, kept in one place.)

In one run, on the same images and the same machine:
1. compute limit: both backbones, model only, best layout and batch size, no I/O;
2. naive server: one uvicorn/FastAPI process (full decode, full-size CLAHE, batch 1);
3. OrthoVision Serve: /v1/predict at concurrency 1, 8, 32 and 64 (clients honour
   Retry-After), at 32 again with clients that retry at once, /v1/predict/batch, full-size
   radiographs at concurrency 8, and latency under Poisson load at half the maximum rate;
then the ratios. Every server is started and stopped here (nothing is left running).
The last stdout line is `RESULT {json}`; docs/PERFORMANCE.md documents every key.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import images as image_sets
from bench.compute import compute_limit
from bench.loadgen import Body, closed_loop, open_loop
from bench.procs import Server, port_is_free
from orthovision.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_name() -> str:
    """The CPU model (every absolute figure names the machine it ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import torch

    info = {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def serve_config(args: argparse.Namespace, tmp: Path):
    """The preset under test, moved to a private port and store (never a running service's)."""
    from orthovision.config import OrthoVisionConfig
    from serve.manifests.presets import preset
    from serve.manifests.serve_config import load_serve_file

    cfg = load_serve_file(args.config) if args.config else preset("local")
    if args.gpu:
        cfg = gpu_bench_config(preset("gpu"), os.cpu_count() or 8)
    serve = cfg.serve.model_copy(
        update={
            "host": "127.0.0.1",
            "port": args.port,
            "store_url": f"sqlite:///{tmp}/store.sqlite3",
        }
    )
    if args.cpu_backend:
        serve = serve.model_copy(update={"cpu_backend": args.cpu_backend})
    if "security" in type(serve).model_fields:  # loopback needs no API keys
        serve = serve.model_copy(update={"security": type(serve.security)()})
    return OrthoVisionConfig.model_validate(
        cfg.model_copy(update={"serve": serve}).model_dump(mode="json")
    )


def gpu_bench_config(cfg, cpus: int):
    """The gpu preset with fixed replica counts (autoscaling would move the figures mid-run)."""
    s = cfg.serve

    def pin(d, replicas: int, **extra):
        return d.model_copy(update={"min_replicas": replicas, "max_replicas": replicas, **extra})

    # One card: two backbone replicas and the explainer must fit in 1.0 GPU together.
    serve = s.model_copy(
        update={
            "preprocessor": pin(s.preprocessor, max(1, cpus // 2 - 2)),
            "backbone": pin(s.backbone, 1, num_gpus=0.375),
            "ingress": pin(s.ingress, 2),
            "fusion": pin(s.fusion, 2),
            "explainer": pin(s.explainer, 1, num_gpus=0.25),
        }
    )
    return cfg.model_copy(update={"serve": serve})


def write_serve_file(cfg, tmp: Path) -> Path:
    from serve.manifests.render import render_text

    path = tmp / "bench-serve.yaml"
    path.write_text(render_text(cfg))
    return path


def service_server(cfg, tmp: Path) -> Server:
    """The service under `cfg` (its host and port), as a child process logging into tmp."""
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    config_file = write_serve_file(cfg, tmp)
    cmd = [sys.executable, "-m", "serve.commands", "serve", "--config", str(config_file)]
    return Server("orthovision-serve", cmd, url + "/readyz", tmp / "serve.log")


def bodies(image_set: image_sets.ImageSet) -> list[Body]:
    return [Body(s.data, s.content_type) for s in image_set.samples]


def batch_bodies(image_set: image_sets.ImageSet, per_request: int) -> list[Body]:
    out, samples = [], list(image_set.samples)
    for start in range(0, len(samples), per_request):
        chunk = samples[start : start + per_request]
        if len(chunk) < per_request:
            chunk += samples[: per_request - len(chunk)]
        data, ctype = image_sets.multipart(chunk)
        out.append(Body(data, ctype, images=len(chunk)))
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run_naive(args, sets, tmp: Path, duration_s: float) -> dict:
    url = f"http://127.0.0.1:{args.naive_port}"
    server = Server(
        "naive",
        [sys.executable, "-m", "bench.naive_server", "--port", str(args.naive_port)],
        url + "/healthz",
        tmp / "naive.log",
    )
    try:
        server.start(ready_timeout_s=120)
        probe = {"cpu_probe": server.cpu_s}
        # The same warm-up the service gets: the first forward pays oneDNN's set-up (~3 s).
        closed_loop(url, "/predict", bodies(sets["jpeg224"]), 1, 3, 0)
        out = {}
        for name, image_set in sets.items():
            server.memory.reset_peak()
            row = closed_loop(
                url, "/predict", bodies(image_set), 8, duration_s, args.warmup_s, **probe
            )
            server.memory.sample()
            row["peak_mem_mb"] = round(server.memory.peak_mb, 1)
            row["pss_end_mb"] = server.memory.pss_now_mb()
            out[name] = row
            log(f"naive {name} c=8: {row}")
    finally:
        server.stop()
    return out


def run_serve(args, sets, cfg, tmp: Path, duration_s: float) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    server = service_server(cfg, tmp)
    out: dict = {"predict": {}, "fullsize": {}}
    try:
        server.start(ready_timeout_s=300)
        probe = {"cpu_probe": server.cpu_s}
        jpeg = bodies(sets["jpeg224"])
        closed_loop(url, "/v1/predict", jpeg, 8, 3, 0)  # warm every path once
        warm_explainer(url, jpeg[0], cfg)
        for c in args.concurrency:
            server.memory.reset_peak()
            row = closed_loop(url, "/v1/predict", jpeg, c, duration_s, args.warmup_s, **probe)
            row["peak_mem_mb"] = round(server.memory.peak_mb, 1)
            row["pss_end_mb"] = server.memory.pss_now_mb()
            out["predict"][str(c)] = row
            log(f"serve /v1/predict c={c}: {row}")
        if args.impatient_concurrency:
            c = args.impatient_concurrency
            row = closed_loop(
                url,
                "/v1/predict",
                jpeg,
                c,
                duration_s,
                args.warmup_s,
                honour_retry_after=False,
                **probe,
            )
            out["impatient"] = {str(c): row}
            log(f"serve /v1/predict c={c}, clients ignoring Retry-After: {row}")
        per_request = min(cfg.serve.max_batch_items, args.batch_items)
        server.memory.reset_peak()
        row = closed_loop(
            url,
            "/v1/predict/batch",
            batch_bodies(sets["jpeg224"], per_request),
            args.batch_concurrency,
            duration_s,
            args.warmup_s,
            **probe,
        )
        row.update(
            images_per_request=per_request,
            peak_mem_mb=round(server.memory.peak_mb, 1),
            pss_end_mb=server.memory.pss_now_mb(),
        )
        out["batch"] = row
        log(f"serve /v1/predict/batch x{per_request} c={args.batch_concurrency}: {row}")
        server.memory.reset_peak()
        row = closed_loop(url, "/v1/predict", bodies(sets["fullsize"]), 8, duration_s, 2, **probe)
        row["peak_mem_mb"] = round(server.memory.peak_mb, 1)
        row["pss_end_mb"] = server.memory.pss_now_mb()
        out["fullsize"]["8"] = row
        log(f"serve fullsize c=8: {row}")
        max_rate = max(r["img_per_s"] for r in out["predict"].values())
        row = open_loop(url, "/v1/predict", jpeg, max_rate / 2, duration_s)
        row["p99_over_p50"] = ratio(row["p99_ms"], row["p50_ms"])
        out["half_load"] = row
        log(f"serve open loop at half max ({max_rate / 2:.1f}/s): {row}")
        out["peak_mem_mb"] = round(max(r.get("peak_mem_mb", 0) for r in _rows(out)), 1)
    finally:
        server.stop()
    return out


def warm_explainer(url: str, body: Body, cfg, timeout_s: float = 180.0) -> None:
    """When the explainer runs from the start, one explained request, waited for until
    its explanation is done (or failed): the explainer loads its model after the service is
    ready, and that load must not fall inside the first measured window. Scaled to zero
    (the local default) it stays down: the measured routes never call it."""
    if cfg.serve.explainer.min_replicas == 0:
        return
    import httpx

    with httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post(
            "/v1/predict?explain=true",
            content=body.data,
            headers={"Content-Type": body.content_type},
        )
        answer.raise_for_status()
        link = answer.json()["explanation_url"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if client.get(link).json().get("state") in ("done", "failed"):
                return
            time.sleep(0.5)
    log("warning: the warm-up explanation did not finish")


def _get(rows: dict, key: str, field: str):
    return rows.get(key, {}).get(field)


def _rows(serve: dict):
    for key in ("predict", "fullsize"):
        yield from serve[key].values()
    yield serve["batch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows (<= 5 min on 2 CPUs)")
    parser.add_argument("--gpu", action="store_true", help="CUDA: the gpu preset, fp16 limit")
    parser.add_argument("--json", type=Path, help="also write the RESULT object here")
    parser.add_argument("--config", type=Path, help="Serve config file (default: local preset)")
    parser.add_argument(
        "--cpu-backend", choices=["torch", "onnx", "onnx-int8"], help="override the config's"
    )
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--naive-port", type=int, default=8011)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--impatient-concurrency",
        type=int,
        default=32,
        help="one more /v1/predict point whose clients ignore Retry-After (0: skip)",
    )
    parser.add_argument("--batch-items", type=int, default=32)
    parser.add_argument("--batch-concurrency", type=int, default=2)
    parser.add_argument("--duration-s", type=float, help="seconds per load point")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    duration_s = args.duration_s or (10.0 if args.quick else 30.0)
    if args.gpu and args.batch_concurrency == 2:
        # 4 x 16 images in flight: two full GPU batches, and within what one ingress replica
        # may queue at the preprocessors (more would be answered 503 by design).
        args.batch_concurrency, args.batch_items = 4, 16
    for port in (args.port, args.naive_port):
        if not port_is_free(port):
            raise SystemExit(f"port {port} is in use; pass --port/--naive-port")

    started = time.time()
    device = "cuda" if args.gpu else "cpu"
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="orthovision-bench-"))
    cfg = serve_config(args, tmp)
    backend = "torch" if args.gpu else cfg.serve.cpu_backend
    cpus = os.cpu_count() or 1
    log(f"machine: {cpus} CPUs, load {load_start}, serve backend {backend} on {device}")

    sets = {
        "jpeg224": image_sets.jpeg224(32 if args.quick else 64),
        "fullsize": image_sets.fullsize(8 if args.quick else 12),
    }
    for s in sets.values():
        log(f"images {s.name}: {len(s.samples)} ({s.source}), mean {s.mean_bytes} bytes")

    from orthovision.model.card import read_card
    from serve.runtime import checkpoint_path

    # The checkpoint's branches are what the replicas run (they follow the checkpoint).
    branches = list(read_card(checkpoint_path(cfg))["architectures"])
    if args.gpu:
        batches = [8, 32, 64] if args.quick else [1, 8, 16, 32, 64, 128]
    else:
        batches = [8, 16] if args.quick else [1, 4, 8, 16, 32]
    point_s = 3.0 if args.quick else 6.0
    limit = compute_limit(branches, backend, device, cpus, batches, point_s)
    log(f"compute limit ({backend}): {limit}")
    other = None
    if not args.gpu and not args.quick:
        alt = "torch" if backend.startswith("onnx") else "onnx"
        other = compute_limit(branches, alt, device, cpus, batches, point_s)
        log(f"compute limit ({alt}, for reference): {other}")

    naive = None if args.skip_naive else run_naive(args, sets, tmp, duration_s)
    serve = run_serve(args, sets, cfg, tmp, duration_s)
    if not args.quick:
        # The CPUs may be shared: measure the limit again after the servers and keep the
        # higher one, so a busy moment can only lower the service's ratios, never raise them.
        again = compute_limit(branches, backend, device, cpus, batches, point_s)
        log(f"compute limit again ({backend}): {again}")
        limit["first_img_per_s"] = limit["img_per_s"]
        limit["second_img_per_s"] = again["img_per_s"]
        if again["img_per_s"] > limit["img_per_s"]:
            again.update(first_img_per_s=limit["img_per_s"], second_img_per_s=again["img_per_s"])
            limit = again

    lim = limit["img_per_s"]
    pred = serve["predict"]
    ratios = {
        "batch_over_compute_limit": ratio(serve["batch"]["img_per_s"], lim),
        "predict_c8_over_compute_limit": ratio(pred.get("8", {}).get("img_per_s"), lim),
        "predict_c32_over_compute_limit": ratio(pred.get("32", {}).get("img_per_s"), lim),
        # Overload: goodput (accepted images/s) and accepted p99 against c=8.
        "goodput_c32_over_c8": ratio(_get(pred, "32", "img_per_s"), _get(pred, "8", "img_per_s")),
        "goodput_c64_over_c8": ratio(_get(pred, "64", "img_per_s"), _get(pred, "8", "img_per_s")),
        "p99_c32_over_c8": ratio(_get(pred, "32", "p99_ms"), _get(pred, "8", "p99_ms")),
        "goodput_c32_impatient_over_c8": ratio(
            _get(serve.get("impatient", {}), str(args.impatient_concurrency), "img_per_s"),
            _get(pred, "8", "img_per_s"),
        ),
        "half_load_p99_over_p50": serve["half_load"]["p99_over_p50"],
        # The same ratios in images per CPU-second of the server's own processes: what the
        # service costs per image against the bare models, whatever else runs on the box.
        "batch_over_compute_limit_per_cpu": ratio(
            serve["batch"].get("img_per_cpu_s"), limit.get("img_per_cpu_s")
        ),
        "predict_c8_over_compute_limit_per_cpu": ratio(
            pred.get("8", {}).get("img_per_cpu_s"), limit.get("img_per_cpu_s")
        ),
    }
    if naive:
        ratios.update(
            predict_c8_over_naive_jpeg224=ratio(
                pred.get("8", {}).get("img_per_s"), naive["jpeg224"]["img_per_s"]
            ),
            batch_over_naive_jpeg224=ratio(
                serve["batch"]["img_per_s"], naive["jpeg224"]["img_per_s"]
            ),
            fullsize_c8_over_naive_fullsize=ratio(
                serve["fullsize"]["8"]["img_per_s"], naive["fullsize"]["img_per_s"]
            ),
            predict_c8_over_naive_jpeg224_per_cpu=ratio(
                pred.get("8", {}).get("img_per_cpu_s"), naive["jpeg224"].get("img_per_cpu_s")
            ),
            fullsize_c8_over_naive_fullsize_per_cpu=ratio(
                serve["fullsize"]["8"].get("img_per_cpu_s"),
                naive["fullsize"].get("img_per_cpu_s"),
            ),
        )
    targets = None
    if not args.gpu:
        targets = {
            "batch_ge_85pct_of_limit": _ge(ratios["batch_over_compute_limit"], 0.85),
            "predict_c8_ge_70pct_of_limit": _ge(ratios["predict_c8_over_compute_limit"], 0.70),
            "jpeg224_ge_1_5x_naive": _ge(ratios.get("predict_c8_over_naive_jpeg224"), 1.5),
            "fullsize_ge_3x_naive": _ge(ratios.get("fullsize_c8_over_naive_fullsize"), 3.0),
            "half_load_p99_le_3x_p50": _le(ratios["half_load_p99_over_p50"], 3.0),
        }
    result = {
        "schema": 1,
        "mode": ("gpu" if args.gpu else "cpu") + ("-quick" if args.quick else ""),
        "machine": machine_info(device),
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "duration_s_per_point": duration_s,
        "images": {
            k: {"count": len(v.samples), "mean_bytes": v.mean_bytes, "source": v.source}
            for k, v in sets.items()
        },
        "serve_config": {
            "backend": backend,
            "max_batch_size": cfg.serve.batch.max_batch_size,
            "batch_wait_timeout_s": cfg.serve.batch.batch_wait_timeout_s,
            "backbone_num_cpus": cfg.serve.backbone.num_cpus,
            "preprocessor_num_cpus": cfg.serve.preprocessor.num_cpus,
        },
        "compute_limit": limit,
        "compute_limit_other_backend": other,
        "naive": naive,
        "serve": serve,
        "ratios": ratios,
        "targets_met": targets,
        "wall_s": round(time.time() - started, 1),
    }
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("RESULT " + json.dumps(result, separators=(",", ":")))


def _ge(v: float | None, t: float) -> bool | None:
    return None if v is None else v >= t


def _le(v: float | None, t: float) -> bool | None:
    return None if v is None else v <= t


def print_table(r: dict) -> None:
    lim = r["compute_limit"]
    rows = [
        (
            "compute limit (model only)",
            {"img_per_s": lim["img_per_s"], "img_per_cpu_s": lim.get("img_per_cpu_s")},
        )
    ]
    if r["naive"]:
        rows += [(f"naive {k} c=8", v) for k, v in r["naive"].items()]
    s = r["serve"]
    rows += [(f"serve /v1/predict c={c}", v) for c, v in s["predict"].items()]
    rows += [(f"serve /v1/predict/batch x{s['batch']['images_per_request']}", s["batch"])]
    rows += [("serve fullsize c=8", s["fullsize"]["8"]), ("serve half-load (open)", s["half_load"])]
    keys = ("img_per_s", "img_per_cpu_s", "p50_ms", "p95_ms", "p99_ms", "peak_mem_mb")
    print(f"{'system':34s} " + " ".join(f"{k[:8]:>8s}" for k in keys))
    for name, v in rows:
        cells = [v.get(k) for k in keys]
        print(f"{name:34s} " + " ".join(f"{'-' if c is None else c:>8}" for c in cells))
    print("ratios:", json.dumps(r["ratios"]))
    if r["targets_met"]:
        print("targets:", json.dumps(r["targets_met"]))


if __name__ == "__main__":
    main()
