"""ONNX export, int8 quantization and the onnxruntime classifier (timm_smallvit.onnx_export).

Every registered variant's graph is checked against an independent PyTorch reference: the same weights with the speed
paths off (the full last block, timm's explicit attention, no dropout modules) and, for patchify models, timm's own
VisionTransformer. A speed path that changed the logits would change the exported graph's output and fail here.
"""

import copy
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image
from timm.data import resolve_model_data_config

from timm_smallvit import cli, smallvit
from timm_smallvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from timm_smallvit.layers import Block, ConvStem, Dropout
from timm_smallvit.onnx_export import (
    LOGITS_ATOL,
    LOGITS_RTOL,
    METADATA_KEYS,
    OnnxClassifier,
    check_onnx_output,
    export_onnx,
    onnx_metadata,
)
from timm_smallvit.predict import load_model, predict

pytest.importorskip('onnxruntime')

VARIANTS = timm.list_models('smallvit*')
SHIPPED = sorted(smallvit.PRETRAINED)


def _without_speed_paths(model: smallvit.SmallViT) -> nn.Module:
    """The same weights computing every token of the last block, on timm's explicit attention, with no dropout."""
    ref = copy.deepcopy(model).eval()
    ref.trim_last_block = False
    ref.set_fused_attn(False)
    for name, module in list(ref.named_modules()):
        if isinstance(module, Dropout):
            parent = ref.get_submodule(name.rpartition('.')[0]) if '.' in name else ref
            setattr(parent, name.rpartition('.')[2], nn.Identity())
    return ref


def _ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    return OnnxClassifier(path)(x)


