"""The `orthovision` console script: the library's commands plus the serving package's
`serve` (run the HTTP service on a local Ray), `dicom-node` (the DICOM node alone) and
`render` (write deploy/ and k8s/).

The library (`orthovision.cli`) never imports this package; this module extends its parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from orthovision import cli
from orthovision.paths import PROJECT_ROOT


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.auth import is_loopback
    from serve.loopback import LOOPBACK_RAY
    from serve.manifests.serve_config import load_serve_file

    if is_loopback(load_serve_file(args.config).serve.host):
        # Read once, when Ray is first imported: set before serve.run imports it.
        os.environ.setdefault(*LOOPBACK_RAY)
    from serve.run import run

    return run(args.config)


def cmd_dicom_node(args: argparse.Namespace) -> int:
    from serve.dicom_node.run import run_node
    from serve.manifests.serve_config import load_serve_file

    return run_node(load_serve_file(args.config), args.port)


def cmd_render(args: argparse.Namespace) -> int:
    from serve.manifests.cluster import ClusterSpec
    from serve.manifests.monitoring import served_drift_baseline
    from serve.manifests.presets import preset
    from serve.manifests.render import render_all, render_k8s

    cluster = {
        key: value
        for key in ("image", "namespace", "operator_namespace", "ingress_namespace")
        if (value := getattr(args, key)) is not None
    }
    spec = ClusterSpec(**cluster, drift_baseline=served_drift_baseline(preset("gpu")))
    for path in [*render_all(args.out), *render_k8s(args.k8s_out, spec)]:
        cli.write_line(f"wrote {path}")
    return cli.EXIT_OK


def add_commands(sub) -> None:
    """Register `serve` and `render` on the library's subparsers."""
    p = sub.add_parser("serve", help="run the HTTP service on a local Ray")
    p.add_argument("--config", type=Path, default=PROJECT_ROOT / "deploy" / "local.yaml")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "dicom-node", help="run the DICOM node alone (C-STORE in, SR/SC out; docs/OPERATIONS.md)"
    )
    p.add_argument("--config", type=Path, default=PROJECT_ROOT / "deploy" / "local.yaml")
    p.add_argument("--port", type=int, help="listen here instead of dicom_node.port")
    p.set_defaults(func=cmd_dicom_node)

    p = sub.add_parser("render", help="write deploy/*.yaml and k8s/* from the config presets")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "deploy")
    p.add_argument("--k8s-out", type=Path, default=PROJECT_ROOT / "k8s")
    p.add_argument("--image", help="the service image, e.g. registry.hospital.example/ov:0.2")
    p.add_argument("--namespace", help="namespace of the RayService, Redis and policies")
    p.add_argument("--operator-namespace", help="namespace of the KubeRay operator")
    p.add_argument("--ingress-namespace", help="namespace of the TLS-terminating ingress")
    p.set_defaults(func=cmd_render)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, extend=add_commands)


if __name__ == "__main__":
    sys.exit(main())
