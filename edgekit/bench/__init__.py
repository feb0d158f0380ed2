"""`edgekit bench`: measure bundles on this host, each in a fresh subprocess (board side: no torch)."""
