"""The ``smallvit`` command."""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._terminal import printable

__all__ = ['main']


class _EscapingFormatter(logging.Formatter):
    """Log lines with what they quote from data (paths, labels) escaped for the terminal."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def _setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_EscapingFormatter('%(message)s'))
    logging.basicConfig(level=level, handlers=[handler])  # a no-op where logging is set up already (tests, apps)
    noisy_loggers = ('timm.utils.checkpoint_saver', 'timm.task', 'timm.models._builder', 'timm.models._helpers')
    for noisy in (*noisy_loggers, 'timm.models._hub'):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train(args: argparse.Namespace) -> int:
    from .launch import recipe_path
    from .recipe import load_recipe, resolve_args
    from .trainer import train

    _setup_logging()
    path = recipe_path(args.config)
    recipe = load_recipe(path)
    overrides = dict(args.set or {})
    for key in ('data_dir', 'output', 'experiment', 'resume'):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    result = train(resolve_args(recipe, source=f'{path}{" with --set" if args.set else ""}', **overrides))
    if result['output_dir'] is not None:
        metrics = result['eval_metrics']
        print(f'top-1 {metrics["top1"]:.2f}%  top-5 {metrics["top5"]:.2f}%  run: {printable(result["output_dir"])}')
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _setup_logging()
    run_demo(args.data, args.output, recipe=args.recipe)
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from .launch import list_recipes

    for name, path in sorted(list_recipes().items()):
        print(f'{printable(name):<24} {printable(path)}')
    return 0


def _train_py(args: argparse.Namespace) -> int:
    import subprocess

    import torch

    from .data import prepare_fashion_mnist
    from .launch import format_command, recipe_path, train_py_command
    from .recipe import QUICK_TRAINER_KEYS, TRAIN_PY_WITHOUT, load_recipe

    data_dir = args.data_dir
    recipe = load_recipe(recipe_path(args.recipe))
    if recipe.get('dataset') == 'torch/fashion_mnist' and (Path(data_dir) / 'train-images-idx3-ubyte.gz').is_file():
        data_dir = prepare_fashion_mnist(data_dir)  # torchvision wants <root>/FashionMNIST/raw/: lay it out
    extra = list(args.extra)
    if not torch.cuda.is_available() and '--device' not in extra and 'device' not in recipe:
        extra += ['--device', 'cpu']  # train.py defaults to cuda
    device = extra[extra.index('--device') + 1] if '--device' in extra[:-1] else recipe.get('device', 'cuda')
    slow_bf16 = _slow_bf16_reason(recipe) if device == 'cpu' and recipe.get('amp') else None
    if slow_bf16:
        # train.py takes amp as given (its --amp cannot be switched off from the command line)
        print(
            printable(
                f'warning: {args.recipe} sets amp: true, and {slow_bf16}: train.py would train in bf16, slower than '
                'float32. Run a copy of the recipe without its amp lines, or `smallvit train`, which falls back to '
                'float32.'
            ),
            file=sys.stderr,
        )
    unused = {k: v for k, v in recipe.items() if k in QUICK_TRAINER_KEYS and v != QUICK_TRAINER_KEYS[k]}
    if unused:
        # train.py's --config turns every key into a default, so it would take these silently and do nothing
        print(
            printable(
                f'warning: {args.recipe} sets {", ".join(f"{k}: {v}" for k, v in unused.items())}, which only '
                "`smallvit train` honours: timm's train.py has no such argument and runs the recipe without it ("
                + '; '.join(f'{k}: {TRAIN_PY_WITHOUT[k]}' for k in unused)
                + ').'
            ),
            file=sys.stderr,
        )
    command = train_py_command(
        args.recipe,
        args.train_py,
        data_dir,
        output=args.output,
        experiment=args.experiment,
        nproc_per_node=args.nproc_per_node,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        extra=extra,
    )
    print(format_command(command), flush=True)
    return subprocess.call(command) if args.run else 0


def _slow_bf16_reason(recipe: dict) -> str | None:
    """Why bf16 would not pay for the recipe's training step on this CPU (timed as `smallvit train` does), or None."""
    import timm

    from .amp import cpu_bf16_pays, slow_bf16_reason, training_step

    kwargs = dict(recipe.get('model_kwargs') or {})
    for key in ('num_classes', 'in_chans', 'img_size'):
        if recipe.get(key) is not None:
            kwargs.setdefault(key, recipe[key])
    model: Any = timm.create_model(recipe.get('model', 'resnet50'), **kwargs)  # timm's: pretrained_cfg, ...
    default_chans, _, default_size = model.pretrained_cfg['input_size']
    size = kwargs.get('img_size') or default_size
    in_shape = (kwargs.get('in_chans', default_chans), size, size)
    step = training_step(model, in_shape, model.num_classes, int(recipe.get('batch_size', 128)))
    pays, speedup = cpu_bf16_pays(step)
    return None if pays else slow_bf16_reason(speedup)