def _assert_matches(logits: np.ndarray, reference: torch.Tensor) -> None:
    np.testing.assert_allclose(logits, reference.numpy(), rtol=LOGITS_RTOL, atol=LOGITS_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize('name', VARIANTS)
def test_every_variant_exports_and_matches_pytorch_without_its_speed_paths(name, tmp_path):
    model = timm.create_model(name).eval()  # default arguments, random weights
    path = export_onnx(model, tmp_path / 'model.onnx')
    x = torch.randn(5, *model.pretrained_cfg['input_size'])  # a batch size the export never saw
    logits = _ort_logits(path, x)
    with torch.inference_mode():
        _assert_matches(logits, model(x))
        _assert_matches(logits, _without_speed_paths(model)(x))
        if not isinstance(model.patch_embed, ConvStem):
            _assert_matches(logits, smallvit.to_vision_transformer(model).eval()(x))
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is dynamic
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == list(
        model.pretrained_cfg['input_size']
    )


def test_a_speed_path_that_changes_the_logits_fails_the_variant_check(tmp_path, monkeypatch):
    # the trimmed last block computing another token's output: the export still matches the model it traced, but not
    # the reference
    original = Block.forward_prefix
    monkeypatch.setattr(Block, 'forward_prefix', lambda self, x, n: original(self, x.flip(1), n))
    model = timm.create_model('smallvit_nano_patch4_28').eval()
    path = export_onnx(model, tmp_path / 'model.onnx')
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode(), pytest.raises(AssertionError):
        _assert_matches(_ort_logits(path, x), _without_speed_paths(model)(x))


@pytest.fixture(scope='module')
def convstem_export(tmp_path_factory) -> tuple[Path, smallvit.SmallViT]:
    model = timm.create_model('smallvit_tiny_convstem_28.fmnist', pretrained=True).eval()
    return export_onnx(model, tmp_path_factory.mktemp('onnx') / 'model.onnx'), model


def test_metadata_round_trip(convstem_export):
    path, model = convstem_export
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props == onnx_metadata(model) and set(METADATA_KEYS) <= set(props)
    classifier = OnnxClassifier(path)
    assert classifier.architecture == 'smallvit_tiny_convstem_28'
    assert classifier.label_names == list(FASHION_MNIST_CLASSES)
    assert classifier.data_config == resolve_model_data_config(model)
    assert classifier.data_config['input_size'] == (1, 28, 28) and classifier.data_config['mean'] == (0.5,)


def _test_images(fmnist_src: Path, n: int, folder: Path | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    images, targets = load_fashion_mnist(fmnist_src, train=False)
    paths = []
    if folder is not None:
        for i in range(n):
            img = Image.fromarray(images[i].numpy(), mode='L')
            path = folder / f'{i:02d}.png'
            (img.convert('RGB') if i % 2 else img).save(path)  # users' files come in either mode
            paths.append(path)
    return images[:n], targets[:n], paths


def test_onnx_classifier_predicts_as_smallvit_predict(convstem_export, fmnist_src, tmp_path):
    path, _ = convstem_export
    _, _, paths = _test_images(fmnist_src, 12, tmp_path)
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    paths.append(tmp_path / 'broken.png')
    expected = predict(load_model('smallvit_tiny_convstem_28.fmnist'), paths, top_k=3)
    got = OnnxClassifier(path).predict(paths, top_k=3)
    assert [r['file'] for r in got] == [r['file'] for r in expected]
    assert got[-1] == expected[-1] and 'error' in got[-1]
    for g, e in zip(got[:-1], expected[:-1], strict=True):
        assert [p['label'] for p in g['predictions']] == [p['label'] for p in e['predictions']]
        for gp, ep in zip(g['predictions'], e['predictions'], strict=True):
            assert gp['probability'] == pytest.approx(ep['probability'], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('name', SHIPPED)
@pytest.mark.parametrize('method', ['dynamic', 'static'])
def test_int8_holds_accuracy_on_a_real_subset(name, method, fmnist_src, tmp_path):
    from timm.data import create_transform

    model = timm.create_model(name, pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model))
    images, targets, _ = _test_images(fmnist_src, 500)
    x = torch.stack([transform(Image.fromarray(img.numpy(), mode='L')) for img in images])
    train, _ = load_fashion_mnist(fmnist_src, train=True)
    calibration = torch.stack([transform(Image.fromarray(img.numpy(), mode='L')) for img in train[:200]])
    path = export_onnx(model, tmp_path / 'int8.onnx', quantize='int8', int8_method=method, calibration=calibration)
    int8 = torch.from_numpy(OnnxClassifier(path)(x)).argmax(-1)
    with torch.inference_mode():
        fp32 = model(x).argmax(-1)
    assert (int8 == fp32).float().mean() >= 0.98
    assert abs((int8 == targets).float().mean() - (fp32 == targets).float().mean()) <= 0.01
    assert OnnxClassifier(path).label_names == list(FASHION_MNIST_CLASSES)  # the metadata survives quantization
    assert path.stat().st_size < 0.6 * (smallvit.PRETRAINED_DIR / name / 'model.safetensors').stat().st_size


# ---- bad input: each a one-line error that writes nothing ---------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_model() -> smallvit.SmallViT:
    return timm.create_model('smallvit_tiny_patch4_28', depth=1).eval()  # a cfg without label names


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and '\n' not in message
    return message


def _unwritable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / 'read-only'
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere chmod allows nothing: take a folder the kernel refuses
        folder = Path('/sys')
        if not folder.is_dir() or _writable(folder):
            pytest.skip('no folder here refuses writes to this user')
    return folder


def _writable(folder: Path) -> bool:
    try:
        (folder / '.probe').touch()
    except OSError:
        return False
    (folder / '.probe').unlink()
    return True


def test_bad_outputs_are_one_line_errors_that_write_nothing(tiny_model, tmp_path):
    existing = tmp_path / 'existing.onnx'
    existing.write_bytes(b'keep me')
    with pytest.raises(FileExistsError) as e:
        export_onnx(tiny_model, existing)
    assert '--overwrite' in _one_line(e) and existing.read_bytes() == b'keep me'
    with pytest.raises(IsADirectoryError) as e:
        export_onnx(tiny_model, tmp_path)
    _one_line(e)
    unwritable = _unwritable_folder(tmp_path)
    with pytest.raises(PermissionError) as e:
        export_onnx(tiny_model, unwritable / 'model.onnx')
    _one_line(e)
    with pytest.raises(ValueError) as e:
        export_onnx(tiny_model, tmp_path / 'model.onnx', quantize='int4')
    assert 'int8' in _one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['existing.onnx', 'read-only']


def test_overwrite_replaces_the_file(tiny_model, tmp_path):
    out = tmp_path / 'model.onnx'
    out.write_bytes(b'old')
    export_onnx(tiny_model, out, overwrite=True)
    assert OnnxClassifier(out).architecture == 'smallvit_tiny_patch4_28'
    assert OnnxClassifier(out).label_names == [str(i) for i in range(10)]  # no label names: indices, as predict
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']  # no temporary file left beside it


def test_non_onnx_and_foreign_onnx_files_are_one_line_errors(tmp_path):
    text = tmp_path / 'notes.onnx'
    text.write_text('this is not a model\n' * 20)
    with pytest.raises(ValueError) as e:
        OnnxClassifier(text)
    assert 'not an ONNX model' in _one_line(e)
    node = onnx.helper.make_node('Identity', ['x'], ['y'])
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 3]) for n in ('x', 'y')]
    foreign = tmp_path / 'foreign.onnx'
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], 'g', info[:1], info[1:])), str(foreign))
    with pytest.raises(ValueError) as e:
        OnnxClassifier(foreign)
    assert 'smallvit onnx' in _one_line(e)
    with pytest.raises(FileNotFoundError):
        OnnxClassifier(tmp_path / 'missing.onnx')


