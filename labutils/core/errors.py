"""Errors the lab raises on purpose, so callers (the CLI, notebooks) can tell them from bugs. (No torch import
at module level: ``publish`` uses these in processes that never load torch.)"""


class LabError(RuntimeError):
    """Something the user can fix: a missing download, a machine without CUDA, a full GPU."""


class BadInput(LabError, ValueError):
    """An argument outside what is allowed. The message names the value given and the allowed range."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch running out of memory: ``torch.OutOfMemoryError`` on a GPU, or the RuntimeError of the CPU
    allocator ("[enforce fail at alloc_cpu.cpp] … DefaultCPUAllocator: can't allocate memory: …")."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError)
                                                       and "can't allocate memory" in str(exc))
