"""Hostile and careless input, round two (issue 34): metadata, labels, links, sizes, damaged bytes. One row per case.

Rows are :class:`tests.test_hostile_input.Case` rows, numbered by the issue's ten classes: 1 memory bombs from small
files, 2 terminal injection, 3 metadata of the wrong type or length, 4 push's model.onnx, 5 16-bit images, 6 links
in predict's folders and globs, 7 recipe sizes and std, 8 what killed exports leave, 9 predict's --json destination,
10 flipped bytes in a checkpoint's tensors. Each row failed on the code before the issue (43e4b35): a traceback, a
silent wrong answer, a hang, a file written or pushed, or (with :func:`no_big_resize`) a resize of thousands of pixels.

The package's new names are imported inside the helpers, so that each row fails alone on code without them.
"""

import json
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

import timm_smallvit
from tests.hub_server import HubServer, make_training_run, use_hub
from tests.test_hostile_input import (
    ALICE,
    TINY_RUN,
    Case,
    CliError,
    Given,
    folder,
    nothing,
    png,
    recipe_file,
    resolve,
    smallvit,
    train_with,
)

pytest.importorskip('onnxruntime')

ESC_TITLE = '\x1b]0;pwned\x07'  # sets the terminal's title
ESC_CLEAR = '\x1b[2J'  # clears the screen
FASHION = [
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
]  # fmt: skip
# every name hostile, so that whichever the model ranks first reaches the output: an escape, a forged line, a bidi
# override
HOSTILE_LABELS = [f'{ESC_CLEAR if i % 2 else ESC_TITLE}{n}\nforged.png: {n} 1.000\u202e' for i, n in enumerate(FASHION)]


# ---- guards: what must not happen while a row runs ------------------------------------------------------------------

MAX_RESIZE = 2048  # MAX_SIDE / the smallest crop_pct is 1024: twice that is never a legitimate resize


def no_big_resize(given: Given) -> None:
    """A resize of one image past MAX_RESIZE px a side fails the row at once (the old code resized 28 px images to
    56,000 px: 3.8 GB)."""
    real = Image.Image.resize

    def resize(self: Image.Image, size: Any, *args: Any, **kwargs: Any) -> Image.Image:
        assert max(size) <= MAX_RESIZE, f'a resize to {size}'
        return real(self, size, *args, **kwargs)

    given.mp.setattr(Image.Image, 'resize', resize)


def no_image_read(given: Given) -> None:
    """Opening an image fails the row: the error must come before any image is read."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f'an image was read: Image.open{args}')

    given.mp.setattr(Image, 'open', refuse)


# ---- exports, ONNX files and checkpoints, changed -------------------------------------------------------------------


def export_copy(*changes: Callable[[Path], None], onnx_file: bool = False) -> Callable[[Given], Path]:
    """A copy of the module's export (model.onnx kept only with onnx_file), changed."""

    def setup(given: Given) -> Path:
        folder = Path(shutil.copytree(given.fixture('exported'), given.tmp / 'export'))
        if not onnx_file:
            (folder / 'model.onnx').unlink()
        for change in changes:
            change(folder)
        return folder

    return setup


def config_cfg(**values: Any) -> Callable[[Path], None]:
    """Set keys of config.json's pretrained_cfg (or, for label_names, its top level, where export writes them)."""

    def change(folder: Path) -> None:
        config = json.loads((folder / 'config.json').read_text())
        for key, value in values.items():
            (config if key == 'label_names' else config['pretrained_cfg'])[key] = value
        (folder / 'config.json').write_text(json.dumps(config))

    return change


def onnx_meta(**values: Any) -> Callable[[Path], None]:
    """Set metadata of the folder's model.onnx (JSON, as smallvit onnx writes it)."""

    def change(folder: Path) -> None:
        proto = onnx.load(str(folder / 'model.onnx'))
        for prop in proto.metadata_props:
            if prop.key in values:
                prop.value = json.dumps(values[prop.key])
        onnx.save(proto, str(folder / 'model.onnx'))

    return change


