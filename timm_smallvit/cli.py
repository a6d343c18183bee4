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


def _export(args: argparse.Namespace) -> int:
    from .hub import export_checkpoint

    out = export_checkpoint(
        args.checkpoint,
        args.out_dir,
        model_name=args.model,
        model_kwargs=args.model_kwargs,
        use_ema=args.ema,
        overwrite=args.overwrite,
        repo_id=args.repo_id,
        summary=args.summary,
    )
    print(f'Exported to {out}')
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    commit = push_to_hub(
        args.out_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(f'Pushed {args.out_dir} to {args.repo_id}: {commit.commit_url}')
    return 0


def _add_hub_commands(sub: argparse._SubParsersAction) -> None:
    from timm.utils import ParseKwargs

    export = sub.add_parser(
        'export',
        help='write a timm training checkpoint as a Hub-ready folder (safetensors, config.json, model card)',
    )
    export.add_argument('checkpoint', help='checkpoint-N.pth.tar / model_best.pth.tar / last.pth.tar, or .safetensors')
    export.add_argument('out_dir', help='folder to create (must not exist or be empty, unless --overwrite)')
    export.add_argument('--model', help="smallvit model name (default: the checkpoint's args.model)")
    export.add_argument(
        '--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='model arguments, e.g. img_size=28'
    )
    export.add_argument('--ema', action='store_true', help='export the EMA weights (state_dict_ema)')
    export.add_argument('--overwrite', action='store_true', help='replace a non-empty OUT_DIR')
    export.add_argument('--repo-id', help='Hub repo the usage snippet names (push sets it anyway)')
    export.add_argument('--summary', help="the run's summary.csv (default: beside the checkpoint)")
    export.set_defaults(func=_export)

    push = sub.add_parser(
        'push',
        help='upload an exported folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)',
    )
    push.add_argument('out_dir', help='folder written by `smallvit export`')
    push.add_argument('--repo-id', required=True, help='user/name of the model repo (created if missing)')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--revision', help='branch to commit to (created if missing; default main)')
    push.add_argument('--commit-message', help='commit title')
    push.set_defaults(func=_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='smallvit', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help='classify real Fashion-MNIST test images with a smallvit model')
    demo.add_argument('--data', required=True, help='folder with the Fashion-MNIST release *-ubyte.gz files')
    demo.add_argument('--model', default='smallvit_tiny_patch4_28')
    demo.add_argument('--num-images', type=int, default=16)
    demo.add_argument('--output', default='runs/demo')
    demo.set_defaults(func=_demo)
    _add_hub_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ('export', 'push'):
        try:
            return args.func(args)
        except (ValueError, OSError) as e:  # bad input, missing token, Hub errors: a message, not a traceback
            print(f'smallvit {args.command}: error: {e}', file=sys.stderr)
            return 1
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