def _run(args: argparse.Namespace) -> int:
    from .launch import run_timm_script

    run_timm_script(args.script, args.args)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    _setup_logging(logging.WARNING)
    write_onnx = None
    if args.onnx:
        from .onnx_export import export_onnx

        write_onnx = export_onnx

    out = export_checkpoint(
        args.checkpoint,
        args.out_dir,
        model_name=args.model,
        model_kwargs=args.model_kwargs,
        use_ema=args.ema,
        overwrite=args.overwrite,
        repo_id=args.repo_id,
        summary=args.summary,
        write_onnx=write_onnx,
    )
    print(f'Exported to {printable(out)}')
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    _setup_logging(logging.WARNING)
    commit = push_to_hub(
        args.out_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        allow_edited_card=args.allow_edited_card,
    )
    print(f'Pushed {printable(args.out_dir)} to {printable(args.repo_id)}: {printable(commit.commit_url)}')
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    from ._files import write_atomically
    from .predict import find_images, load_model, predict

    _setup_logging()
    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError(f'--top-k {args.top_k}, --batch-size {args.batch_size}: both must be at least 1.')
    paths = find_images(args.images)  # every input named is checked before the model loads or anything is written
    if args.json:
        _check_json_destination(Path(args.json), args.overwrite)
    if args.model.lower().endswith('.onnx'):
        records = _predict_onnx(args, paths)
    else:
        model = load_model(args.model)
        records = predict(model, paths, top_k=args.top_k, batch_size=args.batch_size, attention_dir=args.attention)
    for record in records:
        if 'error' in record:
            continue
        top = ', '.join(f'{printable(p["label"])} {p["probability"]:.3f}' for p in record['predictions'])
        print(f'{printable(record["file"])}: {top}')
    if args.json:
        write_atomically(args.json, lambda tmp: Path(tmp).write_text(''.join(json.dumps(r) + '\n' for r in records)))
    failed = [r for r in records if 'error' in r]
    for record in failed:
        print(f'smallvit predict: error: {printable(record["file"])}: {printable(record["error"])}', file=sys.stderr)
    if failed:
        print(f'smallvit predict: {len(failed)} of {len(records)} files could not be read', file=sys.stderr)
    return 1 if failed else 0


def _check_json_destination(path: Path, overwrite: bool) -> None:
    # before any image is read: a destination that cannot be written would fail only after all were predicted
    from ._files import check_writable_folder

    if path.is_dir():
        raise IsADirectoryError(f'--json {printable(path)}: is a folder; name the file to write.')
    if path.exists() and not overwrite:
        raise FileExistsError(f'--json {printable(path)} already exists: choose a new file, or pass --overwrite.')
    if not path.parent.is_dir():
        raise FileNotFoundError(f'--json {printable(path)}: no folder {printable(path.parent)} to write it in.')
    check_writable_folder(path.parent, f'--json {printable(path)}')


def _predict_onnx(args: argparse.Namespace, paths: list) -> list[dict]:
    from .onnx_export import OnnxClassifier

    if args.attention:
        raise ValueError('--attention needs the PyTorch model: an ONNX file has no attention maps to read.')
    # preprocessing and labels come from the file's own metadata (smallvit onnx writes them)
    return OnnxClassifier(args.model).predict(paths, top_k=args.top_k, batch_size=args.batch_size)


