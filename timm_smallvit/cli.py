"""The ``smallvit`` command."""

import argparse
import sys
from collections.abc import Sequence

__all__ = ['main']


def _demo(args: argparse.Namespace) -> int:
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import FashionMNIST

    from .data import FASHION_MNIST_CLASSES, prepare_fashion_mnist

    model = timm.create_model(args.model).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    test = FashionMNIST(prepare_fashion_mnist(args.data), train=False, download=True, transform=transform)
    images = torch.stack([test[i][0] for i in range(args.num_images)])
    with torch.no_grad():
        probs = model(images).softmax(-1)
    for i, (p, label) in enumerate(zip(probs, test.targets[: args.num_images], strict=True)):
        print(
            f'{i:3d}  true {FASHION_MNIST_CLASSES[label]:<12} predicted {FASHION_MNIST_CLASSES[p.argmax()]:<12} '
            f'p={p.max():.2f}'
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='smallvit', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help='classify real Fashion-MNIST test images with a smallvit model')
    demo.add_argument('--data', required=True, help='folder with the Fashion-MNIST release *-ubyte.gz files')
    demo.add_argument('--model', default='smallvit_tiny_patch4_28')
    demo.add_argument('--num-images', type=int, default=16)
    demo.add_argument('--output', default='runs/demo')
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
