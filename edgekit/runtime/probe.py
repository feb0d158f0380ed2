"""Start one engine alone in this process: ``python -m edgekit.runtime.probe package.module:function``.

`edgekit doctor` runs it in a subprocess (the function comes from the format registry's ``runtime_probe``),
so an engine built for instructions this CPU lacks dies here with SIGILL and doctor can say so. Prints the
engine's version; exits NOT_INSTALLED when the engine does not import.
"""

from __future__ import annotations

import sys

NOT_INSTALLED = 9  # exit status when importing the engine raises ImportError


def start_llama_cpp() -> str:
    """Import llama.cpp and initialise its backend, where its CPU dispatch first runs."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    return llama_cpp.__version__


def llama_cpp_build() -> str:
    """Where llama_cpp was imported from, then llama.cpp's system info (`edgekit pack` checks a fresh build with it)."""
    import llama_cpp

    return f"{llama_cpp.__file__}\n{llama_cpp.llama_print_system_info().decode()}"


def start_onnxruntime() -> str:
    """Import onnxruntime: its cpuinfo library reads the CPU at import."""
    import onnxruntime

    return onnxruntime.__version__


def main(argv: list[str]) -> int:
    from edgekit.formats.spec import load

    (hook,) = argv
    try:
        version = load(hook)()
    except ImportError as exc:
        print(exc)
        return NOT_INSTALLED
    print(version)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
