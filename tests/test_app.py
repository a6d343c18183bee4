"""`smallvit app`: the Gradio app, driven through gradio_client against one app served in-process on 127.0.0.1.

The oracle is `smallvit predict` on the same files (its --json records) and timm_smallvit.attention on the same input;
nothing is compared with numbers written here. Every request of the module runs with the network cut off: a connection
to anything but the loopback, made by Gradio, huggingface_hub or anyone else in the process, fails the module.
"""

import contextlib
import gzip
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('gradio', reason="Gradio is the app extra: pip install -e '.[app]'")

from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from timm_smallvit import app as app_module
from timm_smallvit.app import AppModel, build_app, check_port, serve
from timm_smallvit.attention import attention_maps
from timm_smallvit.cli import main
from timm_smallvit.plots import attention_overlay
from timm_smallvit.predict import load_model

MODEL = 'smallvit_nano_patch4_28.fmnist'  # the smallest shipped weights
EXAMPLES = sorted(app_module.EXAMPLES_DIR.glob('*.png'))
LOOPBACK = ('127.0.0.1', '::1', 'localhost')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class NetworkGuard:
    """socket.connect and getaddrinfo refuse (and record) anything but the loopback, in every thread."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def __enter__(self) -> 'NetworkGuard':
        self.mp = pytest.MonkeyPatch()
        connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo
        guard = self

        def checked_connect(sock: socket.socket, address: object) -> object:
            host = address[0] if isinstance(address, tuple) else str(address)
            if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in LOOPBACK:
                guard.attempts.append(f'connect {address}')
                raise OSError('the network is cut off in this test')
            return connect(sock, address)

        def checked_getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
            if host not in (None, *LOOPBACK):
                guard.attempts.append(f'resolve {host}')
                raise socket.gaierror('the network is cut off in this test')
            return getaddrinfo(host, *args, **kwargs)

        self.mp.setattr(socket.socket, 'connect', checked_connect)
        self.mp.setattr(socket, 'getaddrinfo', checked_getaddrinfo)
        return self

    def __exit__(self, *exc: object) -> None:
        self.mp.undo()


@pytest.fixture(scope='module')
def network():
    from huggingface_hub import constants

    with NetworkGuard() as guard, pytest.MonkeyPatch.context() as mp:
        # gradio_client's own calls to huggingface.co (its telemetry, huggingface_hub's agent registry): the test's
        # client, not the app, so switched off here; anything the app does still meets the guard
        mp.setattr(constants, 'HF_HUB_DISABLE_TELEMETRY', True)
        mp.setattr(constants, 'HF_HUB_OFFLINE', True)
        yield guard
    assert guard.attempts == [], 'something tried to reach the network'


@pytest.fixture(scope='module')
def served(network, tmp_path_factory):
    """The app over MODEL on a free loopback port, and its URL."""
    mp = pytest.MonkeyPatch()
    mp.setenv('GRADIO_TEMP_DIR', str(tmp_path_factory.mktemp('gradio')))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread each is fastest on a busy 2-core machine
    demo = build_app([MODEL])
    url = serve(demo, '127.0.0.1', free_port(), block=False)
    yield demo, url
    demo.close()
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope='module')
def client(served):
    return Client(served[1], verbose=False, download_files=str(Path(os.environ['GRADIO_TEMP_DIR']) / 'downloads'))


def predict_records(*files: Path, model: str = MODEL, top_k: int = 5) -> dict[str, list[dict]]:
    """`smallvit predict MODEL FILES --json`: file name -> its predictions."""
    out = Path(tempfile.mkdtemp(prefix='smallvit-predict-')) / 'predictions.jsonl'
    assert main(['predict', model, *map(str, files), '--json', str(out), '--top-k', str(top_k)]) == 0
    return {Path(r['file']).name: r['predictions'] for r in map(json.loads, out.read_text().splitlines())}


def assert_same_as_predict(label: dict, expected: list[dict]) -> None:
    got = [(c['label'], c['confidence']) for c in label['confidences']]
    assert [name for name, _ in got] == [p['label'] for p in expected]
    for (_, confidence), p in zip(got, expected, strict=True):
        assert confidence == pytest.approx(p['probability'], abs=1e-5)
    assert label['label'] == expected[0]['label']


def test_the_endpoint_gives_what_smallvit_predict_prints(client):
    expected = predict_records(*EXAMPLES)
    assert len(expected) == len(EXAMPLES) >= 20
    for path in EXAMPLES:
        label, last, rollout = client.predict(handle_file(path), api_name='/predict')  # the documented call
        assert_same_as_predict(label, expected[path.name])
        for picture in (last, rollout):
            with Image.open(picture) as img:
                assert img.format == 'PNG' and img.size == (280, 280)  # 28 px, drawn 10x, one cell a patch
    # the other parameters, by name
    label, last, rollout = client.predict(handle_file(EXAMPLES[0]), top_k=3, attention=False, api_name='/predict')
    assert_same_as_predict(label, predict_records(EXAMPLES[0], top_k=3)[EXAMPLES[0].name])
    assert last is None and rollout is None


def test_the_maps_are_timms_attention_drawn_over_the_image():
    model = load_model(MODEL)
    entry = AppModel.load(MODEL)
    img = Image.open(EXAMPLES[0]).convert('L')
    x = entry.transform(img)[None]
    last, rollout = attention_maps(model, x)  # the attention module's own maps, on predict's model
    _, shown_last, shown_rollout = entry.classify(img, opacity=1.0)
    for shown, attn in ((shown_last, last[0]), (shown_rollout, rollout[0])):
        a = (attn - attn.min()) / (attn.max() - attn.min())
        from matplotlib import colormaps

        cells = np.asarray(shown)[5::10, 5::10] / 255  # the middle of each 10x10 cell
        patch = colormaps['inferno'](a.repeat_interleave(4, 0).repeat_interleave(4, 1).numpy())[..., :3]
        np.testing.assert_allclose(cells, patch, atol=1 / 255)
    _, clear, _ = entry.classify(img, opacity=0.0)
    assert np.array_equal(np.asarray(clear), np.asarray(img.convert('RGB').resize((280, 280), Image.NEAREST)))
    half = attention_overlay(img, last[0], 0.5, (280, 280))
    assert np.allclose(
        np.asarray(half) / 255, (np.asarray(clear) / 255 + np.asarray(shown_last) / 255) / 2, atol=1.5 / 255
    )


def full_frame_test_image(fmnist_src: Path, folder: Path) -> Path:
    """The first Fashion-MNIST test image whose object touches all four sides (cropping a drawing of it to its strokes
    keeps it whole), as a PNG file."""
    images = np.frombuffer(gzip.decompress((fmnist_src / 't10k-images-idx3-ubyte.gz').read_bytes())[16:], np.uint8)
    for a in images.reshape(-1, 28, 28):
        if a[0].any() and a[-1].any() and a[:, 0].any() and a[:, -1].any():
            Image.fromarray(a).save(folder / 'full_frame.png')
            return folder / 'full_frame.png'
    raise AssertionError('no test image fills its frame')


def test_a_drawing_is_read_from_the_layers_alpha(client, fmnist_src, tmp_path):
    source = full_frame_test_image(fmnist_src, tmp_path)
    pixels = np.asarray(Image.open(source))
    # a black brush on a dark canvas: the object is in the layer's alpha only, drawn 10x at an offset on the canvas
    alpha = np.zeros((400, 400), np.uint8)
    alpha[60:340, 50:330] = np.kron(pixels, np.ones((10, 10), np.uint8))
    layer = np.zeros((400, 400, 4), np.uint8)
    layer[..., 3] = alpha
    Image.fromarray(layer, 'RGBA').save(tmp_path / 'layer.png')
    Image.new('RGB', (400, 400), (20, 20, 20)).save(tmp_path / 'composite.png')  # what the composite shows: nothing
    drawing = {
        'background': None,
        'layers': [handle_file(tmp_path / 'layer.png')],
        'composite': handle_file(tmp_path / 'composite.png'),
        'id': None,
    }
    label, last, _ = client.predict(drawing, api_name='/predict_drawing')
    assert_same_as_predict(label, predict_records(source)[source.name])
    assert last is not None

    Image.new('RGBA', (400, 400), (0, 0, 0, 0)).save(tmp_path / 'empty.png')
    empty = {**drawing, 'layers': [handle_file(tmp_path / 'empty.png')]}  # a layer with no stroke
    with pytest.raises(AppError, match='The sketchpad is empty: draw an object on it first'):
        client.predict(empty, api_name='/predict_drawing')


def write_case(kind: str, folder: Path) -> tuple[Path, Path | None]:
    """A file of the given kind, and the file whose `smallvit predict` output it must give (None: refused)."""
    source = EXAMPLES[0]
    gray = Image.open(source)
    path = folder / f'{kind}.png'
    if kind == 'not an image':
        path = folder / 'notes.png'
        path.write_text('not an image, whatever its name says')
        return path, None
    if kind == '16-bit':
        # as training reads it: scaled to 8 bits; its 8-bit twin is the example itself
        Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(path)
        assert Image.open(path).mode == 'I;16'
        return path, source
    if kind == 'rgba':
        gray.convert('RGBA').save(path)
        return path, path
    if kind == 'palette':
        gray.convert('RGB').convert('P', palette=Image.Palette.ADAPTIVE).save(path)
        return path, path
    if kind == 'cmyk jpeg':
        path = folder / 'cmyk.jpg'
        gray.convert('CMYK').save(path, quality=95)
        assert Image.open(path).mode == 'CMYK'
        return path, path
    if kind == '1x1':
        Image.new('L', (1, 1), 200).save(path)
        return path, None
    if kind == 'bomb':
        # 100 megapixels in a 100 KB file: over Pillow's (and the app's) 89.5-megapixel bound
        Image.new('L', (10_000, 10_000)).save(path, optimize=True)
        assert path.stat().st_size < 1 << 20
        return path, None
    raise AssertionError(kind)


MESSAGES = {
    'not an image': r'notes\.png: cannot read it as an image \(not an image\)\. The app reads PNG, JPEG',
    '1x1': r'1x1\.png: 1×1 pixels is too small to classify',
    'bomb': r'bomb\.png: 10000×10000 pixels is over the 89,478,485-pixel limit',
}


@pytest.mark.parametrize('kind', ['not an image', '16-bit', 'rgba', 'palette', 'cmyk jpeg', '1x1', 'bomb'])
def test_bad_input_is_a_message_and_the_app_keeps_serving(kind, client, tmp_path):
    path, oracle = write_case(kind, tmp_path)
    if oracle is None:
        with pytest.raises(AppError, match=MESSAGES[kind]) as info:
            client.predict(handle_file(path), api_name='/predict')
        assert 'Traceback' not in str(info.value) and '\n' not in str(info.value)
    else:
        label, _, _ = client.predict(handle_file(path), api_name='/predict')
        assert_same_as_predict(label, predict_records(oracle)[oracle.name])
    label, _, _ = client.predict(handle_file(EXAMPLES[1]), attention=False, api_name='/predict')  # still serving
    assert label['label'] == predict_records(EXAMPLES[1])[EXAMPLES[1].name][0]['label']


def test_an_upload_over_the_limit_is_refused_and_the_app_keeps_serving(client, tmp_path):
    big = tmp_path / 'big.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), np.uint8)).save(big)
    assert big.stat().st_size > 10 << 20  # over MAX_FILE_SIZE
    with pytest.raises(Exception, match=r'(?i)(maximum|max|too large|exceeds)'):
        client.predict(handle_file(big), api_name='/predict')
    label, _, _ = client.predict(handle_file(EXAMPLES[2]), attention=False, api_name='/predict')
    assert label['label'] == predict_records(EXAMPLES[2])[EXAMPLES[2].name][0]['label']


def rss_bytes() -> int:
    """The process's resident memory, after a garbage collection and, on glibc, malloc_trim: what it holds, not what
    the allocator kept of what was freed."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    fields = dict(line.split(':', 1) for line in Path('/proc/self/status').read_text().splitlines())
    return int(fields['VmRSS'].split()[0]) * 1024