def onnx_graph(kind: str) -> Callable[[Path], None]:
    """Replace the folder's model.onnx by a small graph of another kind, with the same (valid) metadata."""

    def change(folder: Path) -> None:
        meta = onnx.load(str(folder / 'model.onnx')).metadata_props
        x = helper.make_tensor_value_info('pixel_values', TensorProto.FLOAT, ['batch', 1, 28, 28])
        initializers = []
        if kind == '4d_output':
            nodes = [helper.make_node('Identity', ['pixel_values'], ['logits'])]
            y = helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 1, 28, 28])
        elif kind == '0d_output':
            nodes = [helper.make_node('ReduceSum', ['pixel_values'], ['logits'], keepdims=0)]
            y = helper.make_tensor_value_info('logits', TensorProto.FLOAT, [])
        else:  # a graph onnxruntime refuses: a missing input, or external weights it cannot read
            y = helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 10])
            weight = helper.make_tensor('w', TensorProto.FLOAT, [784, 10], np.zeros(7840, np.float32).tobytes(), True)
            if kind == 'external_data':
                weight.data_location = TensorProto.EXTERNAL
                weight.ClearField('raw_data')
                weight.external_data.add(key='location', value='../../weights.bin')
            initializers = [weight]
            flat = helper.make_node('Flatten', ['pixel_values'], ['flat'])
            second = 'w' if kind == 'external_data' else 'nowhere'
            nodes = [flat, helper.make_node('MatMul', ['flat', second], ['logits'])]
        graph = helper.make_graph(nodes, 'g', [x], [y], initializer=initializers)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], ir_version=8)
        proto.metadata_props.extend(meta)
        onnx.save(proto, str(folder / 'model.onnx'))

    return change


def onnx_weights_changed(folder: Path) -> None:
    """Another model's ONNX file: the same graph and metadata, other weights (the largest tensor doubled)."""
    from onnx import numpy_helper

    proto = onnx.load(str(folder / 'model.onnx'))
    tensor = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 2, tensor.name))
    onnx.save(proto, str(folder / 'model.onnx'))


def text_as_onnx(folder: Path) -> None:
    (folder / 'model.onnx').write_text('hf_secret_token_0123456789\n')


def flip_tensor_byte(path: Path) -> None:
    """One byte changed inside the largest tensor record of a torch checkpoint (the zip's headers intact)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack('<HH', raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def run_copy(*changes: Callable[[Path], None], **args: Any) -> Callable[[Given], Path]:
    """A training run's last.pth.tar: the module's run (copied), or a new 1-epoch run with these training args."""

    def setup(given: Given) -> Path:
        if args:
            run = make_training_run(given.tmp / 'run', epochs=1, model_ema=False, **args)
        else:
            run = Path(shutil.copytree(given.fixture('run'), given.tmp / 'run'))
        for change in changes:
            change(run / 'last.pth.tar')
        return run / 'last.pth.tar'

    return setup


# ---- acts -----------------------------------------------------------------------------------------------------------


def image(given: Given, name: str = 'shoe.png') -> Path:
    path = given.tmp / name
    path.write_bytes(png(7))
    return path


def predict_with(setup: Callable[[Given], Path], kind: str = 'local-dir', *guards: Callable[[Given], None]):
    """Setup for `smallvit predict MODEL shoe.png`: (model reference, image)."""

    def wrapped(given: Given) -> tuple[str, Path]:
        target = setup(given)
        for guard in guards:
            guard(given)
        ref = {'local-dir': f'local-dir:{target}', 'onnx': str(target / 'model.onnx'), 'file': str(target)}[kind]
        return ref, image(given)

    return wrapped


def predict(given: tuple[str, Path]) -> str:
    return smallvit('predict', given[0], given[1])


def onnx_predict(*changes: Callable[[Path], None]) -> Callable[[Given], tuple[str, Path]]:
    return predict_with(export_copy(*changes, onnx_file=True), 'onnx', no_big_resize)


def config_predict(*changes: Callable[[Path], None]) -> Callable[[Given], tuple[str, Path]]:
    return predict_with(export_copy(*changes), 'local-dir', no_big_resize)


def one_escaped_line(given: Any, stdout: str) -> None:
    """One line of output (no forged line), no ESC or bidi control reaching the terminal, the names shown escaped."""
    lines = stdout.splitlines()
    assert len(lines) == 1 and '\x1b' not in stdout and '\u202e' not in stdout, repr(stdout)
    assert '\\x1b' in stdout or '\\n' in stdout or '\\u202e' in stdout, stdout


def escaped_error(given: Any, error: Any) -> None:
    assert '\x1b' not in str(error) and '\\x1b' in str(error), repr(str(error))


def push_repo(given: Given) -> str:
    use_hub(given.mp, given.fixture('hub'), given.tmp / 'home', token=ALICE)
    return f'alice/{re.sub(r"[^a-z0-9]+", "-", given.request.node.callspec.id.lower())}'[:90]


def push_setup(*changes: Callable[[Path], None], onnx_file: bool = True) -> Callable[[Given], tuple[Path, str, Any]]:
    def setup(given: Given) -> tuple[Path, str, Any]:
        folder = export_copy(*changes, onnx_file=onnx_file)(given)
        return folder, push_repo(given), given.fixture('hub')

    return setup


def push(given: tuple[Path, str, Any]) -> Any:
    return timm_smallvit.push_to_hub(given[0], given[1])


def nothing_pushed(given: tuple[Path, str, Any], error: Any) -> None:
    assert given[1] not in given[2].repos, 'a repo was created or a file uploaded'


def hub_pull_setup(*changes: Callable[[Path], None]) -> Callable[[Given], tuple[str, Path]]:
    """Someone else's repo on the Hub holding a hostile export (uploaded as it is, not through smallvit push)."""

    def setup(given: Given) -> tuple[str, Path]:
        from huggingface_hub import HfApi

        folder = export_copy(*changes)(given)
        repo = push_repo(given)
        api = HfApi(token=ALICE)
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
        no_big_resize(given)
        return f'hf-hub:{repo}', image(given)

    return setup


