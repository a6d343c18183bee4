"""`smallvit predict`: the numbers of model(transform(img)), attention maps from timm's AttentionExtract, pictures."""

import json
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torchvision.datasets import FashionMNIST

from timm_smallvit import export_checkpoint, smallvit
from timm_smallvit.attention import attention_maps, attention_rollout
from timm_smallvit.cli import main
from timm_smallvit.data import FASHION_MNIST_CLASSES, prepare_fashion_mnist
from timm_smallvit.predict import find_images, load_model

from .test_model_oracles import _randomize_
from .test_nothing_lost import _run
from .test_timm_parity import NO_DROPOUT, _attention_by_hand

PRETRAINED = 'smallvit_tiny_convstem_28.fmnist'


@pytest.fixture(scope='module')
def test_pngs(fmnist_src, tmp_path_factory):
    """The first 100 Fashion-MNIST test images as PNG files, and their labels."""
    folder = tmp_path_factory.mktemp('pngs')
    test = FashionMNIST(prepare_fashion_mnist(fmnist_src), train=False)
    for i in range(100):
        img, _ = test[i]
        img.save(folder / f'{i:03d}.png')
    return folder, test.targets[:100].tolist()


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(['predict', *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_gives_the_labels_of_model_transform_img(test_pngs, tmp_path, capsys):
    folder, targets = test_pngs
    out = tmp_path / 'predictions.jsonl'
    code, stdout, _ = _cli(capsys, PRETRAINED, str(folder), '--json', str(out), '--top-k', '3')
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r['file']).name for r in records] == [f'{i:03d}.png' for i in range(100)]

    model = timm.create_model(PRETRAINED, pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model))
    with torch.no_grad():
        probs = torch.cat([model(transform(Image.open(r['file']))[None]).softmax(-1) for r in records])
    top1 = probs.argmax(-1).tolist()
    assert [r['predictions'][0]['index'] for r in records] == top1
    for record, p in zip(records, probs, strict=True):
        assert len(record['predictions']) == 3
        assert record['predictions'][0]['label'] == FASHION_MNIST_CLASSES[record['predictions'][0]['index']]
        assert record['predictions'][0]['probability'] == pytest.approx(p.max().item(), abs=1e-5)
    accuracy = 100 * sum(t == p for t, p in zip(targets, top1, strict=True)) / 100
    assert accuracy >= smallvit.PRETRAINED[PRETRAINED]['top1'] - 5, accuracy
    assert f'{records[0]["file"]}: {records[0]["predictions"][0]["label"]} ' in stdout


def test_attention_rollout_matches_a_hand_computation_on_the_two_block_model():
    model = _randomize_(timm.create_model('smallvit', **NO_DROPOUT)).eval()
    vit = smallvit.to_vision_transformer(model).eval()
    x = torch.randn(2, 1, 96, 96)
    a1, a2 = _attention_by_hand(vit, x)  # timm's own modules, step by step
    eye = torch.eye(37)
    by_hand = (0.5 * a2.mean(1) + 0.5 * eye) @ (0.5 * a1.mean(1) + 0.5 * eye)
    torch.testing.assert_close(attention_rollout([a1, a2]), by_hand)
    torch.testing.assert_close(by_hand.sum(-1), torch.ones(2, 37))
    last, rollout = attention_maps(model, x)
    assert last.shape == rollout.shape == (2, 6, 6)  # the 96 px image's 6 x 6 patch grid
    torch.testing.assert_close(last, a2.mean(1)[:, 0, 1:].reshape(2, 6, 6), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rollout, by_hand[:, 0, 1:].reshape(2, 6, 6), atol=1e-5, rtol=1e-4)


def test_mean_pooled_models_show_the_mean_over_tokens():
    model = _randomize_(timm.create_model('smallvit_nano_patch4_28', global_pool='avg', class_token=False)).eval()
    x = torch.randn(2, 1, 28, 28)
    last, rollout = attention_maps(model, x)
    assert last.shape == rollout.shape == (2, 7, 7)
    torch.testing.assert_close(last.sum(dim=(1, 2)), torch.ones(2))  # a mean of rows that each sum to 1


