"""How edgekit runs llama.cpp contexts, declared once: the runtime builds its contexts from these and `edgekit fit`
charges their buffers from the same values. Imports nothing, so a core-only install (a CI runner's fit gate) reads
them without the engine.
"""

# Prompt tokens decoded per llama_decode call (llama-server's n_ubatch: a 793-token prompt prefills in 1.16x its time
# at 256). Cancellation is checked between calls, so this bounds how long a cancelled prefill keeps running (512
# tokens of a 135M model: ~0.2 s on a Pi 5 class CPU).
PREFILL_CHUNK = 512
# Flash attention, as llama-server runs on CPU; `edgekit fit` and the serve budget charge its buffers (RunSettings).
FLASH_ATTENTION = True
# Sequence ids per slot: the idle ones hold earlier conversations' prefixes in the shared pool until it needs the cells.
CACHED_SEQUENCES_PER_SLOT = 2
MAX_SEQUENCES = 64


def sequences_for(slots: int) -> int:
    """Sequence ids (llama.cpp's n_seq_max) of an engine with ``slots`` generation slots."""
    return min(CACHED_SEQUENCES_PER_SLOT * slots, MAX_SEQUENCES)
