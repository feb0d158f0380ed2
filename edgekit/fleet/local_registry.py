"""A throw-away OCI registry on loopback (Debian's ``docker-registry``, the CNCF distribution registry), for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

# The distribution registry's config format: https://distribution.github.io/distribution/about/configuration/
REGISTRY_CONFIG = """version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def registry_config(root: Path, port: int, extra: str = "") -> str:
    """The registry's config.yml: blobs under ``root``, listening on 127.0.0.1:``port``, deletes allowed; ``extra`` appended (e.g. ``auth:``)."""
    return REGISTRY_CONFIG.format(root=root, port=port) + extra
