"""Training and inference speed of smallvit against timm's VisionTransformer and the textbook model, on the CPU.

For the seed shape (``smallvit``: 96 px, patch 16, width 512, depth 2) and a 28 px shape
(``smallvit_small_patch4_28``: patch 4, width 192, depth 6) this times, in one process and interleaved:

- smallvit, timm's ``VisionTransformer`` of the same shape and weights (``to_vision_transformer``, with the same
  dropout), each in fp32 eager, under bf16 autocast (as a user would run it fast) and compiled (torch.compile,
  inductor, fp32), and the textbook model (``timm_smallvit._reference_d2l``) in fp32 eager;
- a training step (forward, cross-entropy, backward, AdamW step; ``model.train()``, so the seed's dropout 0.1 is on)
  and inference (``model.eval()`` under ``torch.inference_mode()``);
- a large fp32 and bf16 matmul, the same-run peak that each config's achieved FLOP/s is a share of;
- the conv-stem model of the 28 px recipes (``smallvit_tiny_convstem_28``) with its images and weights in the
  default NCHW layout and in channels_last (NHWC, what ``channels_last: true`` in a recipe does), fp32 eager;
- with ``--recipes``, the shipped recipes' own training step and evaluation, run by ``smallvit train`` itself (bf16
  autocast, channels_last, AdamW, EMA, the batch augmentation: whatever the recipe sets), with the model's FLOPs,
  the share of the same-run peaks, and a torch.profiler table of the steps by operator.

Each model runs as built, with its own defaults: timm's ViT with PyTorch's fused attention kernel and
``nn.Dropout``; smallvit with the explicit softmax attention under bf16 on the CPU (PyTorch's CPU flash kernel is
slow there at these token counts) and a dropout that draws a quarter of the random numbers (``smallvit.attend``,
``smallvit.dropout``), and with class-token pooling its last block computed for the class token alone, the only
token the head reads (``trim_last_block``). Same weights, same logits, same dropout rates; the FLOPs of each model
are counted on its own forward and backward, so "% peak" is the share of the work each actually does.

Every round runs every config once (after warm-up), alternating the order; images/s is the median over rounds.
Ratios are against timm's ViT under bf16 autocast (the issue's baseline) and in fp32 eager (the fair baseline on a
CPU without native bf16). Peak memory is what PyTorch allocates, measured with the profiler (see
:func:`measure_memory`). An image-size sweep (28 -> 256 px at patch 4) shows how time and memory grow with tokens.

On a CPU without native bf16 (no AVX512-BF16 or AMX: the trainer's ``cpu_has_native_bf16``) bf16 matmuls are
emulated; on an AVX2 VM, without even oneDNN's bf16 path, they ran at 1.5-25% of fp32 speed depending on the operand
layout. There bf16 configs run at batch 1 only (``--bf16 auto``; larger batches would take hours), and the report
says what bf16 costs on the machine.

    python scripts/benchmark.py                 # full run: tables on stdout, runs/benchmark/benchmark.{json,md}
    python scripts/benchmark.py --quick         # a minute or so: 2 rounds, batch 1 and 8, no compile, small sweep
    python scripts/benchmark.py --no-compile --shapes 28px --batch-sizes 128 --rounds 7
    python scripts/benchmark.py --shapes --sweep-sizes --layout-batch-sizes 64 128 256   # only NCHW vs NHWC
    python scripts/benchmark.py --shapes --sweep-sizes --layout-batch-sizes --recipes fashion_mnist_28   # a recipe
"""

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.profiler import ProfilerActivity, profile

import timm_smallvit
from timm_smallvit import to_vision_transformer
from timm_smallvit._reference_d2l import ViT
from timm_smallvit.amp import cpu_has_native_bf16
from timm_smallvit.flops import count_flops

# shape key -> (label, timm model name)
SHAPES = {
    'seed': ('seed, 1x96x96, patch 16, width 512, depth 2', 'smallvit'),
    '28px': ('28 px, 1x28x28, patch 4, width 192, depth 6', 'smallvit_small_patch4_28'),
}
DEFAULT_BATCH_SIZES = {'seed': (1, 64, 256), '28px': (1, 64, 128, 256)}
# (shape, batch, kind, smallvit / timm ViT bf16-autocast images/s at least): what issue 6 asks for
ISSUE_TARGETS = (
    ('seed', 64, 'train', 1.3),
    ('seed', 64, 'infer', 1.3),
    ('28px', 128, 'train', 2.0),
    ('28px', 128, 'infer', 1.5),
)
MODELS = ('smallvit', 'timm ViT', 'textbook')
MODES = ('fp32', 'bf16-autocast', 'compiled')
LAYOUT_MODEL = 'smallvit_tiny_convstem_28'  # the recipes' conv stem: where the memory layout matters
LAYOUT_MODES = ('fp32', 'channels-last')
SWEEP_MODEL = 'smallvit_small_patch4_28'  # patch 4 at every size: tokens grow with the square of the image size
MiB = 2**20


# ----------------------------------------------------------------------------------------------------------------
# the machine


def cpu_info() -> tuple[str, set[str]]:
    """CPU model name and feature flags from /proc/cpuinfo (Linux); the platform's processor string elsewhere."""
    name, flags = '', set()
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        for line in f:
            key, _, value = line.partition(':')
            if key.strip() == 'model name' and not name:
                name = value.strip()
            elif key.strip() in ('flags', 'Features') and not flags:
                flags = set(value.split())
    return name or platform.processor() or platform.machine(), flags