def test_the_output_check_fails_above_its_tolerance(tiny_model, tmp_path):
    path = export_onnx(tiny_model, tmp_path / 'model.onnx')
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        reference = tiny_model(x).numpy()
    check_onnx_output(path, x.numpy(), reference)
    with pytest.raises(ValueError) as e:
        check_onnx_output(path, x.numpy(), reference + 10 * LOGITS_ATOL)
    assert 'tolerance' in _one_line(e)


# ---- the command line ---------------------------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_smallvit_onnx_then_predict_prints_what_pytorch_prints(fmnist_src, tmp_path, capsys):
    out = tmp_path / 'convstem.onnx'
    code, printed, _ = _cli(capsys, 'onnx', 'smallvit_tiny_convstem_28.fmnist', out)
    assert code == 0 and str(out) in printed
    _, _, paths = _test_images(fmnist_src, 6, tmp_path)
    code, onnx_lines, _ = _cli(capsys, 'predict', out, *paths, '--json', tmp_path / 'onnx.jsonl')
    assert code == 0
    code, torch_lines, _ = _cli(
        capsys, 'predict', 'smallvit_tiny_convstem_28.fmnist', *paths, '--json', tmp_path / 'pt.jsonl'
    )
    assert code == 0 and onnx_lines == torch_lines and len(onnx_lines.splitlines()) == 6
    onnx_records = [json.loads(line) for line in (tmp_path / 'onnx.jsonl').read_text().splitlines()]
    torch_records = [json.loads(line) for line in (tmp_path / 'pt.jsonl').read_text().splitlines()]
    assert [r['predictions'][0]['label'] for r in onnx_records] == [r['predictions'][0]['label'] for r in torch_records]


def test_smallvit_onnx_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    existing = tmp_path / 'existing.onnx'
    existing.write_bytes(b'keep me')
    text = tmp_path / 'notes.onnx'
    text.write_text('not a model\n')
    image = tmp_path / 'a.png'
    Image.new('L', (28, 28)).save(image)
    model = 'smallvit_tiny_convstem_28.fmnist'
    cases = [
        ('onnx', 'smallvit_unknown_model', tmp_path / 'a.onnx'),
        ('onnx', model, existing),
        ('onnx', model, tmp_path),
        ('onnx', model, _unwritable_folder(tmp_path) / 'a.onnx'),
        ('onnx', model, tmp_path / 'b.onnx', '--quantize', 'int4'),
        ('predict', text, image),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in cases:
        code, out, err = _cli(capsys, *argv)
        assert code == 1 and out == '' and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith(f'smallvit {argv[0]}: error: '), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and existing.read_bytes() == b'keep me'


def test_export_onnx_writes_model_onnx_that_push_publishes(tmp_path, monkeypatch, capsys):
    from tests.hub_server import HubServer, make_training_run, use_hub

    run = make_training_run(tmp_path / 'run', model_ema=False)
    out = tmp_path / 'export'
    code, _, err = _cli(capsys, 'export', run / 'last.pth.tar', out, '--onnx')
    assert code == 0, err
    assert (out / 'model.onnx').is_file() and not [p for p in out.iterdir() if p.name.startswith('.')]
    card = (out / 'README.md').read_text()
    assert 'smallvit predict model.onnx' in card and '- `model.onnx`' in card
    model = load_model(f'local-dir:{out}')
    x = torch.randn(3, *model.pretrained_cfg['input_size'])
    with torch.inference_mode():
        _assert_matches(_ort_logits(out / 'model.onnx', x), model(x))
    token = 'hf_alice_0123456789abcdefghijklmnopqrstuv'
    with HubServer(tokens={token: 'alice'}) as hub:
        use_hub(monkeypatch, hub, tmp_path / 'home', token=token)
        code, _, err = _cli(capsys, 'push', out, '--repo-id', 'alice/exported')
        assert code == 0, err
        assert hub.file('alice/exported', 'model.onnx') == (out / 'model.onnx').read_bytes()
