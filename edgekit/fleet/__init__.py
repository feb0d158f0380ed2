"""Fleets of boards: bundles as OCI artifacts in a registry, signed, pulled and switched atomically on each board.

Board side: imports oras (the OCI distribution client), cryptography and edgekit's schemas, never the
workstation stack. Entry points:

- ``push(bundle_dir, ref, client) -> Pushed`` and ``pull(ref, bundles_dir, client, ...) -> Path`` (edgekit.fleet.registry);
- ``sign(ref, private_key, client)`` / ``verify_signature(...)`` (edgekit.fleet.signing);
- ``update(...)`` / ``rollback(...)`` of the served version on a board (edgekit.fleet.board).
"""