def busy_warning(load: float, cores: int, threads: int) -> str:
    """A warning when other processes keep the cores busy: timings then say little about the models.

    With as many torch threads as cores, each op's OpenMP threads wait for one another while the other processes
    hold the cores: small ops then run 10-100x slower (measured here: 7 ms vs 500 ms for one 28 px forward).
    """
    if load < 0.5 * cores:
        return ''
    hint = ' or pass --threads 1' if threads > 1 else ''
    return (
        f'WARNING: load average {load:.1f} on {cores} cores before this run: other processes are using the CPU, '
        f'so these timings are not representative. Run on an idle machine{hint}.'
    )


def has_onednn_bf16() -> bool:
    """Whether bf16 matmuls take oneDNN's bf16 path (AVX512-BF16, AMX, or AVX512 on x86; bf16 on Arm).

    Without it PyTorch falls back to a reference bf16 GEMM that is about 100x slower than fp32. With it bf16 is
    native only with AVX512-BF16 or AMX (``cpu_has_native_bf16``, the trainer's test); plain AVX512 emulates it.
    """
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ----------------------------------------------------------------------------------------------------------------
# what is timed


@dataclass
class Bench:
    """One timed config: a step function plus what is needed to turn its time into images/s and FLOP/s."""

    section: str  # 'peak', 'compare', 'layout' or 'sweep'
    shape: str  # shape key ('seed', '28px'), the sweep's image size ('96px'), or the matmul size
    model: str  # 'smallvit', 'timm ViT', 'textbook', or 'matmul'
    mode: str  # 'fp32', 'bf16-autocast', 'compiled', 'channels-last' (fp32); for a matmul its dtype
    kind: str  # 'train', 'infer', or for a matmul its operand layout
    batch: int
    img_size: int = 0
    tokens: int = 0
    flops: float = 0.0  # per step: matmul, conv and attention FLOPs (forward, plus backward when training)
    step: Callable[[], Any] | None = None
    setup: Callable[[], Any] = lambda: None  # before each round's timed steps (train/eval), not timed
    state_bytes: Callable[[], int] | None = None  # bytes held before a step (params, grads, optimizer, batch)
    skip: str = ''  # why this config is not timed
    iters: int = 1  # steps per round, set by calibration
    times: list[float] = field(default_factory=list)  # seconds per step, one per round
    first_step_s: float | None = None  # includes compilation for compiled configs
    memory: dict[str, float] | None = None
    faults: list[float] = field(default_factory=list)  # minor page faults per step, one per round

    @property
    def dtype(self) -> str:
        """Which matmul peak this config is a share of."""
        return 'bf16' if 'bf16' in self.mode else 'fp32'

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def images_per_s(self) -> float | None:
        return self.batch / self.seconds if self.times else None

    @property
    def spread(self) -> float | None:
        """Half the min-max range over rounds, relative to the median."""
        return (max(self.times) - min(self.times)) / 2 / self.seconds if len(self.times) > 1 else None

    @property
    def flops_per_s(self) -> float | None:
        return self.flops / self.seconds if self.times and self.flops else None

    def to_json(self) -> dict[str, Any]:
        return dict(
            section=self.section,
            shape=self.shape,
            model=self.model,
            mode=self.mode,
            kind=self.kind,
            batch=self.batch,
            img_size=self.img_size,
            tokens=self.tokens,
            flops_per_step=self.flops,
            skipped=self.skip or None,
            iters_per_round=self.iters,
            seconds_per_step_per_round=self.times,
            seconds_per_step=self.seconds,
            images_per_s=self.images_per_s,
            spread=self.spread,
            flops_per_s=self.flops_per_s,
            first_step_s=self.first_step_s,
            memory=self.memory,
            minor_page_faults_per_step=statistics.median(self.faults) if self.faults else None,
        )


@dataclass
class ModelUnderTest:
    """A model with its optimizer, shared by all configs of one shape so weights and state are built once."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    compiled: nn.Module | None = None

    def forward_fn(self, mode: str) -> nn.Module:
        if mode != 'compiled':
            return self.model
        if self.compiled is None:
            # static shapes: each batch size gets its own graph, as a user running one batch size would
            self.compiled = torch.compile(self.model, dynamic=False)
        return self.compiled


def copy_dropout(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the dropout rates of ``src`` module by module (same names), zero where ``src`` has none.

    ``to_vision_transformer`` copies weights, not dropout; without this timm's ViT would train the seed shape
    without its dropout 0.1 and do less work per step.
    """
    rates = {name: m.p for name, m in src.named_modules() if isinstance(m, nn.Dropout)}
    for name, m in dst.named_modules():
        if isinstance(m, nn.Dropout):
            m.p = rates.get(name, 0.0)
    # timm's Attention reads its rate from attn_drop.p on the fused path, so the copy covers both paths


def build_textbook(model: nn.Module) -> nn.Module:
    """The textbook d2l.ai model (free of timm) with the shape and dropout of a patchify smallvit."""
    block = model.blocks[0]
    return ViT(
        img_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        num_hiddens=model.embed_dim,
        mlp_num_hiddens=block.mlp.fc1.out_features,
        num_heads=block.attn.num_heads,
        num_blks=len(model.blocks),
        emb_dropout=model.pos_drop.p,
        blk_dropout=block.attn.attn_drop.p,  # the textbook uses one rate for attention and MLP dropout
        num_classes=model.num_classes,
        in_chans=model.in_chans,
    )


def build_models(model_name: str, names: Sequence[str] = MODELS, **kwargs: Any) -> dict[str, ModelUnderTest]:
    """smallvit and, of the same shape and weights, timm's ViT and the textbook model (those in ``names``)."""
    torch.manual_seed(0)
    smallvit = timm.create_model(model_name, **kwargs)
    models = {'smallvit': smallvit}
    if 'timm ViT' in names:
        models['timm ViT'] = to_vision_transformer(smallvit)
        copy_dropout(smallvit, models['timm ViT'])
    if 'textbook' in names:
        models['textbook'] = build_textbook(smallvit)
    return {name: under_test(m) for name, m in models.items()}