# ---- class 5: 16-bit images against their 8-bit twins ----------------------------------------------------------------


def fmnist_twins(mode: str = 'I;16') -> Callable[[Given], dict[str, Any]]:
    """A real Fashion-MNIST test image (a bag) as an 8-bit PNG and as its high-depth twin: 16-bit PNG values v * 257
    plus noise under half a level (mode 'I;16'), or a 32-bit TIFF of the same values (mode 'I')."""

    def setup(given: Given) -> dict[str, Any]:
        from timm_smallvit.data import load_fashion_mnist

        images, labels = load_fashion_mnist(given.fixture('fmnist_src'), train=False)
        pixels = images[(labels == 8).nonzero()[0, 0]].numpy()
        noise = np.random.default_rng(0).integers(-128, 129, pixels.shape)
        wide = np.clip(pixels.astype(np.int64) * 257 + noise, 0, 65535)
        Image.fromarray(pixels).save(given.tmp / 'bag8.png')
        if mode == 'I;16':
            Image.fromarray(wide.astype(np.uint16)).save(given.tmp / 'bag16.png')
            wide_path = given.tmp / 'bag16.png'
        else:
            Image.fromarray(wide.astype(np.int32)).save(given.tmp / 'bag32.tif')
            wide_path = given.tmp / 'bag32.tif'
        with Image.open(wide_path) as img:
            assert img.mode == mode, img.mode
        return {'eight': given.tmp / 'bag8.png', 'wide': wide_path, 'folder': given.fixture('exported')}

    return setup


def predicted(engine: str) -> Callable[[dict[str, Any]], tuple[list, list]]:
    def act(given: dict[str, Any]) -> tuple[list, list]:
        paths = [given['eight'], given['wide']]
        if engine == 'onnx':
            from timm_smallvit.onnx_export import OnnxClassifier

            records = OnnxClassifier(given['folder'] / 'model.onnx').predict(paths, top_k=10)
        else:
            from timm_smallvit.predict import load_model
            from timm_smallvit.predict import predict as run

            records = run(load_model('smallvit_tiny_convstem_28.fmnist'), paths, top_k=10)  # the shipped weights
        by_index = [{p['index']: p['probability'] for p in r['predictions']} for r in records]
        return by_index[0], by_index[1]

    return act


def same_probabilities(given: Any, result: tuple[dict, dict]) -> None:
    eight, wide = result  # the same pixels (16-bit values round to the 8-bit ones): the same numbers
    assert eight.keys() == wide.keys()
    assert max(abs(eight[k] - wide[k]) for k in eight) < 1e-5, (eight, wide)