# 4 threads, each its own gradio_client, in a process of their own: the RSS measured is the app's alone
SOAK = """
import json, sys, threading
from gradio_client import Client, handle_file
url, count, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
answers, errors = [], []
def worker(i):
    try:
        client = Client(url, verbose=False)
        for j in range(i, count, 4):
            label, _, _ = client.predict(handle_file(files[j % len(files)]), api_name='/predict')
            answers.append([files[j % len(files)], label['label']])
    except BaseException as e:
        errors.append(repr(e))
threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({'answers': answers, 'errors': errors}))
"""


def soak(url: str, count: int) -> list[tuple[str, str]]:
    env = {**os.environ, 'HF_HUB_DISABLE_TELEMETRY': '1', 'HF_HUB_OFFLINE': '1'}  # the clients' own calls home
    run = subprocess.run(
        [sys.executable, '-c', SOAK, url, str(count), *map(str, EXAMPLES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result['errors'] == []
    return [(Path(f).name, label) for f, label in result['answers']]


def test_100_requests_from_4_threads_are_all_answered_right_and_memory_stays_flat(served):
    expected = {name: preds[0]['label'] for name, preds in predict_records(*EXAMPLES).items()}
    soak(served[1], 40)  # warm-up: Gradio's and torch's first-use allocations
    before = rss_bytes()
    answers = soak(served[1], 100)
    growth = rss_bytes() - before
    assert len(answers) == 100
    assert all(label == expected[name] for name, label in answers)
    print(f'RSS before {before / 2**20:.0f} MiB, growth over 100 requests {growth / 2**20:+.1f} MiB')
    # measured: +4 to +22 MiB over these 100 (the allocator's arenas of Gradio's worker threads filling), then flat;
    # keeping each request's two 280x280 maps would add 47 MiB
    assert growth < 32 * 2**20, f'RSS grew by {growth / 2**20:.0f} MiB over 100 requests'


def get(url: str, host: str | None = None) -> int:
    request = urllib.request.Request(url, headers={'Host': host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def call(url: str, api: str, data: list) -> str:
    """Gradio's plain HTTP API (POST, then the event's stream): what any client can send, without gradio_client."""
    request = urllib.request.Request(
        f'{url}gradio_api/call/{api}', json.dumps({'data': data}).encode(), {'Content-Type': 'application/json'}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        event = json.load(response)['event_id']
    with urllib.request.urlopen(f'{url}gradio_api/call/{api}/{event}', timeout=60) as response:
        return response.read().decode()


def test_a_request_naming_a_file_it_did_not_upload_is_refused(served, tmp_path):
    secret = tmp_path / 'secret.png'
    Image.open(EXAMPLES[0]).save(secret)  # a real image, readable by the app, but never uploaded
    named = {'path': str(secret), 'meta': {'_type': 'gradio.FileData'}}
    settings = [MODEL, 5, False, 0.5]
    for api, value in (('predict', named), ('predict_drawing', {'background': None, 'layers': [named]})):
        stream = call(served[1], api, [value, *settings])
        assert 'event: error' in stream and 'event: complete' not in stream, stream
    uploaded = {'path': client_upload(served[1], EXAMPLES[0]), 'meta': {'_type': 'gradio.FileData'}}
    assert 'event: complete' in call(served[1], 'predict', [uploaded, *settings])  # the same call, uploaded first


def client_upload(url: str, path: Path) -> str:
    """The file uploaded through Gradio's /upload route: its path on the server."""
    boundary = 'smallvit-test-boundary'
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n'
            'Content-Type: image/png\r\n\r\n'
        ).encode()
        + path.read_bytes()
        + f'\r\n--{boundary}--\r\n'.encode()
    )
    request = urllib.request.Request(
        f'{url}gradio_api/upload', body, {'Content-Type': f'multipart/form-data; boundary={boundary}'}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)[0]


def test_nothing_is_served_but_the_apps_own_files(served, tmp_path):
    demo, url = served
    secret = tmp_path / 'secret.txt'
    secret.write_text('not for the web')
    assert get(url) == 200
    for path in ('/etc/passwd', str(secret), str(Path.cwd() / 'README.md'), str(app_module.EXAMPLES_DIR / 'README.md')):
        assert get(f'{url}gradio_api/file={path}') == 403, path
    # a web page that rebinds its own name to 127.0.0.1 (DNS rebinding) is not answered
    assert get(url, host='evil.example') == 400
    assert demo.share is False and demo.analytics_enabled is False and demo.ssr_mode is False
    assert demo.max_file_size == 10 * 1024 * 1024 and demo.allowed_paths == []
    assert re.match(r'http://127\.0\.0\.1:\d+/', url)


def tiny_onnx(folder: Path) -> Path:
    """A small ONNX classifier with smallvit's metadata (one linear layer on random weights): the ONNX path without
    the minute the exporter takes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from timm_smallvit.data import FASHION_MNIST_CLASSES

    weights = np.random.default_rng(0).normal(0, 0.05, (784, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node('Flatten', ['pixel_values'], ['flat']),
            helper.make_node('MatMul', ['flat', 'w'], ['logits']),
        ],
        'tiny',
        [helper.make_tensor_value_info('pixel_values', TensorProto.FLOAT, ['batch', 1, 28, 28])],
        [helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', 10])],
        [numpy_helper.from_array(weights, 'w')],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    meta = {
        'architecture': 'tiny_linear',
        'label_names': list(FASHION_MNIST_CLASSES),
        'input_size': [1, 28, 28],
        'interpolation': 'bilinear',
        'mean': [0.5],
        'std': [0.5],
        'crop_pct': 1.0,
        'crop_mode': 'center',
    }
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(model, folder / 'tiny.onnx')
    return folder / 'tiny.onnx'


def test_an_onnx_file_gives_smallvit_predicts_labels_and_no_maps(tmp_path):
    pytest.importorskip('onnxruntime')
    path = tiny_onnx(tmp_path)
    entry = AppModel.load(str(path))
    for example in EXAMPLES[:3]:
        confidences, last, rollout = entry.classify(Image.open(example).convert('L'))
        label = {'label': max(confidences, key=confidences.get)}
        label['confidences'] = [{'label': k, 'confidence': v} for k, v in confidences.items()]
        assert_same_as_predict(label, predict_records(example, model=str(path))[example.name])
        assert last is None and rollout is None
    assert 'ONNX: labels only, no attention' in entry.facts


def test_the_card_facts_are_the_models():
    facts = AppModel.load(MODEL).facts.replace('\\', '')  # Markdown escapes aside
    model = load_model(MODEL)
    card = (Path(model.pretrained_cfg['file']).parent / 'README.md').read_text()
    top1 = re.search(r'type: accuracy\n\s+value: ([\d.]+)', card).group(1)
    assert f'{sum(p.numel() for p in model.parameters()):,} parameters' in facts
    assert 'input 1×28×28' in facts and '10 classes' in facts
    assert f'test top-1 {float(top1):.2f}% (Fashion-MNIST, from its model card)' in facts


def test_an_unknown_model_or_a_busy_port_is_one_line_before_anything_listens(network, capsys):
    port = free_port()
    assert main(['app', 'resnet50.a1_in1k', '--port', str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smallvit app: error: model 'resnet50.a1_in1k': not a smallvit name")
    check_port('127.0.0.1', port)  # nothing listens there
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert main(['app', MODEL, '--port', str(taken)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'--host 127.0.0.1 --port {taken}: cannot listen there' in err[0]


def test_the_example_gallery_is_the_release_bytes(fmnist_src, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        'app_examples', app_module.EXAMPLES_DIR.parents[1] / 'scripts' / 'app_examples.py'
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.write_examples(fmnist_src, tmp_path)
    assert [p.name for p in written] == [p.name for p in EXAMPLES]
    for new, shipped in zip(written, EXAMPLES, strict=True):
        assert np.array_equal(np.asarray(Image.open(new)), np.asarray(Image.open(shipped)))
    assert (tmp_path / 'README.md').read_text() == (app_module.EXAMPLES_DIR / 'README.md').read_text()
    assert 'MIT' in (app_module.EXAMPLES_DIR / 'README.md').read_text()