def under_test(model: nn.Module) -> ModelUnderTest:
    # AdamW as timm's train.py builds it (no weight decay on norms, biases, position embedding)
    return ModelUnderTest(model, create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05))


def make_step(fwd: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, kind: str, mode: str):
    """One training step or one inference batch, as a user would write it."""
    amp = partial(torch.autocast, 'cpu', dtype=torch.bfloat16) if mode == 'bf16-autocast' else contextlib.nullcontext

    if mode == 'channels-last':
        x = x.contiguous(memory_format=torch.channels_last)  # as the trainer does to every batch

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()

    def infer_step() -> None:
        with torch.inference_mode(), amp():
            fwd(x)

    return train_step if kind == 'train' else infer_step


def held_bytes(mut: ModelUnderTest, x: torch.Tensor, y: torch.Tensor, kind: str) -> int:
    """Bytes a step starts from: parameters and the batch; when training also gradients and AdamW state."""
    tensors = [*mut.model.parameters(), x]
    if kind == 'train':
        tensors += [p.grad for p in mut.model.parameters() if p.grad is not None]
        tensors += [v for s in mut.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        tensors.append(y)
    return sum(t.numel() * t.element_size() for t in tensors)


def model_benches(
    section: str,
    shape: str,
    models: dict[str, ModelUnderTest],
    modes: dict[str, Sequence[str]],
    batch: int,
    skip: Callable[[str, int], str],
) -> list[Bench]:
    """Configs for one shape and batch size: every model x its modes x train/infer, sharing one batch of data."""
    ref = models['smallvit'].model
    in_shape = (ref.in_chans, *ref.patch_embed.img_size)
    x = torch.randn(batch, *in_shape)
    y = torch.randint(0, ref.num_classes, (batch,))
    tokens = ref.patch_embed.num_patches + ref.num_prefix_tokens
    benches = []
    for name, mut in models.items():
        flops = {kind: count_flops(mut.model, in_shape, ref.num_classes, kind) for kind in ('train', 'infer')}
        for mode in modes[name]:
            for kind in ('train', 'infer'):
                bench = Bench(section, shape, name, mode, kind, batch, in_shape[-1], tokens, flops[kind] * batch)
                bench.skip = skip(mode, batch)
                if not bench.skip:
                    bench.step = make_step(mut.forward_fn(mode), mut.optimizer, x, y, kind, mode)
                    bench.setup = partial(mut.model.train, kind == 'train')
                    bench.state_bytes = partial(held_bytes, mut, x, y, kind)
                benches.append(bench)
    return benches


# Operand layouts of the peak matmul. A model's matmuls come in all of them (x @ W.T forward, grad @ W and
# grad.T @ x backward), and emulated bf16 speed depends on the layout by 20x here, so the peak is the best layout.
MATMUL_LAYOUTS = ('A @ B', 'A @ B.T', 'A.T @ B')


def matmul_benches(dtype: torch.dtype, n: int) -> list[Bench]:
    """Square n x n x n matmuls of one dtype, one config per layout; the dtype's peak is the fastest of them."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    operands = {'A @ B': (a, b), 'A @ B.T': (a, b.t()), 'A.T @ B': (a.t(), b)}
    label = 'bf16' if dtype == torch.bfloat16 else 'fp32'
    return [
        Bench('peak', f'{n}^3', 'matmul', label, layout, 1, flops=2.0 * n**3, step=partial(torch.mm, *ab, out=out))
        for layout, ab in operands.items()
    ]


# ----------------------------------------------------------------------------------------------------------------
# the recipes' own training step


def recipe_run(name: str, data_dir: Path, steps: int, eval_batches: int, profile_steps: int) -> dict[str, Any]:
    """One recipe's training step and evaluation as ``smallvit train`` runs them, timed and profiled.

    The recipe runs as shipped (its model, batch size, bf16 autocast, channels_last, AdamW, EMA, batch
    augmentation, mixup, flip test-time augmentation) for two epochs of ``steps`` steps on Fashion-MNIST; the second
    epoch is timed, so the first pays the one-time costs (oneDNN kernel creation, the first allocations). Only
    the length changes: no budget refit and no crop switch-off (the step is the cropping one), and both epochs
    evaluate. A third, short run is profiled by operator (torch.profiler), its training steps only: the trainer's
    ``train_one_epoch``, wrapped for that run.
    """
    from timm_smallvit import trainer
    from timm_smallvit.launch import recipe_path
    from timm_smallvit.recipe import load_recipe, resolve_args

    recipe = load_recipe(recipe_path(name))
    batch = int(recipe.get('batch_size', 128))

    def run(epochs: int, n_steps: int, n_eval: int) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix='benchmark-recipe-') as out:
            args = resolve_args(
                recipe,
                data_dir=str(data_dir),
                output=out,
                experiment=Path(name).stem,  # a recipe given as a path runs under its file's name
                epochs=epochs,
                budget_minutes=0,
                budget_tflop=0,
                crop_off_epoch=0,
                mixup_off_epoch=0,
                train_num_samples=batch * n_steps,
                val_num_samples=batch * n_eval,
                log_interval=10**9,
                val_interval=1,  # both epochs evaluate: the timed one's evaluation pays no first-call costs
            )
            return trainer.train(args)

    result = run(2, steps, eval_batches)
    timed = result['history'][-1]
    model = result['model']
    in_shape = tuple(result['data_config']['input_size'])
    flops_train = count_flops(copy.deepcopy(model), in_shape, model.num_classes, 'train')
    flops_infer = count_flops(copy.deepcopy(model), in_shape, model.num_classes, 'infer')
    views = 2 if result['args'].eval_hflip else 1
    eval_images = batch * eval_batches

    events: list[Any] = []
    train_one_epoch = trainer.train_one_epoch

    def profiled(*args: Any, **kwargs: Any) -> Any:  # the epoch's training steps and nothing around them
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            metrics = train_one_epoch(*args, **kwargs)
        events.append(prof)
        return metrics

    trainer.train_one_epoch = profiled  # train() calls it by its module name
    try:
        run(1, profile_steps, 1)
    finally:
        trainer.train_one_epoch = train_one_epoch
    table = events[-1].key_averages().table(sort_by='self_cpu_time_total', row_limit=15, max_name_column_width=48)
    args = result['args']
    return dict(
        recipe=name,
        model=args.model,
        batch=batch,
        amp=bool(args.amp),
        channels_last=bool(args.channels_last),
        ema=bool(args.model_ema),
        eval_views=views,
        train_images_per_s=timed['train_images'] / timed['train_time'],
        eval_images_per_s=eval_images / timed['eval_time'],
        flops_per_image_train=flops_train,
        flops_per_image_infer=flops_infer,
        profile_steps=profile_steps,
        profile=table,
    )


def recipe_table(runs: list[dict[str, Any]], peaks: dict[str, float]) -> str:
    rows = []
    for r in runs:
        train_flops = r['train_images_per_s'] * r['flops_per_image_train']
        eval_flops = r['eval_images_per_s'] * r['eval_views'] * r['flops_per_image_infer']
        dtype = 'bf16' if r['amp'] and 'bf16' in peaks else 'fp32'
        bf16_share = f'{100 * train_flops / peaks["bf16"]:.1f}%' if 'bf16' in peaks else 'not run'
        rows.append([
            r['recipe'], r['model'], str(r['batch']), dtype + (', NHWC' if r['channels_last'] else ''),
            f'{r["flops_per_image_train"] / 1e9:.4f}', f'{r["train_images_per_s"]:,.0f}', f'{train_flops / 1e9:,.1f}',
            f'{100 * train_flops / peaks[dtype]:.1f}%', bf16_share, f'{100 * train_flops / peaks["fp32"]:.1f}%',
            f'{r["eval_images_per_s"]:,.0f}', f'{100 * eval_flops / peaks[dtype]:.1f}%',
        ])  # fmt: skip
    headers = ['recipe', 'model', 'batch', 'compute', 'train GFLOP/img', 'train img/s', 'train GFLOP/s',
               'of its peak', 'of bf16 peak', 'of fp32 peak', 'eval img/s', 'eval of its peak']  # fmt: skip
    out = [
        "The recipes' own training step (`smallvit train`: its augmentation, optimizer, EMA, autocast and layout; the "
        'second of two epochs) and evaluation (every view the recipe scores), with the share of the same-run matmul '
        'peak of the dtype it computes in, and of the bf16 and fp32 peaks. FLOPs: matmuls, convolutions and '
        'attention of the forward and backward (FlopCounterMode).',
        '',
        md_table(headers, rows),
    ]
    for r in runs:
        out += ['', f'Profile of {r["profile_steps"]} training steps of {r["recipe"]} (self CPU time by operator):', '']
        out += ['```', r['profile'].rstrip(), '```']
    return '\n'.join(out)


# ----------------------------------------------------------------------------------------------------------------
# measuring


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines (written to fd 2, not through Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, 'w') as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_memory(bench: Bench) -> dict[str, float]:
    """Peak bytes PyTorch holds during one step: what it starts from plus the peak of the step's allocations.

    The step runs under torch.profiler with profile_memory=True, which records every allocation and free of
    PyTorch's CPU allocator (inside ops too, e.g. attention workspaces, autocast's bf16 weight copies, saved
    activations); replaying them in time order gives the step's peak above its start. The start is summed from the
    tensors the step holds: parameters and the batch, plus gradients and AdamW state when training. Not included:
    the Python and library runtime, buffers that oneDNN/MKL allocate themselves, and allocator fragmentation, so
    the process's resident memory is higher.
    """
    assert bench.step is not None and bench.state_bytes is not None
    bench.setup()
    held = bench.state_bytes()
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bench.step()
    events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == '[memory]')
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return dict(held_mib=held / MiB, step_peak_mib=peak / MiB, peak_mib=(held + peak) / MiB)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the OS does not count them)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def warm_up(bench: Bench, steps: int, min_time: float, max_iters: int, memory: bool) -> None:
    """Untimed steps: the first (lazy init, optimizer state, compilation), a profiled one for memory, then the
    calibration step(s) whose time sets how many steps a round times (at least ``min_time`` seconds)."""
    assert bench.step is not None
    bench.setup()
    bench.first_step_s = timed(bench.step)
    if memory and bench.state_bytes is not None:
        bench.memory = measure_memory(bench)
    bench.setup()
    last = bench.first_step_s
    # an eager step of a second or more (emulated bf16, large images) is warm after two steps and times once a
    # round anyway: more warm-up would only cost minutes
    slow = bench.mode != 'compiled' and last >= max(1.0, min_time)
    for _ in range(0 if slow else max(1, steps - 1)):
        last = timed(bench.step)
    bench.iters = max(1, min(max_iters, math.ceil(min_time / last)))


def run_rounds(benches: list[Bench], rounds: int, label: str) -> None:
    """Each round times every config once; odd rounds go in reverse so no config always follows the same one."""
    active = [b for b in benches if not b.skip]
    for r in range(rounds):
        t_round = time.perf_counter()
        for bench in active if r % 2 == 0 else active[::-1]:
            assert bench.step is not None
            bench.setup()
            gc.collect()
            gc.disable()  # no collector pauses inside the timed steps
            try:
                f0, t0 = minor_faults(), time.perf_counter()
                for _ in range(bench.iters):
                    bench.step()
                bench.times.append((time.perf_counter() - t0) / bench.iters)
                bench.faults.append((minor_faults() - f0) / bench.iters)
            finally:
                gc.enable()
        log(f'{label}: round {r + 1}/{rounds} took {time.perf_counter() - t_round:.1f} s')


def log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# reporting


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def fmt_rate(bench: Bench | None) -> str:
    if bench is None:
        return ''
    if bench.skip:
        return f'skipped ({bench.skip})'
    v = bench.images_per_s
    if v is None:
        return ''
    text = f'{v:,.0f}' if v >= 100 else f'{v:.3g}'
    return text + (f' ±{100 * bench.spread:.0f}%' if bench.spread is not None else '')


def fmt_ratio(a: Bench | None, b: Bench | None) -> str:
    if a is None or b is None or not a.times or not b.times:
        return 'n/a'
    return f'{a.images_per_s / b.images_per_s:.2f}×'


def fmt_share(bench: Bench | None, peaks: dict[str, float]) -> str:
    if bench is None or bench.flops_per_s is None or bench.dtype not in peaks:
        return ''
    return f'{100 * bench.flops_per_s / peaks[bench.dtype]:.0f}%'


def fmt_mib(bench: Bench | None) -> str:
    return f'{bench.memory["peak_mib"]:,.1f}' if bench is not None and bench.memory else ''


def find(benches: list[Bench], **kw: Any) -> Bench | None:
    for b in benches:
        if all(getattr(b, k) == v for k, v in kw.items()):
            return b
    return None


def compare_table(benches: list[Bench], shape: str, peaks: dict[str, float]) -> str:
    rows = []
    mine = [b for b in benches if b.section == 'compare' and b.shape == shape]
    for batch in dict.fromkeys(b.batch for b in mine):
        for model in MODELS:
            for mode in MODES:
                train = find(mine, batch=batch, model=model, mode=mode, kind='train')
                infer = find(mine, batch=batch, model=model, mode=mode, kind='infer')
                if train is None and infer is None:
                    continue
                row = [str(batch), model, mode]
                for bench in (train, infer):
                    kind = bench.kind if bench is not None else ''
                    base_bf16 = find(mine, batch=batch, model='timm ViT', mode='bf16-autocast', kind=kind)
                    base_fp32 = find(mine, batch=batch, model='timm ViT', mode='fp32', kind=kind)
                    row += [fmt_rate(bench), fmt_ratio(bench, base_bf16), fmt_ratio(bench, base_fp32)]
                    row.append(fmt_share(bench, peaks))
                row += [fmt_mib(train), fmt_mib(infer)]
                rows.append(row)
    headers = ['batch', 'model', 'mode']
    for kind in ('train', 'infer'):
        headers += [f'{kind} img/s', '× timm bf16', '× timm fp32', '% peak']
    headers += ['train MiB', 'infer MiB']
    return md_table(headers, rows)


def compile_table(benches: list[Bench]) -> str:
    rows = []
    compiled = [b for b in benches if b.mode == 'compiled' and b.first_step_s is not None]
    for b in compiled:
        if b.kind == 'train':
            infer = find(compiled, shape=b.shape, batch=b.batch, model=b.model, kind='infer')
            rows.append(
                [b.shape, str(b.batch), b.model, f'{b.first_step_s:.1f}', f'{infer.first_step_s:.1f}' if infer else '']
            )
    return md_table(['shape', 'batch', 'model', 'train first step, s', 'infer first step, s'], rows)


def layout_table(benches: list[Bench], peaks: dict[str, float]) -> str:
    mine = [b for b in benches if b.section == 'layout']
    rows = []
    for batch in dict.fromkeys(b.batch for b in mine):
        for mode in LAYOUT_MODES:
            row = [str(batch), 'channels_last' if mode == 'channels-last' else 'NCHW']
            for kind in ('train', 'infer'):
                bench = find(mine, batch=batch, mode=mode, kind=kind)
                base = find(mine, batch=batch, mode='fp32', kind=kind)
                row += [fmt_rate(bench), fmt_ratio(bench, base), fmt_share(bench, peaks)]
            rows.append(row)
    headers = ['batch', 'layout']
    for kind in ('train', 'infer'):
        headers += [f'{kind} img/s', '× NCHW', '% peak']
    return md_table(headers, rows)


def sweep_table(benches: list[Bench], peaks: dict[str, float]) -> str:
    sweep = [b for b in benches if b.section == 'sweep']
    base = {kind: find(sweep, kind=kind) for kind in ('train', 'infer')}
    rows = []
    for size in dict.fromkeys(b.img_size for b in sweep):
        row = [f'{size} px', str(find(sweep, img_size=size).tokens)]
        for kind in ('train', 'infer'):
            b, b0 = find(sweep, img_size=size, kind=kind), base[kind]
            ms = f'{1e3 / b.images_per_s:,.2f}' if b.times else ''
            t_ratio = f'{b0.images_per_s / b.images_per_s:.1f}×' if b.times and b0.times else ''
            mem = fmt_mib(b)
            m_ratio = f'{b.memory["peak_mib"] / b0.memory["peak_mib"]:.1f}×' if b.memory and b0.memory else ''
            row += [fmt_rate(b), ms, t_ratio, fmt_share(b, peaks), mem, m_ratio]
        rows.append(row)
    headers = ['image', 'tokens']
    for kind in ('train', 'infer'):
        headers += [f'{kind} img/s', 'ms/img', 'time ×', '% peak', 'peak MiB', 'memory ×']
    return md_table(headers, rows)


def target_lines(benches: list[Bench], peaks: dict[str, float] | None = None) -> list[str]:
    """One line per issue-6 target, with the ceiling the same-run bf16 matmul peak puts on the ratio.

    The ceiling is smallvit's images/s if it ran its own FLOPs at the peak, over timm's achieved images/s. smallvit
    computes the same logits with fewer FLOPs where the head reads the class token alone (its last block runs for
    that token only), so the ceiling can exceed peak / timm's achieved FLOP/s.
    """
    lines = []
    for shape, batch, kind, target in ISSUE_TARGETS:
        kw = dict(section='compare', shape=shape, batch=batch, kind=kind)
        mine = find(benches, model='smallvit', mode='bf16-autocast', **kw)
        base = find(benches, model='timm ViT', mode='bf16-autocast', **kw)
        fair = fmt_ratio(
            find(benches, model='smallvit', mode='fp32', **kw), find(benches, model='timm ViT', mode='fp32', **kw)
        )
        head = f'- {shape}, batch {batch}, {kind}: smallvit / timm ViT under bf16 autocast'
        if mine is None or base is None:
            lines.append(f'{head}: not run (batch {batch} not in this run); target ≥ {target}×')
        elif mine.skip or base.skip:
            lines.append(f'{head}: not measured ({mine.skip or base.skip}); target ≥ {target}×; in fp32: {fair}')
        else:
            ratio = mine.images_per_s / base.images_per_s
            verdict = 'met' if ratio >= target else 'not met'
            ceiling = ''
            if peaks and mine.flops and 'bf16' in peaks:
                at_peak = peaks['bf16'] / (mine.flops / mine.batch)  # images/s
                ceiling = f'; at the bf16 matmul peak it would be {at_peak / base.images_per_s:.2f}×'
            lines.append(f'{head}: {ratio:.2f}× (target ≥ {target}×: {verdict}{ceiling}); in fp32: {fair}')
    return lines


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--quick', action='store_true', help='a short run to check the script: see the defaults below')
    p.add_argument('--shapes', nargs='*', choices=tuple(SHAPES), default=list(SHAPES), help='none: skip the comparison')
    p.add_argument('--batch-sizes', type=int, nargs='+', help='default: seed 1 64 256, 28px 1 64 128 256; quick: 1 8')
    p.add_argument('--rounds', type=int, help='interleaved rounds, median taken (default 5; quick 2)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per config before the rounds (default 2)')
    p.add_argument('--min-time', type=float, help='seconds timed per config per round (default 0.5; quick 0.05)')
    p.add_argument('--max-iters', type=int, default=50, help='at most this many steps per config per round')
    p.add_argument(
        '--compile',
        action=argparse.BooleanOptionalAction,
        help='time torch.compile (inductor) too; compiling takes ~30-60 s per model and batch size on 2 cores '
        '(default on; quick: off)',
    )
    p.add_argument(
        '--bf16',
        choices=('auto', 'full', 'batch1', 'skip'),
        default='auto',
        help='bf16-autocast configs: auto = full with native bf16, batch 1 only where bf16 is emulated',
    )
    p.add_argument('--memory', action=argparse.BooleanOptionalAction, default=True, help='measure peak memory')
    p.add_argument(
        '--layout-batch-sizes',
        type=int,
        nargs='*',
        help=f'batch sizes of the NCHW vs channels_last timing of {LAYOUT_MODEL} (default 128; quick 8; none: skip)',
    )
    p.add_argument('--sweep-sizes', type=int, nargs='*', help='image sizes (default 28 56 96 128 192 256; quick 28 56)')
    p.add_argument('--sweep-batch', type=int, help='batch size of the sweep (default 8; quick 2)')
    p.add_argument('--sweep-rounds', type=int, help='rounds of the sweep (default 3; quick 1)')
    p.add_argument('--mm-size', type=int, help='fp32 matmul size for the peak (default 2048; quick 1024)')
    p.add_argument('--threads', type=int, help="torch threads (default: torch's own choice)")
    p.add_argument(
        '--recipes',
        nargs='*',
        default=[],
        help="time these recipes' own training step and evaluation (e.g. fashion_mnist_28); needs --data",
    )
    p.add_argument('--data', type=Path, default=Path('../shared/data/fashion-mnist'), help='Fashion-MNIST files')
    p.add_argument('--recipe-steps', type=int, help='training steps per timed epoch (default 100; quick 4)')
    p.add_argument('--recipe-eval-batches', type=int, help='evaluation batches per epoch (default 20; quick 1)')
    p.add_argument('--profile-steps', type=int, help='training steps profiled (default 20; quick 2)')
    p.add_argument(
        '--json', type=Path, default=Path('runs/benchmark/benchmark.json'), help='also writes .md next to it'
    )
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(
        rounds=2 if quick else 5,
        min_time=0.05 if quick else 0.5,
        compile=not quick,
        layout_batch_sizes=[8] if quick else [128],
        sweep_sizes=[28, 56] if quick else [28, 56, 96, 128, 192, 256],
        sweep_batch=2 if quick else 8,
        sweep_rounds=1 if quick else 3,
        mm_size=1024 if quick else 2048,
        recipe_steps=4 if quick else 100,
        recipe_eval_batches=1 if quick else 20,
        profile_steps=2 if quick else 20,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_sizes is None and quick:
        args.batch_sizes = [1, 8]
    return args


def machine(args: argparse.Namespace, argv: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
    """What the numbers depend on: versions, CPU, threads, native bf16, and how busy the machine is."""
    cpu, flags = cpu_info()
    fast_bf16 = cpu_has_native_bf16()  # the trainer's answer, so the benchmark and the recipes agree
    command = 'python scripts/benchmark.py' + ''.join(f' {a}' for a in (sys.argv[1:] if argv is None else argv))
    meta = dict(
        command=command,
        torch=torch.__version__,
        timm=timm.__version__,
        timm_smallvit=getattr(timm_smallvit, '__version__', ''),
        python=platform.python_version(),
        cpu=cpu,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_bf16_flags=sorted(f for f in flags if 'bf16' in f or f.startswith('amx')),
        cores=os.cpu_count(),
        threads=torch.get_num_threads(),
        native_bf16=fast_bf16,
        onednn_bf16=has_onednn_bf16(),
        bf16_policy=args.bf16 if args.bf16 != 'auto' else ('full' if fast_bf16 else 'batch1'),
        load_average_start=os.getloadavg() if hasattr(os, 'getloadavg') else None,
        rounds=args.rounds,
        compile=args.compile,
        glibc_tunables=os.environ.get('GLIBC_TUNABLES'),
    )
    header = [
        f'command: {command}',
        f'torch {meta["torch"]}, timm {meta["timm"]}, Python {meta["python"]}',
        f'CPU: {cpu} ({meta["cores"]} cores visible, {meta["threads"]} torch threads, '
        f'kernels: {meta["cpu_capability"]})',
        f'native bf16: {"yes" if fast_bf16 else "no"} (bf16 CPU flags: {", ".join(meta["cpu_bf16_flags"]) or "none"}; '
        f'oneDNN bf16 path: {"yes" if meta["onednn_bf16"] else "no"})',
    ]
    if meta['glibc_tunables']:  # malloc settings change what a step costs in page faults
        header.append(f'GLIBC_TUNABLES={meta["glibc_tunables"]}')
    if meta['load_average_start']:
        header.append('load average at start: ' + ', '.join(f'{v:.2f}' for v in meta['load_average_start']))
        busy = busy_warning(meta['load_average_start'][0], meta['cores'] or 1, meta['threads'])
        if busy:
            header.append(busy)
    return meta, header


def collect(
    args: argparse.Namespace, bf16_policy: str, fast_bf16: bool
) -> tuple[list[Bench], list[Bench], list[Bench]]:
    """Build every config: the matmul peaks and model comparisons (timed together), the layouts, the sweep."""

    def skip_bf16(mode: str, batch: int) -> str:
        if mode != 'bf16-autocast' or bf16_policy == 'full':
            return ''
        if bf16_policy == 'skip':
            return 'bf16 off'
        return '' if batch == 1 else 'emulated bf16'

    # the same-run matmul peak: large square fp32 and bf16 matmuls, timed in the rounds with everything else
    benches = matmul_benches(torch.float32, args.mm_size)
    if bf16_policy != 'skip':
        # emulated bf16 runs 1-25 GFLOP/s: a 2048^3 product would take up to minutes, 512^3 under a second
        benches += matmul_benches(torch.bfloat16, args.mm_size if fast_bf16 else 512)

    modes = {'smallvit': MODES, 'timm ViT': MODES, 'textbook': ('fp32',)}
    if not args.compile:
        modes = {k: tuple(m for m in v if m != 'compiled') for k, v in modes.items()}
    for shape in args.shapes:
        models = build_models(SHAPES[shape][1])
        for batch in args.batch_sizes or DEFAULT_BATCH_SIZES[shape]:
            benches += model_benches('compare', shape, models, modes, batch, skip_bf16)

    # the conv stem in both memory layouts: two copies of the same weights, each with its own optimizer
    layout: list[Bench] = []
    if args.layout_batch_sizes:
        nchw = build_models(LAYOUT_MODEL, names=('smallvit',))
        nhwc = {'smallvit': under_test(copy.deepcopy(nchw['smallvit'].model).to(memory_format=torch.channels_last))}
        for batch in args.layout_batch_sizes:
            for models, mode in ((nchw, 'fp32'), (nhwc, 'channels-last')):
                layout += model_benches('layout', LAYOUT_MODEL, models, {'smallvit': (mode,)}, batch, skip_bf16)

    sweep: list[Bench] = []
    for size in args.sweep_sizes:
        models = build_models(SWEEP_MODEL, names=('smallvit',), img_size=size)
        sweep += model_benches('sweep', f'{size}px', models, {'smallvit': ('fp32',)}, args.sweep_batch, skip_bf16)
    return benches, layout, sweep


def report(
    args: argparse.Namespace, meta: dict[str, Any], header: list[str], benches: list[Bench]
) -> tuple[str, dict[str, float], list[str]]:
    """The Markdown report, the matmul peaks (FLOP/s per dtype) and the lines on the issue's targets."""
    matmuls = [b for b in benches if b.section == 'peak' and b.flops_per_s]
    peaks: dict[str, float] = {}
    for b in matmuls:
        peaks[b.mode] = max(peaks.get(b.mode, 0.0), b.flops_per_s)
    peak_rows = [
        [b.mode, b.shape, b.kind, f'{b.flops_per_s / 1e9:,.1f}', f'{100 * b.flops_per_s / peaks["fp32"]:.1f}%']
        for b in matmuls
    ]
    out = [
        *header,
        '',
        'Same-run matmul peak (median over rounds; the peak of a dtype is its fastest layout):',
        '',
        md_table(['dtype', 'size', 'layout', 'GFLOP/s', 'of fp32 peak'], peak_rows),
    ]
    if not meta['native_bf16'] and 'bf16' in peaks:
        worst_bf16 = min(b.flops_per_s for b in matmuls if b.mode == 'bf16')
        out += [
            '',
            f'bf16 is emulated on this CPU (no native bf16): bf16 matmuls run at {worst_bf16 / 1e9:.1f} to '
            f'{peaks["bf16"] / 1e9:.1f} GFLOP/s depending on the layout, {100 * worst_bf16 / peaks["fp32"]:.1f}% to '
            f'{100 * peaks["bf16"] / peaks["fp32"]:.1f}% of fp32. bf16-autocast configs are timed at batch 1 only '
            f'(--bf16 {args.bf16}): at batch 64 one step would take minutes. fp32 is the fast path here.',
        ]
    for shape in args.shapes:
        mine = [b for b in benches if b.section == 'compare' and b.shape == shape]
        train, infer = find(mine, model='smallvit', kind='train'), find(mine, model='smallvit', kind='infer')
        vit_train, vit_infer = find(mine, model='timm ViT', kind='train'), find(mine, model='timm ViT', kind='infer')
        out += [
            '',
            f'{SHAPES[shape][0]} ({SHAPES[shape][1]}): {infer.flops / infer.batch / 1e9:.3f} GFLOP per image '
            f'forward, {train.flops / train.batch / 1e9:.3f} per training image (timm ViT: '
            f'{vit_infer.flops / vit_infer.batch / 1e9:.3f} and {vit_train.flops / vit_train.batch / 1e9:.3f})',
            '',
            compare_table(benches, shape, peaks),
        ]
    out += [
        '',
        f'img/s: median over {args.rounds} interleaved rounds, ± half the min-max range; × timm bf16 / × timm fp32: '
        "img/s over timm's VisionTransformer (same shape, weights and dropout) under bf16 autocast / in fp32 eager; "
        '% peak: matmul+conv+attention FLOP/s over the same-run matmul peak of the same dtype; MiB: peak bytes '
        'PyTorch holds in one step (parameters, batch, gradients and AdamW state, plus the peak of the allocations '
        'the profiler records in the step; excludes the runtime and buffers oneDNN/MKL allocate themselves).',
    ]
    if any(b.mode == 'compiled' and b.first_step_s is not None for b in benches):
        out += ['', 'torch.compile (inductor, fp32, static shapes): first step, compilation included', '']
        out.append(compile_table(benches))
    if any(b.section == 'layout' for b in benches):
        out += [
            '',
            f"Memory layout of the conv stem: {LAYOUT_MODEL} (the 28 px recipes' model), fp32 eager, images and "
            'weights NCHW (default) or channels_last (`channels_last: true` in a recipe); same weights, median of '
            f'{args.rounds} interleaved rounds',
            '',
            layout_table(benches, peaks),
        ]
    if any(b.section == 'sweep' for b in benches):
        out += [
            '',
            f'Image size sweep: {SWEEP_MODEL} at patch 4 with img_size set, fp32 eager, batch {args.sweep_batch}, '
            f'median of {args.sweep_rounds} round(s); time × and memory × relative to {args.sweep_sizes[0]} px',
            '',
            sweep_table(benches, peaks),
        ]
    targets = target_lines(benches, peaks)
    out += ['', "Issue 6's targets (smallvit / timm ViT under bf16 autocast):", *targets]
    load_end = ', '.join(f'{v:.2f}' for v in meta['load_average_end'] or ())
    out += ['', f'wall time {meta["wall_s"]:.0f} s; load average at end: {load_end}']
    return '\n'.join(out), peaks, targets


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta, header = machine(args, argv)
    print('\n'.join(header), flush=True)
    if args.compile:
        import torch._dynamo.config as dynamo_config

        # one graph per model x batch size x train/infer; past the default limit (8) dynamo silently runs eager
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)

    with fresh_inductor_cache() if args.compile else contextlib.nullcontext():
        return _run(args, meta, header, t_start)