def decoded_as_training(given: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 16-bit file as training decodes it (an image folder), as predict reads it, and its 8-bit twin."""
    from timm_smallvit.data import SmallImageDataset
    from timm_smallvit.predict import read_image

    root = given['eight'].parent / 'data'
    for split in ('train', 'val'):
        (root / split / 'bag').mkdir(parents=True)
        shutil.copy(given['wide'], root / split / 'bag' / given['wide'].name)
    trained = SmallImageDataset('', root).load('train', in_chans=1, img_size=(28, 28), progress=False).images[0, 0]
    inferred, _ = read_image(given['wide'], 'L')
    return trained.numpy(), np.asarray(inferred), np.asarray(Image.open(given['eight']))


def one_conversion(given: Any, result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    trained, inferred, eight = result
    assert np.array_equal(trained, inferred)
    assert np.abs(inferred.astype(int) - eight.astype(int)).max() <= 1


# ---- class 6: links in predict's folders and patterns ----------------------------------------------------------------


def linked_folder(links: dict[str, str], hard: bool = False) -> Callable[[Given], Path]:
    """``imgs/`` with a.png and sub/b.png, ``elsewhere/c.png`` beside it, these symbolic links (name -> target) and,
    with hard, hard.png: a second name of a.png."""

    def setup(given: Given) -> Path:
        root = given.tmp / 'imgs'
        (root / 'sub').mkdir(parents=True)
        (given.tmp / 'elsewhere').mkdir()
        for rel, value in (('imgs/a.png', 1), ('imgs/sub/b.png', 2), ('elsewhere/c.png', 3)):
            (given.tmp / rel).write_bytes(png(value))
        for name, target in links.items():
            (root / name).symlink_to(target)
        if hard:
            os.link(root / 'a.png', root / 'hard.png')
        return root

    return setup


def found(*patterns: str) -> Callable[[Path], list[str]]:
    def act(root: Path) -> list[str]:
        from timm_smallvit.predict import find_images

        return sorted(str(p.relative_to(root.parent)) for p in find_images([str(root / p) for p in patterns]))

    return act


def files_are(*names: str) -> Callable[[Any, list[str]], None]:
    def check(given: Any, result: list[str]) -> None:
        assert result == sorted(names), result

    return check


# ---- classes 7-9 -----------------------------------------------------------------------------------------------------


def killed_export_left(given: Given) -> tuple[Path, Path]:
    """A run to export, and beside the export's destination what a kill during model.onnx's copy left."""
    from timm_smallvit.export import EXPORT_FILES

    run = Path(shutil.copytree(given.fixture('run'), given.tmp / 'run'))
    left = given.tmp / '.out.export-99999999-abcd1234'  # a pid no process has
    left.mkdir()
    (left / EXPORT_FILES[0]).write_bytes(b'weights')
    (left / '.model.onnx.k2j4h5g6').write_bytes(b'half an onnx file')
    return run / 'last.pth.tar', left


def export_again(given: tuple[Path, Path]) -> Path:
    return timm_smallvit.export_checkpoint(given[0], given[1].parent / 'out')


def stale_removed(given: tuple[Path, Path], out: Path) -> None:
    assert (out / 'model.safetensors').is_file() and not given[1].exists()
    assert not list(out.parent.glob('.out.export-*')), list(out.parent.iterdir())


def stale_onnx_work(given: Given) -> Path:
    """The temp dir holding the work folders of killed ONNX exports (empty or not), and a live process's."""
    import tempfile

    tmp = given.tmp / 'tmp'
    tmp.mkdir()
    given.mp.setattr(tempfile, 'tempdir', str(tmp))
    (tmp / 'smallvit-onnx-99999999-abcd1234').mkdir()
    (tmp / 'smallvit-quant-99999999-efgh5678').mkdir()
    (tmp / 'smallvit-quant-99999999-efgh5678' / 'prepared.onnx').write_bytes(b'x')
    (tmp / f'smallvit-onnx-{os.getpid()}-live0000').mkdir()  # alive: kept

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # the export stops in the middle

    from timm_smallvit import onnx_export

    given.mp.setattr(onnx_export, '_export_float', killed)
    return tmp


def export_onnx_interrupted(tmp: Path) -> list[str]:
    import timm

    from timm_smallvit.onnx_export import export_onnx

    with pytest.raises(KeyboardInterrupt):
        export_onnx(timm.create_model('smallvit_nano_patch4_28'), tmp.parent / 'm.onnx')
    return sorted(p.name for p in tmp.iterdir())


def json_into(where: Callable[[Path], Path]) -> Callable[[Given], tuple[str, Path, Path]]:
    """`smallvit predict` of an export with --json at this destination; reading an image fails the row."""

    def setup(given: Given) -> tuple[str, Path, Path]:
        folder = export_copy()(given)
        shoe = image(given)
        no_image_read(given)
        return f'local-dir:{folder}', shoe, where(given.tmp)

    return setup


def predict_json(given: tuple[str, Path, Path]) -> str:
    return smallvit('predict', given[0], given[1], '--json', given[2], '--overwrite')


def make_dir(tmp: Path) -> Path:
    (tmp / 'out.jsonl').mkdir()
    return tmp / 'out.jsonl'


def resume_from(ckpt: Path) -> Any:
    """A resume with the checkpoint's own recipe (its args), so that nothing but its bytes can be refused."""
    from timm.utils import load_checkpoint_metadata

    from timm_smallvit.recipe import QUICK_TRAINER_KEYS, TRAIN_PY_DEFAULTS, check_resume, resolve_args

    saved = vars(load_checkpoint_metadata(str(ckpt))['args'])
    recipe = {k: v for k, v in saved.items() if k in TRAIN_PY_DEFAULTS or k in QUICK_TRAINER_KEYS}
    return check_resume(resolve_args(recipe, data_dir='.', resume=str(ckpt)))


def initial_from(given: Path) -> Any:
    from timm_smallvit.recipe import resolve_args

    return resolve_args(dict(RECIPE_RUN), initial_checkpoint=str(given))


RECIPE_RUN = dict(model='smallvit_nano_patch4_28', data_dir='.', epochs=1, batch_size=2, in_chans=1)


def pretrained_export_and_data(*changes: Callable[[Path], None]) -> Callable[[Given], tuple[Path, Path]]:
    """An export to start training from (pretrained: true), and an image folder to train on."""

    def setup(given: Given) -> tuple[Path, Path]:
        return export_copy(*changes)(given), folder()(given)

    return setup


def train_from(given: tuple[Path, Path]) -> Any:
    from timm_smallvit.recipe import resolve_args
    from timm_smallvit.trainer import train

    export, root = given
    recipe = dict(TINY_RUN, model=f'local-dir:{export}', pretrained=True, data_dir=str(root))
    return train(resolve_args(recipe, output=str(root.parent / 'runs')))


def fake_export_onnx(given: Given) -> Path:
    """`smallvit onnx` with the export itself replaced (the row is about the line it prints)."""
    from timm_smallvit import onnx_export

    def export(model: Any, out: Any, **kwargs: Any) -> Path:
        Path(out).write_bytes(b'onnx')
        return Path(out)

    given.mp.setattr(onnx_export, 'export_onnx', export)
    return given.tmp / f'out{ESC_CLEAR}{ESC_TITLE}.onnx'


# ---- the cases -------------------------------------------------------------------------------------------------------

BOUNDS = r'expected a number in \[0\.5, 1\.5\]'
CASES = [
    # 1: memory bombs from small files: refused by name, before any image is resized
    Case('1_crop_pct_in_an_export_config', config_predict(config_cfg(crop_pct=0.0005)), predict,
         error=r'export/config.json: crop_pct 0.0005: ' + BOUNDS),
    Case('1_input_size_in_an_export_config', config_predict(config_cfg(input_size=[1, 100000, 100000])), predict,
         error=r'config.json: input_size \[1, 100000, 100000\]: expected .*\[2, 512\]'),
    Case('1_crop_pct_in_onnx_metadata', onnx_predict(onnx_meta(crop_pct=0.0005)), predict,
         error=r'model.onnx: crop_pct 0.0005: ' + BOUNDS),
    Case('1_input_size_in_onnx_metadata', onnx_predict(onnx_meta(input_size=[1, 100000, 100000])), predict,
         error=r'model.onnx: input_size \[1, 100000, 100000\]: expected'),
    Case('1_crop_pct_in_checkpoint_args', predict_with(run_copy(crop_pct=0.0005), 'file', no_big_resize), predict,
         error=r'last.pth.tar: training args: crop_pct 0.0005: ' + BOUNDS),
    Case('1_export_refuses_to_write_it', run_copy(crop_pct=0.0005),
         lambda ckpt: timm_smallvit.export_checkpoint(ckpt, ckpt.parent.parent / 'out'),
         error=r'last.pth.tar: training args: crop_pct 0.0005', check=lambda c, e: not (c.parents[1] / 'out').exists()),
    Case('1_push_refuses_it', push_setup(config_cfg(crop_pct=0.0005), onnx_file=False), push,
         error=r'export/config.json: crop_pct 0.0005', check=nothing_pushed),
    Case('1_someone_elses_hub_repo', hub_pull_setup(config_cfg(crop_pct=0.0005)), predict,
         error=r'hf-hub:alice/.*/config.json: crop_pct 0.0005: ' + BOUNDS),
    # 2: what is printed from data is escaped: labels, OUT, paths in error lines
    Case('2_escapes_in_onnx_label_names', onnx_predict(onnx_meta(label_names=HOSTILE_LABELS)), predict,
         check=one_escaped_line),
    Case('2_escapes_in_checkpoint_label_names', predict_with(run_copy(label_names=HOSTILE_LABELS), 'file'),
         predict, check=one_escaped_line),
    Case('2_escapes_in_config_label_names', config_predict(config_cfg(label_names=HOSTILE_LABELS)), predict,
         check=one_escaped_line),
    Case('2_onnx_out_escaped', fake_export_onnx,
         lambda out: smallvit('onnx', 'smallvit_nano_patch4_28.fmnist', out), check=one_escaped_line),
    Case('2_error_line_escapes_a_path', lambda given: (given.tmp / f'{ESC_TITLE}missing.png'),
         lambda path: smallvit('predict', 'smallvit_nano_patch4_28.fmnist', path),
         error=r'missing.png: no such file', check=escaped_error),
    # 3: metadata of the wrong type or length: one line naming the file, the key and the value
    Case('3_label_names_a_string', config_predict(config_cfg(label_names='T-shirtBagCoat')), predict,
         error=r'config.json: label_names "T-shirtBagCoat": expected a list of 10 class names'),
    Case('3_more_labels_than_outputs', onnx_predict(onnx_meta(label_names=FASHION * 2)), predict,
         error=r'model.onnx: label_names .*: expected 10 names, one per class, got 20'),
    Case('3_fewer_labels_than_outputs', onnx_predict(onnx_meta(label_names=FASHION[:5])), predict,
         error=r'model.onnx: label_names .*: expected 10 names, one per class, got 5'),
    Case('3_label_not_a_string', config_predict(config_cfg(label_names=[*FASHION[:9], 9])), predict,
         error=r'label_names .*: expected strings, but name 9 is 9'),
    Case('3_input_size_rgb_for_a_grayscale_graph', onnx_predict(onnx_meta(input_size=[3, 28, 28])), predict,
         error=r'model.onnx: input_size \[3, 28, 28\]: expected 1 first'),
    Case('3_input_size_a_string', onnx_predict(onnx_meta(input_size='28')), predict,
         error=r'model.onnx: input_size "28": expected \[C, H, W\]'),
    Case('3_input_size_not_the_graphs', onnx_predict(onnx_meta(input_size=[1, 32, 32])), predict,
         error=r'input_size \[1, 32, 32\]: expected \[1, 28, 28\], the size the model is built at'),
    Case('3_mean_of_length_3', onnx_predict(onnx_meta(mean=[0.5, 0.5, 0.5])), predict,
         error=r'model.onnx: mean \[0.5, 0.5, 0.5\]: expected a finite number'),
    Case('3_mean_a_string', config_predict(config_cfg(mean='abc')), predict,
         error=r'config.json: mean "abc": expected a finite number'),
    Case('3_interpolation_unknown', onnx_predict(onnx_meta(interpolation='evil')), predict,
         error=r'model.onnx: interpolation "evil": expected one of nearest, bilinear, bicubic'),
    Case('3_std_nan', onnx_predict(onnx_meta(std=[float('nan')])), predict,
         error=r'model.onnx: std \[NaN\]: expected a finite number, each at least 0.001'),
    Case('3_std_negative', config_predict(config_cfg(std=[-0.5])), predict,
         error=r'config.json: std \[-0.5\]: expected a finite number, each at least 0.001'),
    Case('3_crop_mode_unknown', onnx_predict(onnx_meta(crop_mode='zoom')), predict,
         error=r'model.onnx: crop_mode "zoom": expected one of center, squash, border'),
    Case('3_4d_output', onnx_predict(onnx_graph('4d_output')), predict,
         error=r'model.onnx: the graph gives logits \(batch, 1, 28, 28\): expected logits \(batch, classes\)'),
    Case('3_0d_output', onnx_predict(onnx_graph('0d_output')), predict,
         error=r'model.onnx: the graph gives logits \(\): expected logits \(batch, classes\)'),
    Case('3_invalid_graph', onnx_predict(onnx_graph('invalid')), predict,
         error=r'model.onnx: onnxruntime cannot run it \('),
    Case('3_external_data_onnxruntime_fails_on', onnx_predict(onnx_graph('external_data')), predict,
         error=r'model.onnx: onnxruntime cannot run it \('),
    Case('3_smallvit_onnx_refuses_5_labels_for_10_classes', export_copy(config_cfg(label_names=FASHION[:5])),
         lambda folder: smallvit('onnx', f'local-dir:{folder}', folder.parent / 'out.onnx'),
         error=r'config.json: label_names .*got 5', check=lambda f, e: not (f.parent / 'out.onnx').exists()),
    Case('3_export_refuses_5_labels_for_10_classes', run_copy(label_names=FASHION[:5]),
         lambda ckpt: timm_smallvit.export_checkpoint(ckpt, ckpt.parent.parent / 'out'),
         error=r'last.pth.tar: training args: label_names .*got 5'),
    # 4: push checks model.onnx as it checks the safetensors: nothing goes up otherwise
    Case('4_text_file_as_model_onnx', push_setup(text_as_onnx), push,
         error=r'export/model.onnx: not an ONNX model .*Nothing was pushed', check=nothing_pushed),
    Case('4_another_models_onnx', push_setup(onnx_weights_changed), push,
         error=r'export/model.onnx: onnxruntime logits differ from PyTorch .*Nothing was pushed', check=nothing_pushed),
    Case('4_onnx_of_other_labels', push_setup(onnx_meta(label_names=FASHION[::-1])), push,
         error=r'export/model.onnx: label_names .*: expected .*as config.json says', check=nothing_pushed),
    Case('4_onnx_of_other_preprocessing', push_setup(onnx_meta(mean=[0.25])), push,
         error=r'export/model.onnx: mean \[0.25\]: expected \[0.286\]', check=nothing_pushed),
    # 5: high-depth images are converted at inference as training converts them
    Case('5_16_bit_png_predicts_as_its_8_bit_twin', fmnist_twins(), predicted('pytorch'), check=same_probabilities),
    Case('5_16_bit_png_onnx_predicts_as_its_8_bit_twin', fmnist_twins(), predicted('onnx'), check=same_probabilities),
    Case('5_32_bit_tiff_predicts_as_its_8_bit_twin', fmnist_twins('I'), predicted('pytorch'), check=same_probabilities),
    Case('5_inference_converts_as_training_decodes', fmnist_twins(), decoded_as_training, check=one_conversion),
    # 6: predict's folder and glob search follows no link, takes each file once, and cannot loop
    Case('6_up_link_in_a_glob', linked_folder({'sub/up': '../..'}), found('**/*.png'),
         warning=r'Skipped 1 symbolic link', check=files_are('imgs/a.png', 'imgs/sub/b.png')),
    Case('6_up_and_self_links_cannot_hang', linked_folder({'up': '..', 'self': '.'}), found('**/*.png', '*/*.png'),
         check=files_are('imgs/a.png', 'imgs/sub/b.png')),
    Case('6_links_out_of_and_around_a_folder',
         linked_folder({'out': '../elsewhere', 'c.png': '../elsewhere/c.png', 'up': '..', 'self': '.'}),
         found('.', '*'), check=files_are('imgs/a.png', 'imgs/sub/b.png')),
    Case('6_second_name_of_a_file', linked_folder({'twin.png': 'a.png'}, hard=True),
         found('.', '*.png', 'sub/../a.png'), check=files_are('imgs/a.png', 'imgs/sub/b.png')),
    # 7: recipe sizes bounded and std checked by name, before anything is built or allocated
    Case('7_model_kwargs_img_size', nothing, resolve(model_kwargs={'img_size': 100000}),
         error=r'model_kwargs: img_size 100000: expected a whole number of pixels in \[2, 512\]'),
    Case('7_img_size', nothing, resolve(img_size=100000), error=r'img_size 100000: expected a whole number'),
    Case('7_input_size', nothing, resolve(input_size=[1, 100000, 100000]), error=r'input_size \[1, 100000, 100000\]'),
    Case('7_mean_of_the_wrong_length', nothing, resolve(mean=[0.5, 0.5]),
         error=r'mean \[0.5, 0.5\]: expected a finite number'),
    Case('7_std_zero', recipe_file(std=[0]), train_with('epochs=1'),
         error=r'recipe.yaml with --set: std \[0\]: expected a finite number, each at least 0.001'),
    Case('7_std_negative', nothing, resolve(std=[-1.0]), error=r'std \[-1.0\]: expected'),
    Case('7_std_nan', nothing, resolve(std=[float('nan')]), error=r'std \[NaN\]: expected'),
    Case('7_interpolation_unknown', nothing, resolve(interpolation='evil'), error=r'interpolation "evil": expected'),
    Case('7_crop_pct', nothing, resolve(crop_pct=0.0005), error=r'crop_pct 0.0005: ' + BOUNDS),
    Case('7_std_zero_from_a_pretrained_export', pretrained_export_and_data(config_cfg(std=[0])), train_from,
         error=r'local-dir:.*export \(its pretrained_cfg\) with the recipe: std \[0\]: expected'),
    # 8: what killed exports leave is removed by the next one, their own temp names included
    Case('8_killed_export_left_a_temporary_onnx_name', killed_export_left, export_again, check=stale_removed),
    Case('8_killed_onnx_exports_left_work_folders', stale_onnx_work, export_onnx_interrupted,
         check=lambda tmp, names: names == [f'smallvit-onnx-{os.getpid()}-live0000']),
    # 9: predict's --json destination is checked before any image is read
    Case('9_json_is_a_folder', json_into(make_dir), predict_json, error=r'--json .*out.jsonl: is a folder'),
    Case('9_json_in_a_missing_folder', json_into(lambda tmp: tmp / 'missing' / 'p.jsonl'), predict_json,
         error=r'--json .*missing/p.jsonl: no folder .*missing to write it in'),
    Case('9_json_in_an_unwritable_folder', json_into(lambda tmp: Path('/sys/p.jsonl')), predict_json,
         error=r'--json /sys/p.jsonl: cannot write in /sys'),
    # 10: a flipped byte in a checkpoint's tensors is an error naming the file, wherever weights are read
    Case('10_flipped_byte_predict', predict_with(run_copy(flip_tensor_byte), 'file'), predict,
         error=r'last.pth.tar: damaged: .*CRC'),
    Case('10_flipped_byte_export', run_copy(flip_tensor_byte),
         lambda ckpt: timm_smallvit.export_checkpoint(ckpt, ckpt.parent.parent / 'out'),
         error=r'last.pth.tar: damaged: .*CRC'),
    Case('10_flipped_byte_resume', run_copy(flip_tensor_byte), resume_from, error=r'resume .*last.pth.tar: damaged'),
    Case('10_flipped_byte_initial_checkpoint', run_copy(flip_tensor_byte), initial_from,
         error=r'initial_checkpoint .*last.pth.tar: damaged'),
]  # fmt: skip


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> Path:
    return make_training_run(tmp_path_factory.mktemp('run'), epochs=1, model_ema=False)


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory) -> Path:
    """An export with model.onnx (written as `smallvit export --onnx` writes it)."""
    from timm_smallvit.onnx_export import export_onnx

    out = tmp_path_factory.mktemp('exports') / 'export'
    return timm_smallvit.export_checkpoint(run / 'last.pth.tar', out, write_onnx=export_onnx)


