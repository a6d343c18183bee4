"""Mixed precision for the quick trainer: whether bf16 pays for this training step on this CPU, and the autocast
context it trains under.

A recipe's ``amp: true`` asks for bf16 because it is the fast path where it exists. On a CPU it is not always:
:func:`decide_cpu_amp` times the run's own training step both ways and falls back to float32 (and says why) where
bf16 would not pay. Under torchrun every process takes the first one's answer, so all train alike.
"""

import argparse
import contextlib
import copy
import logging
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'BF16_MIN_SPEEDUP',
    'BF16_ROUNDS',
    'AutocastFactory',
    'autocast_context',
    'bf16_speedup',
    'cpu_bf16_pays',
    'cpu_has_native_bf16',
    'decide_cpu_amp',
    'slow_bf16_reason',
    'training_step',
]

_logger = logging.getLogger(__name__)

AutocastFactory = Callable[[], contextlib.AbstractContextManager]  # ``with factory(): ...`` runs under autocast


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively: AVX512-BF16 or AMX on x86, oneDNN's bf16 path elsewhere.

    Without it PyTorch emulates bf16 matmuls, several times slower than float32. With it bf16 is usually the
    faster path, but not always: :func:`bf16_speedup` measures.
    """
    if platform.machine().lower() in ('x86_64', 'amd64', 'i386', 'i686'):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


BF16_MIN_SPEEDUP = 1.15  # bf16 costs precision; below this gain over float32 the trainer stays in float32
# Interleaved rounds of the step timing. A VM's speed drifts by 1.5x within minutes, and a probe of isolated
# matmuls once read 1.15x where the real step ran 2.1x faster in bf16: each round times both dtypes back to back
# (so drift cancels within the round), and the median round decides (so one disturbed round does not).
BF16_ROUNDS = 5


def training_step(
    model: nn.Module, in_shape: tuple[int, ...], num_classes: int, batch_size: int, channels_last: bool = False
) -> Callable[[bool], None]:
    """One training step (forward, cross-entropy, backward) of a copy of ``model`` on a random batch.

    The returned function takes whether to run under bf16 autocast. It uses the copy and its own random batch, so
    timing it leaves the model, its gradients and the seeded random generators as they were.

    Args:
        model: The model to train (on the CPU).
        in_shape: One image's (C, H, W).
        num_classes: The model's classes.
        batch_size: The training batch size.
        channels_last: Feed NHWC batches, as the trainer does with channels_last.
    """
    model = copy.deepcopy(model).train()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *in_shape, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)

    def step(bf16: bool) -> None:
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator the trainer has seeded
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def bf16_speedup(
    step: Callable[[bool], None], rounds: int = BF16_ROUNDS, timer: Callable[[], float] = time.perf_counter
) -> float:
    """How many times faster ``step`` runs under bf16 autocast than in float32: the median of interleaved rounds.

    Each dtype runs once untimed first (oneDNN builds its kernels on the first call). Each round times both, in
    alternating order, and its ratio compares two runs seconds apart.
    """
    step(False)
    step(True)
    ratios = []
    for r in range(rounds):
        seconds = {}
        for bf16 in (False, True) if r % 2 == 0 else (True, False):
            start = timer()
            step(bf16)
            seconds[bf16] = timer() - start
        ratios.append(seconds[False] / max(seconds[True], 1e-12))
    return statistics.median(ratios)


def slow_bf16_reason(speedup: float | None) -> str:
    """Why bf16 does not pay here, in words: emulated bf16, or the measured speed-up of the step."""
    if speedup is None:
        return 'this CPU has no native bfloat16 matrix instructions (no AVX512-BF16 / AMX), where bf16 is emulated'
    return (
        f'the training step ran {speedup:.2f}x as fast in bf16 as in float32 on this CPU (median of '
        f'{BF16_ROUNDS} interleaved rounds; bf16 needs {BF16_MIN_SPEEDUP}x)'
    )


def cpu_bf16_pays(step: Callable[[bool], None]) -> tuple[bool, float | None]:
    """Whether bf16 autocast pays for ``step`` (:func:`training_step`) on this CPU, and the speed-up measured.

    No where bf16 is emulated (nothing is timed then: None), or where the step runs less than ``BF16_MIN_SPEEDUP``
    times as fast in bf16.
    """
    if not cpu_has_native_bf16():
        return False, None
    speedup = bf16_speedup(step)
    return speedup >= BF16_MIN_SPEEDUP, speedup


def decide_cpu_amp(
    args: argparse.Namespace, model: nn.Module, in_shape: tuple[int, ...], device: torch.device
) -> float | None:
    """Keep ``args.amp`` on a CPU only where bf16 pays for this model's training step; returns the speed-up measured.

    Where it does not (:func:`cpu_bf16_pays`), ``args.amp`` becomes False, so args.yaml records what ran, and a
    warning says why. Nothing changes on a GPU or without ``args.amp``. Under torchrun every process takes the first
    one's answer, so all train alike.
    """
    if not args.amp or device.type != 'cpu':
        return None
    if args.amp_dtype != 'bfloat16':
        raise ValueError('amp on CPU needs amp_dtype: bfloat16 (float16 autocast is for CUDA).')
    step = training_step(model, in_shape, args.num_classes, args.batch_size, bool(args.channels_last))
    pays, speedup = cpu_bf16_pays(step)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([int(pays)])
        dist.broadcast(flag, src=0)
        pays = bool(flag.item())
    if pays:
        _logger.info(f'amp: the training step ran {speedup:.2f}x as fast in bf16 as in float32: training in bf16.')
    else:
        _logger.warning(f'amp: {slow_bf16_reason(speedup)}: training in float32 instead.')
        args.amp = False
    return speedup


def autocast_context(args: argparse.Namespace, device: torch.device) -> AutocastFactory:
    """The autocast context factory the trainer runs under, for evaluating a model as it was trained.

    ``with autocast_context(args, device)(): model(x)``. bf16 (or float16 on CUDA) autocast when ``args.amp``, else a
    no-op. On a CPU, :func:`decide_cpu_amp` has already set ``args.amp`` to what pays there.
    """
    if not args.amp:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    if device.type == 'cpu' and dtype != torch.bfloat16:
        raise ValueError('amp on CPU needs amp_dtype: bfloat16 (float16 autocast is for CUDA).')
    return lambda: torch.autocast(device.type, dtype=dtype)