@contextlib.contextmanager
def fresh_inductor_cache() -> Iterator[None]:
    """Compile into an empty cache directory, removed afterwards.

    Inductor caches compiled graphs on disk across processes: in a second run the "first step" of a compiled config
    was a cache hit (0.3-2 s instead of 14-35 s). An empty cache times compilation as a new user meets it.
    """
    previous = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    with tempfile.TemporaryDirectory(prefix='benchmark-inductor-') as cache_dir:
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache_dir
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop('TORCHINDUCTOR_CACHE_DIR', None)
            else:
                os.environ['TORCHINDUCTOR_CACHE_DIR'] = previous


def _run(args: argparse.Namespace, meta: dict[str, Any], header: list[str], t_start: float) -> dict[str, Any]:
    benches, layout, sweep = collect(args, meta['bf16_policy'], meta['native_bf16'])
    phases = (('compare', benches, args.rounds), ('layout', layout, args.rounds), ('sweep', sweep, args.sweep_rounds))
    for phase, group, rounds in phases:
        active = [b for b in group if not b.skip]
        if not active:
            continue
        log(f'{phase}: warming up {len(active)} configs')
        for i, bench in enumerate(active):
            warm_up(bench, args.warmup, args.min_time, args.max_iters, args.memory and bench.section != 'peak')
            what = f'{bench.shape} {bench.model} {bench.mode} {bench.kind} batch {bench.batch}'
            log(f'  {i + 1}/{len(active)} {what}: first step {bench.first_step_s:.2f} s, {bench.iters} step(s)/round')
        graphs_before = _compiled_graphs()
        run_rounds(group, rounds, phase)
        if _compiled_graphs() != graphs_before:
            log('WARNING: torch.compile recompiled during the timed rounds; compiled timings include compilation')
    benches += layout + sweep
    recipes = []
    for name in args.recipes:
        log(f'recipe {name}: two epochs of {args.recipe_steps} steps, then {args.profile_steps} profiled')
        recipes.append(recipe_run(name, args.data, args.recipe_steps, args.recipe_eval_batches, args.profile_steps))

    meta['load_average_end'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
    meta['wall_s'] = time.perf_counter() - t_start
    text, peaks, targets = report(args, meta, header, benches)
    if recipes:
        text += '\n\n' + recipe_table(recipes, peaks)
    print('\n' + text, flush=True)
    result = dict(
        meta=meta, peaks_flops_per_s=peaks, targets=targets, benches=[b.to_json() for b in benches], recipes=recipes
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + '\n')
    args.json.with_suffix('.md').write_text(text + '\n')
    log(f'wrote {args.json} and {args.json.with_suffix(".md")}')
    return result


def _compiled_graphs() -> int:
    if 'torch._dynamo' not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return counters['stats']['unique_graphs']


if __name__ == '__main__':
    main()
