"""Turn a finished Fashion-MNIST run into shipped pretrained weights: timm_smallvit/pretrained/<name>.<tag>/.

    python scripts/release_pretrained.py RUN_DIR smallvit_tiny_convstem_28.fmnist --recipe fashion_mnist_28 \
        --data ../shared/data/fashion-mnist

Exports the run's last EMA weights with `smallvit export` (card, config.json, learning curve), copies its args.yaml
beside them, evaluates the export on the 10,000 Fashion-MNIST test images the way a timm user would (PIL images
through resolve_model_data_config + create_transform, float32), writes those numbers into the card's model-index,
and prints the PRETRAINED entry (top-1, top-5, SHA-256) to put in timm_smallvit/smallvit.py.
"""

import argparse
import hashlib
import shutil
from pathlib import Path

import timm
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard
from timm.data import create_transform, resolve_model_data_config
from torchvision.datasets import FashionMNIST

from timm_smallvit import export_checkpoint
from timm_smallvit.data import prepare_fashion_mnist
from timm_smallvit.smallvit import HF_HUB_NAMESPACE, PRETRAINED_DIR


def evaluate(model: torch.nn.Module, data_dir: Path, batch_size: int = 500) -> tuple[float, float]:
    """Top-1 and top-5 (%) on the Fashion-MNIST test split through timm's eval transform, as a user runs it."""
    model.eval()
    transform = create_transform(**resolve_model_data_config(model))
    test = FashionMNIST(prepare_fashion_mnist(data_dir), train=False, transform=transform)
    correct1 = correct5 = 0
    with torch.inference_mode():
        for start in range(0, len(test), batch_size):
            idx = range(start, min(start + batch_size, len(test)))
            x = torch.stack([test[i][0] for i in idx])
            y = test.targets[start : start + len(idx)]
            top5 = model(x).topk(5, dim=-1).indices
            correct1 += (top5[:, 0] == y).sum().item()
            correct5 += (top5 == y[:, None]).any(-1).sum().item()
    return 100 * correct1 / len(test), 100 * correct5 / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dir', type=Path, help='the run folder (last.pth.tar, summary.csv, args.yaml)')
    parser.add_argument('name', help='<model>.<tag>, e.g. smallvit_tiny_convstem_28.fmnist')
    parser.add_argument('--data', type=Path, required=True, help='the Fashion-MNIST release files')
    parser.add_argument('--recipe', required=True, help='the shipped recipe the run was trained with')
    args = parser.parse_args()

    out = PRETRAINED_DIR / args.name
    export_checkpoint(
        args.run_dir / 'last.pth.tar', out, use_ema=True, overwrite=True, repo_id=f'{HF_HUB_NAMESPACE}/{args.name}'
    )
    shutil.copyfile(args.run_dir / 'args.yaml', out / 'args.yaml')

    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    top1, top5 = evaluate(model, args.data)
    card = ModelCard.load(out / 'README.md')
    common = dict(
        task_type='image-classification',
        dataset_type='zalando-datasets/fashion_mnist',
        dataset_name='Fashion-MNIST',
        dataset_split='test',
    )
    card.data.eval_results = [
        EvalResult(metric_type='accuracy', metric_name='Top-1 accuracy (%)', metric_value=round(top1, 2), **common),
        EvalResult(
            metric_type='top_5_accuracy', metric_name='Top-5 accuracy (%)', metric_value=round(top5, 2), **common
        ),
    ]
    card.data.model_name = args.name
    title, _, rest = card.text.partition('\n\n')
    # the run's own record: the trainer falls back to float32 where the recipe's bf16 would be slower
    trained_amp = yaml.safe_load((out / 'args.yaml').read_text()).get('amp')
    compute = "under the recipe's bf16 autocast" if trained_amp else 'in float32'
    shipped = (
        f'Shipped inside timm-smallvit: `timm.create_model({args.name!r}, pretrained=True)` loads these weights '
        f"offline. Evaluated after export on the 10,000 Fashion-MNIST test images through timm's eval transform "
        f'(`resolve_model_data_config` + `create_transform`, float32, single view): **top-1 {top1:.2f}%, top-5 '
        f'{top5:.2f}%** (the model-index). The training log below was measured {compute}. '
        f'Trained with `smallvit train --config {args.recipe}`; its args.yaml is '
        f'beside this card. Data: Fashion-MNIST (Zalando Research, MIT licence).'
    )
    card.text = f'{title}\n\n{shipped}\n\n{rest}'
    card.save(out / 'README.md')

    digest = hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest()
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print(f'{args.name}: top1={top1:.2f}, top5={top5:.2f}, sha256={digest!r}')
    print('files:', ', '.join(f'{name} {size / 1e6:.2f} MB' for name, size in sizes.items()))


if __name__ == '__main__':
    main()