@pytest.fixture(scope='module')
def hub():
    with HubServer(tokens={ALICE: 'alice'}) as server:
        yield server


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('SMALLVIT_CACHE', str(tmp_path / 'cache'))


@pytest.mark.timeout(60)  # a row that loops (class 6) fails here instead of hanging the suite
@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_hostile_metadata(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any, request) -> None:
    caplog.set_level('WARNING')
    given = case.setup(Given(tmp_path, monkeypatch, request))
    if case.error:
        with pytest.raises((ValueError, OSError, CliError)) as info:  # the message is what is checked
            case.act(given)
        message = str(info.value)
        assert re.search(case.error, message), f'{type(info.value).__name__}: {message}'
        assert '\n' not in message.strip(), message
        result: Any = info.value
    else:
        result = case.act(given)
    if case.check is not None:
        assert case.check(given, result) is not False
    if case.warning:
        assert re.search(case.warning, caplog.text), caplog.text


def test_case_ids_are_unique_and_cover_the_ten_classes():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and {int(i.split('_')[0]) for i in ids} == set(range(1, 11))


def test_bounds_are_what_the_docs_state():
    # the numbers docs/deploy.md, docs/hub.md and docs/training.md give
    from timm_smallvit.preprocess import CROP_PCT_RANGE, MAX_SIDE, MIN_STD

    text = (Path(__file__).parents[1] / 'docs' / 'deploy.md').read_text()
    assert f'{MAX_SIDE} px' in text and f'[{CROP_PCT_RANGE[0]}, {CROP_PCT_RANGE[1]}]' in text and str(MIN_STD) in text
    assert MAX_SIDE / CROP_PCT_RANGE[0] * 2 <= MAX_RESIZE  # the resize guard of these rows is above any legal resize