@pytest.mark.parametrize('model_name', [PRETRAINED, 'smallvit_nano_patch4_28.fmnist'])
def test_attention_pictures_decode_at_the_expected_size(model_name, test_pngs, tmp_path, capsys):
    folder, _ = test_pngs
    files = [str(folder / f'{i:03d}.png') for i in range(3)]
    code, _, _ = _cli(capsys, model_name, *files, '--attention', str(tmp_path / 'att'))
    assert code == 0
    pictures = sorted((tmp_path / 'att').iterdir())
    assert [p.name for p in pictures] == ['000.png', '001.png', '002.png']
    for picture in pictures:
        with Image.open(picture) as img:
            assert img.format == 'PNG' and img.size == (900, 340)


def test_unreadable_files_are_named_and_the_others_still_predicted(test_pngs, tmp_path, capsys):
    folder, _ = test_pngs
    (tmp_path / 'notes.txt').write_text('not an image')
    (tmp_path / 'broken.png').write_bytes((folder / '000.png').read_bytes()[:40])
    out = tmp_path / 'p.jsonl'
    args = [str(folder / '001.png'), str(tmp_path / 'notes.txt'), str(tmp_path / 'broken.png')]
    code, stdout, stderr = _cli(capsys, PRETRAINED, *args, '--json', str(out))
    assert code == 1
    assert stdout.count('.png: ') == 1 and '001.png' in stdout
    assert f'{tmp_path / "notes.txt"}: not an image Pillow can read' in stderr
    assert str(tmp_path / 'broken.png') in stderr and '2 of 3 files could not be read' in stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert ['error' in r for r in records] == [False, True, True]


@pytest.mark.parametrize(
    'kind, message',
    [('empty', 'no image files in this folder'), ('model', 'not a smallvit name'), ('missing', 'no such file')],
)
def test_bad_input_is_one_line_and_writes_nothing(kind, message, test_pngs, tmp_path, capsys):
    folder, _ = test_pngs
    (tmp_path / 'empty').mkdir()
    model, images = PRETRAINED, [str(folder / '000.png')]
    if kind == 'empty':
        images = [str(tmp_path / 'empty')]
    elif kind == 'model':
        model = 'resnet50.a1_in1k'
    else:
        images = [str(tmp_path / 'nowhere.png')]
    out, att = tmp_path / 'p.jsonl', tmp_path / 'att'
    code, _, stderr = _cli(capsys, model, *images, '--json', str(out), '--attention', str(att))
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith('smallvit predict: error: ') and message in lines[0]
    assert not out.exists() and not att.exists()


def test_rgb_images_are_converted_for_a_grayscale_model_with_one_message(test_pngs, tmp_path, capsys, caplog):
    folder, _ = test_pngs
    for i in range(2):
        Image.open(folder / f'00{i}.png').convert('RGB').save(tmp_path / f'rgb{i}.jpg')
    code, stdout, _ = _cli(capsys, PRETRAINED, str(tmp_path / 'rgb0.jpg'), str(tmp_path / 'rgb1.jpg'))
    assert code == 0 and stdout.count(': ') == 2
    messages = [r.getMessage() for r in caplog.records if 'converted' in r.getMessage()]
    assert messages == ['RGB images are converted to L: the model takes 1 channel (grayscale).']


def test_a_training_checkpoint_predicts_with_its_dataset_labels(tmp_path, fmnist_src, test_pngs):
    run_dir = _run(tmp_path, fmnist_src, 'ckpt', model_ema=True, model_ema_decay=0.9)['output_dir']
    model = load_model(str(run_dir / 'last.pth.tar'))
    assert tuple(model.pretrained_cfg['label_names']) == FASHION_MNIST_CLASSES
    assert model.pretrained_cfg['input_size'] == (1, 28, 28) and model.pretrained_cfg['mean'] == (0.5,)
    assert find_images([str(test_pngs[0] / '00[0-4].png')]) == [test_pngs[0] / f'00{i}.png' for i in range(5)]


def test_export_adds_a_prediction_grid_to_the_card(tmp_path, fmnist_src):
    run_dir = _run(tmp_path, fmnist_src, 'grid')['output_dir']
    out = export_checkpoint(run_dir / 'last.pth.tar', tmp_path / 'export')
    with Image.open(out / 'predictions.png') as img:
        assert img.format == 'PNG' and img.size[0] >= 800
    card = ModelCard.load(out / 'README.md')
    assert '![Test images with their predicted labels' in card.text and '(predictions.png)' in card.text
    assert 'The first 12 images of the test split' in card.text
