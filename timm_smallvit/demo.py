"""The end-to-end demo (``make demo``): train on Fashion-MNIST, evaluate, export with a card, reload, compare.

Everything runs offline on a CPU: the data come from the release files, the trainer is :mod:`timm_smallvit.trainer`
with a shipped recipe, the export is :func:`timm_smallvit.export.export_checkpoint`, and the reload goes through
timm's own ``local-dir:`` loader.
"""

import logging
import os
import time
from pathlib import Path
from typing import Any

import timm
import torch

from .amp import autocast_context
from .data import load_dataset
from .export import export_checkpoint
from .launch import recipe_path
from .loader import BatchLoader
from .recipe import load_recipe, resolve_args
from .trainer import train

__all__ = ['run_demo']

_logger = logging.getLogger(__name__)


def run_demo(
    data: str | os.PathLike,
    output: str | os.PathLike = 'runs/demo',
    recipe: str | os.PathLike = 'fashion_mnist_demo',
    **overrides: Any,
) -> dict[str, Any]:
    """Train with ``recipe`` on the Fashion-MNIST files in ``data``, export the result, reload it with timm.

    Args:
        data: Folder with the four Fashion-MNIST release ``*-ubyte.gz`` files.
        output: Parent folder; each run gets its own dated subfolder, with the export in ``<run>/export``.
        recipe: Recipe name or path.
        **overrides: Recipe keys to override (e.g. fewer epochs, for a shorter run).

    Returns:
        test top-1 / top-5, the run and export folders, and the wall time.
    """
    start = time.perf_counter()
    args = resolve_args(
        load_recipe(recipe_path(recipe)),
        data_dir=str(data),
        output=str(output),
        experiment=time.strftime('%Y%m%d-%H%M%S'),
        **overrides,
    )
    result = train(args)
    run_dir: Path = result['output_dir']
    metrics = result['eval_metrics']

    export_dir = export_checkpoint(run_dir / 'last.pth.tar', run_dir / 'export', use_ema=bool(args.model_ema))
    reloaded = timm.create_model(f'local-dir:{export_dir}', pretrained=True).eval()
    trained = result['model'].eval()
    if args.channels_last:
        # the same layout as in training, so the same conv kernels run and the logits can match bit for bit
        reloaded = reloaded.to(memory_format=torch.channels_last)

    # the reloaded model must give the trained model's logits, bit for bit, on the test images
    images, labels = load_dataset(args.dataset, args.data_dir, train=False)
    config = result['data_config']
    loader = BatchLoader(
        images,
        labels,
        args.validation_batch_size or args.batch_size,  # the trainer's: bf16 kernels round by batch shape
        config['mean'],
        config['std'],
        config['input_size'][1:],
        channels_last=bool(args.channels_last),
    )
    # evaluate as the trainer did (bf16 autocast when it trained so), so the count below is the trainer's top-1
    amp_autocast = autocast_context(args, torch.device('cpu'))
    correct = 0
    with torch.inference_mode(), amp_autocast():
        for x, y in loader:
            logits = reloaded(x)
            if not torch.equal(logits, trained(x)):
                raise RuntimeError(f'The model reloaded from {export_dir} does not reproduce the trained logits.')
            # topk as timm's accuracy counts it: bf16 logits tie more often, and argmax breaks ties differently
            correct += (logits.float().topk(1).indices[:, 0] == y).sum().item()
    top1 = 100 * correct / len(labels)
    wall = time.perf_counter() - start

    print()
    print(f'Fashion-MNIST test top-1: {top1:.2f}% (top-5 {metrics["top5"]:.2f}%) on {len(labels):,} images')
    print(f'model: {args.model}, {sum(p.numel() for p in trained.parameters()):,} parameters, {args.epochs} epochs')
    print(f'reloaded with timm.create_model("local-dir:{export_dir}", pretrained=True): identical logits')
    print(f'model card: {export_dir / "README.md"}')
    print(f'wall time: {wall:.0f} s')
    return dict(top1=top1, top5=metrics['top5'], run_dir=run_dir, export_dir=export_dir, wall_time=wall)