def test_printable_escapes_what_the_terminal_would_act_on():
    from timm_smallvit._terminal import printable

    text = printable(f'{ESC_TITLE}a\nb\r\t\u202ec\u2028 é × ok')
    assert text == '\\x1b]0;pwned\\x07a\\nb\\r\\t\\u202ec\\u2028 é × ok'
    assert all(c.isprintable() for c in text)


def _bytes(img: Image.Image) -> bytes:
    buf = BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def test_every_image_mode_converts_as_pillow_except_the_high_depth_ones():
    # oracle: Pillow's own convert for the 8-bit modes; for 16-bit, the 8-bit twin
    from timm_smallvit.preprocess import to_model_mode

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    for mode in ('1', 'L', 'P', 'RGB', 'RGBA', 'LA', 'CMYK', 'YCbCr'):
        img = rgb.convert(mode)
        for target in ('L', 'RGB'):
            assert _bytes(to_model_mode(img, target)) == _bytes(img.convert(target)), (mode, target)
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for wide in (Image.fromarray(grey.astype(np.uint16) * 257), Image.fromarray(grey.astype(np.int32) * 257)):
        assert np.array_equal(np.asarray(to_model_mode(wide, 'L')), grey), wide.mode
        assert np.array_equal(np.asarray(to_model_mode(wide, 'RGB')), np.stack([grey] * 3, -1))
    floats = Image.fromarray(np.array([[-3.0, 0.4, 0.6, 254.5, 300.0]], np.float32))
    assert np.asarray(to_model_mode(floats, 'L')).tolist() == [[0, 0, 1, 254, 255]]  # rounded half to even, clipped
    with pytest.raises(ValueError):
        to_model_mode(rgb, 'CMYK')


def test_a_torch_checkpoint_saved_without_crcs_still_loads(tmp_path):
    # torch.serialization.set_crc32_options(False) writes CRC 0: such records cannot be checked, and are not refused
    from timm_smallvit._files import check_zip

    path = tmp_path / 'no_crc.pth'
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({'w': torch.arange(100.0)}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    check_zip(path)
    torch.save({'w': torch.arange(100.0)}, tmp_path / 'crc.pth')
    flip_tensor_byte(tmp_path / 'crc.pth')
    with pytest.raises(ValueError, match=r'crc.pth: damaged'):
        check_zip(tmp_path / 'crc.pth')