def _onnx(args: argparse.Namespace) -> int:
    from .onnx_export import QUANTIZE_MODES, check_output_path, export_onnx
    from .predict import load_model

    _setup_logging()
    if args.quantize is not None and args.quantize not in QUANTIZE_MODES:
        raise ValueError(f'--quantize {args.quantize}: unknown mode; valid: {", ".join(QUANTIZE_MODES)}.')
    check_output_path(args.out, args.overwrite)  # before the model loads: a bad OUT costs nothing
    path = export_onnx(load_model(args.model), args.out, quantize=args.quantize, overwrite=args.overwrite)
    kind = f'{args.quantize} ' if args.quantize else ''
    print(f'Exported {printable(args.model)} to {printable(path)} ({kind}ONNX, checked with onnxruntime)')
    return 0


def _app(args: argparse.Namespace) -> int:
    try:
        from .app import DEFAULT_MODELS, launch
    except ImportError as e:  # Gradio is the app extra
        raise ValueError(f"needs Gradio ({e}): pip install 'timm-smallvit[app]'.") from None

    _setup_logging()
    logging.getLogger('httpx').setLevel(logging.WARNING)  # Gradio's own requests to itself at start
    launch(args.models or list(DEFAULT_MODELS), host=args.host, port=args.port)
    return 0


def _space(args: argparse.Namespace) -> int:
    from .space import push_space, write_space

    _setup_logging()
    if args.push and not args.repo_id:
        raise ValueError('--push needs --repo-id USER/NAME (the Space to create or update).')
    out = write_space(args.model, args.out_dir, overwrite=args.overwrite, package=args.package)
    print(f'Wrote the Space folder {printable(out)} (app.py, requirements.txt, README.md)')
    if args.push:
        commit = push_space(out, args.repo_id, private=args.private, overwrite=args.overwrite)
        print(f'Pushed {printable(out)} to the Space {args.repo_id}: {commit.commit_url}')
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
    export.add_argument('--onnx', action='store_true', help='also write model.onnx (checked with onnxruntime)')
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
    push.add_argument(
        '--allow-edited-card',
        action='store_true',
        help='push a README.md edited after export as it is (never a link; without this flag it is refused)',
    )
    push.set_defaults(func=_push)

    predict = sub.add_parser(
        'predict', help='classify images with a model (top-k labels) and, with --attention, draw what it attends to'
    )
    predict.add_argument(
        'model',
        help='a pretrained name (smallvit_tiny_convstem_28.fmnist), local-dir:<folder>, hf-hub:<repo>, a training '
        'checkpoint (last.pth.tar), or an .onnx file written by smallvit onnx (run with onnxruntime)',
    )
    predict.add_argument('images', nargs='+', help='image files, folders (searched recursively) or glob patterns')
    predict.add_argument('--top-k', type=int, default=3, help='labels to show per image (default 3)')
    predict.add_argument('--batch-size', type=int, default=64)
    predict.add_argument('--json', help='write one JSON record per image to this file (JSON Lines)')
    predict.add_argument('--overwrite', action='store_true', help='replace an existing --json file')
    predict.add_argument(
        '--attention',
        metavar='DIR',
        help="write a PNG per image: the last block's attention and the attention rollout over the image",
    )
    predict.set_defaults(func=_predict)

    onnx = sub.add_parser(
        'onnx', help='export a model to ONNX (checked with onnxruntime; preprocessing and labels in its metadata)'
    )
    onnx.add_argument(
        'model',
        help='a pretrained name (smallvit_tiny_convstem_28.fmnist), local-dir:<folder>, hf-hub:<repo>, or a training '
        'checkpoint (last.pth.tar)',
    )
    onnx.add_argument('out', help='the .onnx file to write')
    onnx.add_argument('--quantize', metavar='MODE', help='int8: onnxruntime dynamic quantization of the linear layers')
    onnx.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
    onnx.set_defaults(func=_onnx)


