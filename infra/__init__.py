"""Deployment assets (container image, KubeRay and Kubernetes manifests, compose) and their tools.

`python -m infra.render` writes the KubeRay manifests; `python -m infra.local_cluster` runs a
multi-node Ray cluster on one machine for rehearsals. Not part of the installed package.
"""
