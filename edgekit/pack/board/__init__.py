"""Files a pack carries to the board: install.sh and pack_check.py (standard library only; run before edgekit is installed)."""