def _add_app_commands(sub: argparse._SubParsersAction) -> None:
    model_help = (
        'a pretrained name (smallvit_tiny_convstem_28.fmnist), local-dir:<folder>, hf-hub:<repo>, a training '
        'checkpoint (last.pth.tar), or an .onnx file written by smallvit onnx (labels only)'
    )
    app = sub.add_parser('app', help='see what a model sees, in a browser: top labels and attention maps (Gradio)')
    app.add_argument('models', nargs='*', metavar='MODEL', help=f'{model_help}; default: the shipped pretrained tags')
    app.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1: this machine only)')
    app.add_argument('--port', type=int, default=7860, help='port (default 7860)')
    app.set_defaults(func=_app)

    space = sub.add_parser('space', help='write a Hugging Face Space folder serving `smallvit app` over one model')
    space.add_argument('model', help=model_help)
    space.add_argument('out_dir', help='folder to create (must not exist or be empty, unless --overwrite)')
    space.add_argument(
        '--overwrite',
        action='store_true',
        help='replace a non-empty OUT_DIR (and, with --push, the app of a Space that smallvit space did not write)',
    )
    space.add_argument('--package', help='requirement line for the package (default timm-smallvit[app]==VERSION)')
    space.add_argument(
        '--push', action='store_true', help='then upload it as a Space (token: HF_TOKEN or hf auth login)'
    )
    space.add_argument('--repo-id', help='user/name of the Space (created if missing)')
    space.add_argument('--private', action='store_true', help='create the Space private')
    space.set_defaults(func=_space)


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    from timm.utils import ParseKwargs

    train = sub.add_parser('train', help="train with a recipe (timm train.py's YAML format) on a CPU or GPUs")
    train.add_argument('--config', required=True, help='a shipped recipe name (see `smallvit recipes`) or a YAML path')
    train.add_argument('--data-dir', help='dataset folder (Fashion-MNIST: the release *-ubyte.gz files)')
    train.add_argument('--output', help='parent folder of runs (default ./output/train)')
    train.add_argument('--experiment', help='run folder name (default: date-model-size)')
    train.add_argument('--resume', help='checkpoint to resume from (last.pth.tar of an interrupted run)')
    train.add_argument(
        '--set', nargs='*', action=ParseKwargs, metavar='KEY=VALUE', help='override recipe keys, e.g. --set epochs=2'
    )
    train.set_defaults(func=_train)

    demo = sub.add_parser('demo', help='train, evaluate, export and reload a model on Fashion-MNIST, offline')
    demo.add_argument('--data', required=True, help='folder with the Fashion-MNIST release *-ubyte.gz files')
    demo.add_argument('--output', default='runs/demo', help='parent folder for the run and its export')
    demo.add_argument('--recipe', default='fashion_mnist_demo', help='recipe name or path')
    demo.set_defaults(func=_demo)

    recipes = sub.add_parser('recipes', help='list the shipped recipes and their paths')
    recipes.set_defaults(func=_recipes)

    train_py = sub.add_parser(
        'train-py',
        help="print (or --run) the command that runs a recipe with timm's train.py; more train.py args after --",
    )
    train_py.add_argument('recipe', help='a shipped recipe name or a YAML path')
    train_py.add_argument('--train-py', required=True, help='path of train.py from a pytorch-image-models checkout')
    train_py.add_argument('--data-dir', required=True, help='dataset folder for --data-dir')
    train_py.add_argument('--output', help="train.py's --output")
    train_py.add_argument('--experiment', help="train.py's --experiment")
    train_py.add_argument('--nproc-per-node', type=int, default=1, help='GPUs per node (torchrun when > 1)')
    train_py.add_argument('--nnodes', type=int, default=1)
    train_py.add_argument('--node-rank', type=int, default=0)
    train_py.add_argument('--master-addr')
    train_py.add_argument('--master-port', type=int)
    train_py.add_argument('--run', action='store_true', help='run it instead of only printing it')
    train_py.set_defaults(extra=[])  # train.py arguments after a `--`, split off in main()
    train_py.set_defaults(func=_train_py)

    run = sub.add_parser('run', help='run a timm script (validate.py, inference.py, ...) with smallvit registered')
    run.add_argument('script', help='path of the script from a pytorch-image-models checkout')
    run.add_argument('args', nargs=argparse.REMAINDER, help="the script's own arguments")
    run.set_defaults(func=_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='smallvit', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    _add_training_commands(sub)
    _add_hub_commands(sub)
    _add_app_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv[:1] == ['train-py'] and '--' in argv:  # `smallvit train-py RECIPE ... -- <more train.py arguments>`
        cut = argv.index('--')
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if args.command == 'train-py':
        args.extra = extra
    if args.command == 'run':
        return args.func(args)  # the script's own errors and exit codes are its own
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input, missing token, Hub errors, NaN loss
        # the message may quote a path, a label or a value from a file: escaped, it stays one line and acts as nothing
        print(f'smallvit {args.command}: error: {printable(e)}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
