"""Mixed precision for the quick trainer: whether bf16 pays on this CPU, and the autocast context it trains under.

A recipe's ``amp: true`` asks for bf16 because it is the fast path where it exists. On a CPU it is not always:
:func:`cpu_bf16_is_faster` measures, and :func:`autocast_context` falls back to float32 (and says why) where bf16
would be slower. Under torchrun every process takes the first one's answer, so all train alike.
"""

import argparse
import contextlib
import functools
import logging
import math
import platform
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = [
    'BF16_MIN_SPEEDUP',
    'AutocastFactory',
    'autocast_context',
    'cpu_bf16_is_faster',
    'cpu_has_native_bf16',
    'cpu_matmul_gflops',
    'slow_bf16_reason',
]

_logger = logging.getLogger(__name__)

AutocastFactory = Callable[[], contextlib.AbstractContextManager]  # ``with factory(): ...`` runs under autocast


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively: AVX512-BF16 or AMX on x86, oneDNN's bf16 path elsewhere.

    Without it PyTorch emulates bf16 matmuls, several times slower than float32. With it bf16 is usually the
    faster path, but not always: :func:`cpu_bf16_is_faster` measures.
    """
    if platform.machine().lower() in ('x86_64', 'amd64', 'i386', 'i686'):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


BF16_MIN_SPEEDUP = 1.15  # bf16 costs precision; below this gain over float32 the trainer stays in float32


@functools.cache
def cpu_matmul_gflops() -> tuple[float, float]:
    """This CPU's float32 and bfloat16 matmul speed in GFLOP/s, measured once per process (about 0.1-0.5 s).

    Native bf16 is not always the fast path: on a 2-core Xeon whose VM exposes AVX512-BF16 but not AMX, bf16
    matmuls ran at half the float32 speed, and the 28 px recipe trained 1.45x faster in float32; on an AMD EPYC
    with AVX512-BF16, bf16 ran at 2.3x float32 (docs/benchmark.md). Flags cannot tell the two apart; a matmul can.
    """
    n, reps = 1024, 3
    speeds = []
    generator = torch.Generator().manual_seed(0)  # its own: the trainer has seeded the global one already
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, dtype=dtype, generator=generator) for _ in range(2))
        a @ b  # oneDNN builds its kernel on the first call
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        speeds.append(2 * n**3 / best / 1e9)
    return speeds[0], speeds[1]


def cpu_bf16_is_faster() -> bool:
    """Whether bf16 autocast pays on this CPU: native bf16 whose matmuls beat float32 by ``BF16_MIN_SPEEDUP``."""
    if not cpu_has_native_bf16():
        return False
    fp32, bf16 = cpu_matmul_gflops()
    return bf16 >= BF16_MIN_SPEEDUP * fp32


def _cpu_bf16_pays() -> bool:
    # each torchrun process timed bf16 against float32 for itself, and a close call can go either way: all take the
    # first process's answer, so they train alike
    faster = cpu_bf16_is_faster()
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([int(faster)])
        dist.broadcast(flag, src=0)
        faster = bool(flag.item())
    return faster


def slow_bf16_reason() -> str:
    """Why bf16 would be the slow path on this CPU, in words (for the warning that falls back to float32)."""
    if not cpu_has_native_bf16():
        return 'this CPU has no native bfloat16 matrix instructions (no AVX512-BF16 / AMX), where bf16 is emulated'
    fp32, bf16 = cpu_matmul_gflops()
    return f'bf16 matmuls on this CPU run at {bf16:.0f} GFLOP/s against {fp32:.0f} in float32'


def autocast_context(args: argparse.Namespace, device: torch.device) -> AutocastFactory:
    """The autocast context factory the trainer runs under, for evaluating a model as it was trained.

    ``with autocast_context(args, device)(): model(x)``. bf16 (or float16 on CUDA) autocast when ``args.amp``;
    on a CPU where bf16 is not faster than float32 (:func:`cpu_bf16_is_faster`) a no-op, and ``args.amp`` is set
    False, so args.yaml records what ran.
    """
    if not args.amp:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    if device.type == 'cpu':
        if dtype != torch.bfloat16:
            raise ValueError('amp on CPU needs amp_dtype: bfloat16 (float16 autocast is for CUDA).')
        if not _cpu_bf16_pays():
            # the recipes ask for bf16 because it is the fast path where it exists; here it would be the slow one
            _logger.warning(f'amp: {slow_bf16_reason()}: training in float32 instead.')
            args.amp = False
            return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
