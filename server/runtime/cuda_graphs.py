"""The network captured as CUDA graphs at fixed batch sizes: a batch costs one launch, not ~900.

An eager Inception-ResNet-V1 forward is launch-bound on a large GPU (~14–18 ms for any
batch up to 256), and nearly all of that is the CPU queuing kernels while it holds the
GIL, time the server's decode and landmark threads need. A captured graph replays the
whole forward in one call. Graphs have fixed shapes, so each size in ``sizes`` gets its
own graph (all sharing one memory pool), a batch is padded up to the next size, and a
batch larger than the largest size runs in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .model import SeverityOutput

_WARMUP_PASSES = 3  # before capture, on a side stream: cuDNN picks its algorithms here


def bucket_for(rows: int, sizes: Sequence[int]) -> int:
    """The smallest size that holds ``rows`` (the largest when none does: the caller chunks)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return next((size for size in sorted(sizes) if size >= rows), max(sizes))


def powers_of_two_up_to(limit: int) -> tuple[int, ...]:
    """1, 2, 4, … up to ``limit``, and ``limit`` itself: the batch sizes worth a graph each."""
    sizes = {1 << k for k in range(max(limit, 1).bit_length()) if 1 << k <= limit}
    return tuple(sorted(sizes | {limit}))


class CapturedForward:
    """Replays ``net`` (on CUDA, eval mode, weights in the dtype inputs should have) from captured graphs."""

    def __init__(self, net: nn.Module, sizes: Sequence[int], input_size: int) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"sizes must be positive batch sizes, got {tuple(sizes)}")
        parameter = next(net.parameters())
        device, dtype = parameter.device, parameter.dtype
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the network on a CUDA device, not {device}")
        self.sizes = tuple(sorted(set(sizes)))
        # The graphs read the weights where they lay at capture: without this reference the
        # caller's net could be freed and its memory reused, and every replay would return garbage.
        self._net = net
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, SeverityOutput] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        with torch.no_grad():
            for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory
                static = torch.zeros((size, 3, input_size, input_size), device=device, dtype=dtype)
                static = static.contiguous(memory_format=torch.channels_last)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(_WARMUP_PASSES):
                        net(static)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    output = net(static)
                self._inputs[size], self._outputs[size], self._graphs[size] = static, output, graph
        torch.cuda.synchronize(device)

    def __call__(self, x: torch.Tensor) -> SeverityOutput:
        rows, largest = x.shape[0], self.sizes[-1]
        if rows > largest:
            parts = [self(x[start : start + largest]) for start in range(0, rows, largest)]
            return SeverityOutput(torch.cat([p.logits for p in parts]), torch.cat([p.embedding for p in parts]))
        size = bucket_for(rows, self.sizes)
        static = self._inputs[size]
        static[:rows].copy_(x)
        if rows < size:
            static[rows:].zero_()  # padding: its rows are computed and dropped
        self._graphs[size].replay()
        output = self._outputs[size]
        # Copies: the next replay overwrites the graph's output tensors.
        return SeverityOutput(output.logits[:rows].clone(), output.embedding[:rows].clone())
