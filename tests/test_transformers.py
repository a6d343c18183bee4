"""Hugging Face transformers on exported folders: AutoModelForImageClassification and pipeline('image-classification').

transformers loads timm models through its TimmWrapper classes (config.json's architecture, model.safetensors, the
pretrained_cfg's preprocessing); `import timm_smallvit` registers the architecture first. Checked on the shipped
pretrained folders (each an export) and on the loopback Hub (tests/hub_server.py).
"""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.utils import AttentionExtract
from torchvision.models.feature_extraction import create_feature_extractor

from tests.hub_server import HubServer, use_hub
from timm_smallvit import smallvit
from timm_smallvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from timm_smallvit.hub import push_to_hub
from timm_smallvit.predict import load_model, predict

transformers = pytest.importorskip('transformers')

SHIPPED = sorted(smallvit.PRETRAINED)
TOKEN = 'hf_alice_0123456789abcdefghijklmnopqrstuv'  # valid on the test server only


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        yield


def _check_auto_model(source: str, name: str) -> None:
    model = transformers.AutoModelForImageClassification.from_pretrained(source).eval()
    reference = timm.create_model(name, pretrained=True).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(model(pixel_values=x).logits, reference(x), rtol=1e-5, atol=1e-5)
    assert [model.config.id2label[i] for i in range(10)] == list(FASHION_MNIST_CLASSES)


@pytest.mark.parametrize('name', SHIPPED)
def test_auto_model_loads_the_shipped_export_folders(name):
    _check_auto_model(str(smallvit.PRETRAINED_DIR / name), name)


def test_auto_model_and_pipeline_load_from_the_hub(fmnist_src, tmp_path, monkeypatch):
    name = 'smallvit_nano_patch4_28.fmnist'
    folder = tmp_path / 'export'
    shutil.copytree(smallvit.PRETRAINED_DIR / name, folder)
    with HubServer(tokens={TOKEN: 'alice'}) as hub:
        use_hub(monkeypatch, hub, tmp_path, token=TOKEN)
        push_to_hub(folder, f'alice/{name}', allow_edited_card=True)  # the release's card, as shipped
        _check_auto_model(f'alice/{name}', name)
        classify = transformers.pipeline('image-classification', model=f'alice/{name}')
        assert classify.model.config.id2label[0] == FASHION_MNIST_CLASSES[0]
        paths = _user_images(fmnist_src, tmp_path, 2)  # one 'L' file, one tinted RGB file
        expected = predict(load_model(name), paths, top_k=1)
        for path, record in zip(paths, expected, strict=True):
            with Image.open(path) as img:
                assert classify(img, top_k=1)[0]['label'] == record['predictions'][0]['label']


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    # PIL's convert('L') weights: what smallvit predict applies to an RGB file for a grayscale model
    return (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)


def test_gray_from_rgb_gives_a_grayscale_model_the_luma_of_rgb_images():
    model = timm.create_model('smallvit_nano_patch4_28', gray_from_rgb=True).eval()
    rgb = torch.rand(2, 3, 28, 28)
    luma = _luma(rgb)
    with torch.inference_mode():
        torch.testing.assert_close(model(rgb), model(luma))
    plain = timm.create_model('smallvit_nano_patch4_28').eval()
    plain.load_state_dict(model.state_dict())  # the option adds no weights
    with torch.inference_mode():
        assert torch.equal(plain(luma), model(luma))
    with pytest.raises(ValueError, match='in_chans is 3'):
        timm.create_model('smallvit_nano_patch4_28', in_chans=3, gray_from_rgb=True)


def test_gray_from_rgb_models_trace_for_feature_and_attention_extraction_and_script():
    # exports of grayscale models carry the option: predict's attention pictures trace them with fx, and users
    # script them as they script any timm model
    model = timm.create_model('smallvit_nano_patch4_28', gray_from_rgb=True).eval()
    plain = timm.create_model('smallvit_nano_patch4_28').eval()
    plain.load_state_dict(model.state_dict())
    rgb = torch.rand(2, 3, 28, 28)
    luma = _luma(rgb)
    with torch.inference_mode():
        features = create_feature_extractor(model, ['blocks.0'])(rgb)['blocks.0']
        torch.testing.assert_close(features, create_feature_extractor(plain, ['blocks.0'])(luma)['blocks.0'])
        with smallvit.explicit_attention(model), smallvit.explicit_attention(plain):
            maps = AttentionExtract(model, method='fx')(rgb)
            torch.testing.assert_close(maps, AttentionExtract(plain, method='fx')(luma))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # torch.jit.script is deprecated, still what timm tests
            torch.testing.assert_close(torch.jit.script(model)(rgb), plain(luma))


def _user_images(fmnist_src: Path, folder: Path, n: int) -> list[Path]:
    images, _ = load_fashion_mnist(fmnist_src, train=False)
    paths = []
    for i in range(n):
        img = Image.fromarray(images[i].numpy(), mode='L')
        if i % 2:  # an RGB file, tinted: the luma conversion matters
            r, g, b = img.convert('RGB').split()
            img = Image.merge('RGB', (r, g.point(lambda v: v * 3 // 4), b))
        path = folder / f'{i:02d}.png'
        img.save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize('name', SHIPPED)
def test_pipeline_classifies_users_images_as_smallvit_predict(name, fmnist_src, tmp_path):
    paths = _user_images(fmnist_src, tmp_path, 8)
    expected = predict(load_model(name), paths, top_k=1)
    classify = transformers.pipeline('image-classification', model=str(smallvit.PRETRAINED_DIR / name))
    for path, record in zip(paths, expected, strict=True):
        with Image.open(path) as img:
            top = classify(img, top_k=1)[0]
        assert top['label'] == record['predictions'][0]['label']
        assert np.isclose(top['score'], record['predictions'][0]['probability'], atol=5e-3)
