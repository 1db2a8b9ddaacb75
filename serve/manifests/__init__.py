"""Deployment files: the Ray Serve config, presets, KubeRay manifests and monitoring."""
