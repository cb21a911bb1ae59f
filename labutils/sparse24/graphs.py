"""Capturing a model's forward in a CUDA graph (introduced in 04-Benchmark).

Eager PyTorch launches every kernel from Python; for small kernels, or for the 2:4 sparse weights whose every call
plans a cuSPARSELt matmul on the CPU, the launch overhead can exceed the GPU work. A CUDA graph records the
kernels of one forward once and replays them with a single launch, so the replay costs what the GPU work costs.
The price: fixed shapes and fixed memory addresses — new inputs are copied into the captured input buffer.

Attention under capture: transformers treats stream capture as tracing, so it cannot look at the position ids to
rule out packed sequences, builds a full (1, 1, T, T) causal mask and hands it to SDPA with ``is_causal=False``,
which rules out the flash kernel that an eager forward (no mask, ``is_causal=True``) gets. ``causal_attention``
makes a captured causal prefill take the eager path's attention, so graphed and eager timings compare like with like.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..core.anatomy import model_device
from ..core.errors import LabError
from ..core.validation import check_count, check_shape, check_tensor

CAUSAL_SDPA = "lab_causal_sdpa"  # SDPA registered under a name without a mask function: no mask, is_causal=True


def _plain_causal(config, seq_len: int) -> bool:
    """True when ``config``'s model attends with SDPA, every layer full causal attention over ``seq_len`` tokens (no
    sliding window that would cut in): the one case where no mask and ``is_causal=True`` are exactly its attention."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    window = getattr(config, "sliding_window", None)
    use_window = getattr(config, "use_sliding_window", window is not None)
    return not (use_window and window is not None and window < seq_len)


@contextlib.contextmanager
def causal_attention(model: nn.Module, seq_len: int) -> Iterator[bool]:
    """Inside the ``with``, a causal prefill of ``seq_len`` tokens without padding (``graphed_forward``'s inputs)
    reaches SDPA as in an eager forward: no mask, ``is_causal=True`` — also while a CUDA graph is being captured.

    transformers builds no mask for an attention implementation that has no mask function; SDPA registered under
    ``CAUSAL_SDPA`` is such a one, and SDPA then sets ``is_causal`` itself. Models where that is not exactly their
    attention (eager attention, sliding windows shorter than the prompt, mixed layer types) are left as they are.
    Yields whether the switch was made."""
    config = model.config
    if not _plain_causal(config, seq_len):
        yield False
        return
    AttentionInterface.register(CAUSAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


class GraphedForward:
    """One captured forward: ``graphed(input_ids)`` copies ids (batch, seq) into the static input buffer, replays
    the graph and returns the static logits (batch, kept positions, vocab). The next call overwrites them: clone
    what you keep. ``release()`` frees the graph's private memory pool."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_input: torch.Tensor, static_logits: torch.Tensor):
        self.graph = graph
        self.static_input = static_input
        self.static_logits = static_logits

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            raise LabError("this graphed forward was released; capture a new one with graphed_forward()")
        check_shape("input_ids", input_ids, tuple(self.static_input.shape),
                    hint="a CUDA graph replays the shape it captured: capture another graph for that shape")
        self.static_input.copy_(input_ids)
        self.graph.replay()
        return self.static_logits

    def release(self) -> None:
        """Drop the graph and its buffers so their GPU memory can be reused."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.static_input = self.static_logits = None


def graphed_forward(model: nn.Module, example_input_ids: torch.Tensor, *, warmup: int = 3,
                    logits_to_keep: int = 0) -> GraphedForward:
    """Capture ``model(input_ids=…, use_cache=False)`` for inputs shaped like ``example_input_ids`` (batch, seq).

    As the torch docs require, the forward first runs ``warmup`` times on a side stream (lazy initialisation,
    cuBLAS / cuSPARSELt workspaces, kernel choices happen outside the capture), then once under
    ``torch.cuda.graph``. ``logits_to_keep=1`` keeps only the last position's logits, as ``generate()`` does.
    Both run inside ``causal_attention``, so the graph holds the attention kernel an eager forward uses.
    """
    device = model_device(model)
    if device.type != "cuda":
        raise LabError(f"CUDA graphs need the model on a CUDA GPU; it is on {device}"
                       + ("" if torch.cuda.is_available() else " and this machine has no CUDA GPU torch can use"))
    check_tensor("example_input_ids", example_input_ids, 2, "(batch, seq)")
    check_count("warmup", warmup, minimum=1)  # the torch docs warm up before capture
    static_input = example_input_ids.to(device=device, dtype=torch.long).clone()
    kwargs = {"use_cache": False, "logits_to_keep": logits_to_keep}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with causal_attention(model, static_input.shape[1]), torch.inference_mode():
        with torch.cuda.stream(side):
            for _ in range(warmup):
                model(input_ids=static_input, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(input_ids=static_input, **kwargs).logits
    return GraphedForward(graph, static_input, static_logits)
