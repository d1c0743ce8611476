"""aotlib: a companion to two ICML 2024 papers.

- Arrows of Time for Large Language Models (Papadopoulos, Wenger, Hongler)
- Transformers are SSMs / Mamba-2 (Dao, Gu)

Modules are named after the papers' own concepts; ``ls aotlib`` explains the package.
"""

__version__ = "0.1.0"


def _interpret_triton_without_cuda() -> None:
    """Without CUDA, run the Triton kernels on Triton's interpreter (aotlib.ssd_triton).

    Triton reads TRITON_INTERPRET once, when it is first imported, and torch._dynamo
    imports it (a `torch.compiler.disable` decorator at import time is enough), so the
    variable must be set before any aotlib module runs: here, the package's first line.
    """
    import os

    if "TRITON_INTERPRET" in os.environ:
        return
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_interpret_triton_without_cuda()
