"""The quick trainer on real Fashion-MNIST: learning, resume, NaN stop, recipe keys, train.py's format."""

import argparse
import copy
import csv
import importlib.util
import logging
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file
from timm.data.random_erasing import RandomErasing
from torch.utils.flop_counter import FlopCounterMode
from torchvision.datasets import FashionMNIST

import timm_smallvit
from timm_smallvit import amp as amp_module
from timm_smallvit import budget as budget_module
from timm_smallvit import recipe as recipe_module
from timm_smallvit import trainer as trainer_module
from timm_smallvit.augment import BatchAugment
from timm_smallvit.data import load_fashion_mnist, prepare_fashion_mnist
from timm_smallvit.flops import CPU_SDPA_FLOPS
from timm_smallvit.loader import BatchLoader
from timm_smallvit.recipe import QUICK_TRAINER_KEYS, TRAIN_PY_DEFAULTS, load_recipe, resolve_args
from timm_smallvit.trainer import NonFiniteLossError, train

# Small enough for a few seconds an epoch on 2 CPU cores, real enough to learn.
QUICK = dict(
    model='smallvit_tiny_convstem_28',
    dataset='torch/fashion_mnist',
    input_img_mode='L',
    opt='adamw',
    lr=3e-3,
    weight_decay=0.05,
    sched='cosine',
    warmup_epochs=0,
    batch_size=64,
    train_num_samples=1536,
    val_num_samples=512,
    smoothing=0.0,
    scale=[0.7, 1.0],
    color_jitter=0.0,
    checkpoint_hist=3,
)


def _run(tmp_path: Path, fmnist_src: Path, name: str, **overrides):
    recipe = dict(QUICK, data_dir=str(fmnist_src), output=str(tmp_path), experiment=name)
    recipe.update(overrides)
    return train(resolve_args(recipe))


def _summary(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / 'summary.csv').open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _load_checkpoint(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def test_loss_falls_on_real_data_and_outputs_match_train_py(tmp_path, fmnist_src):
    result = _run(tmp_path, fmnist_src, 'learn', epochs=3, model_ema=True, model_ema_decay=0.9)
    run_dir = result['output_dir']
    rows = _summary(run_dir)
    assert [r['epoch'] for r in rows] == [0, 1, 2]
    # train.py's columns, and the run's training compute so far (issue 36: compute, not time, is the budget's axis)
    assert list(rows[0]) == ['epoch', 'train_loss', 'train_tflop', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
    assert rows[-1]['train_loss'] < 0.75 * rows[0]['train_loss']
    assert rows[-1]['eval_top1'] > 55.0  # chance is 10
    assert result['eval_metrics']['top1'] == rows[-1]['eval_top1']

    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted(
        ['args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar']
        + [f'checkpoint-{i}.pth.tar' for i in range(3)]
    )
    checkpoint = _load_checkpoint(run_dir / 'last.pth.tar')
    expected_keys = {'epoch', 'arch', 'state_dict', 'state_dict_ema', 'optimizer', 'args', 'metric', 'version'}
    assert expected_keys <= set(checkpoint)
    assert checkpoint['arch'] == 'smallvit_tiny_convstem_28' and checkpoint['epoch'] == 2
    assert isinstance(checkpoint['args'], argparse.Namespace) and checkpoint['args'].lr == 3e-3
    assert yaml.safe_load((run_dir / 'args.yaml').read_text())['model'] == 'smallvit_tiny_convstem_28'

    # the checkpoint's EMA weights are the model that was evaluated last, and timm's own loader reads them
    model = timm.create_model('smallvit_tiny_convstem_28')
    timm.models.load_checkpoint(model, str(run_dir / 'last.pth.tar'), use_ema=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, result['model'].state_dict()[k])


def test_resume_repeats_the_uninterrupted_run(tmp_path, fmnist_src):
    full = _run(tmp_path, fmnist_src, 'full', epochs=2)
    first_epoch = full['output_dir'] / 'checkpoint-0.pth.tar'
    resumed = _run(tmp_path, fmnist_src, 'resumed', epochs=2, resume=str(first_epoch))
    rows_full, rows_resumed = _summary(full['output_dir']), _summary(resumed['output_dir'])
    assert [r['epoch'] for r in rows_resumed] == [1]
    assert rows_resumed[0]['eval_top1'] == rows_full[1]['eval_top1']
    full_state = full['model'].state_dict()
    for k, v in resumed['model'].state_dict().items():
        torch.testing.assert_close(v, full_state[k], rtol=1e-5, atol=1e-6)


class _Stop(Exception):
    pass


def _batched_images(tmp_path: Path, fmnist_src: Path, monkeypatch, **overrides):
    """What a run would batch for training and for evaluation (nothing is trained), and the splits it decoded."""
    made, read = [], []
    real_load = trainer_module.SmallImageDataset.load

    def load(self, which, **kwargs):
        read.append(which)
        return real_load(self, which, **kwargs)

    def loader(images, labels, *args, **kwargs):
        made.append((images, labels))
        if len(made) == 2:
            raise _Stop
        return BatchLoader(images, labels, *args, **kwargs)

    monkeypatch.setattr(trainer_module.SmallImageDataset, 'load', load)
    monkeypatch.setattr(trainer_module, 'BatchLoader', loader)
    with pytest.raises(_Stop):
        _run(tmp_path, fmnist_src, f'holdout-{len(list(tmp_path.iterdir()))}', **overrides)
    return made, read


def test_val_holdout_evaluates_on_training_images_never_trained_on_and_never_reads_the_test_split(
    tmp_path, fmnist_src, monkeypatch
):
    release = FashionMNIST(prepare_fashion_mnist(fmnist_src), train=True)  # the oracle: torchvision's reader
    labels_of: dict[bytes, set[int]] = {}
    for image, label in zip(release.data, release.targets.tolist(), strict=True):
        labels_of.setdefault(image.numpy().tobytes(), set()).add(label)

    def keys(images: torch.Tensor) -> Counter:
        return Counter(image.numpy().tobytes() for image in images.reshape(len(images), -1))

    made, read = _batched_images(
        tmp_path, fmnist_src, monkeypatch, val_holdout=5000, train_num_samples=None, val_num_samples=None
    )
    (train_x, train_y), (eval_x, eval_y) = made
    assert read == ['train']  # the test split is not even decoded
    assert (len(train_x), len(eval_x)) == (55_000, 5000)
    # together they are the release's training images, each once: the held-out ones are not trained on
    assert keys(train_x) + keys(eval_x) == keys(release.data)
    for images, labels in ((train_x, train_y), (eval_x, eval_y)):  # each image keeps its own label
        flat = images.reshape(len(images), -1)
        assert all(int(y) in labels_of[x.numpy().tobytes()] for x, y in zip(flat, labels, strict=True))
    assert min(Counter(eval_y.tolist()).values()) > 400  # a random draw: every class its share of the 5,000

    # the same held-out images for another seed; train_num_samples counts the rest
    made, _ = _batched_images(
        tmp_path, fmnist_src, monkeypatch, val_holdout=5000, seed=7, train_num_samples=1024, val_num_samples=None
    )
    assert torch.equal(made[1][0], eval_x) and torch.equal(made[0][0], train_x[:1024])


def test_val_holdout_that_leaves_nothing_to_train_on_is_a_one_line_error(tmp_path, fmnist_src):
    with pytest.raises(ValueError, match=r'val_holdout 60000: .* 60,000 training images, so nothing would be left'):
        _run(tmp_path, fmnist_src, 'all-held-out', val_holdout=60000)
    with pytest.raises(ValueError, match=r'val_holdout -1: expected a whole number of at least 0'):
        _run(tmp_path, fmnist_src, 'negative', val_holdout=-1)


def test_val_interval_evaluates_every_nth_epoch_and_the_last_and_trains_the_same(tmp_path, fmnist_src):
    every = _run(tmp_path, fmnist_src, 'every', epochs=3, model_ema=True, model_ema_decay=0.9)
    sparse = _run(tmp_path, fmnist_src, 'sparse', epochs=3, model_ema=True, model_ema_decay=0.9, val_interval=2)
    run_dir = sparse['output_dir']
    # as train.py's --val-interval: epoch 1 (the 2nd) and the last; no summary row or checkpoint in between
    assert [r['epoch'] for r in _summary(run_dir)] == [1, 2]
    assert [h['epoch'] for h in sparse['history']] == [1, 2]
    assert sorted(p.name for p in run_dir.glob('checkpoint-*')) == ['checkpoint-1.pth.tar', 'checkpoint-2.pth.tar']
    # skipping an evaluation changes what is measured, not what is trained
    assert _summary(run_dir)[-1]['eval_top1'] == _summary(every['output_dir'])[-1]['eval_top1']
    for k, v in sparse['model'].state_dict().items():
        torch.testing.assert_close(v, every['model'].state_dict()[k])
    with pytest.raises(ValueError, match='val_interval 0: expected a whole number of at least 1'):
        resolve_args(dict(QUICK, data_dir=str(fmnist_src), val_interval=0))


def test_crop_off_epoch_trains_on_whole_images_from_that_epoch(tmp_path, fmnist_src):
    images, _ = load_fashion_mnist(fmnist_src, train=True)
    whole = ((images[:256].float() / 255 - 0.5) / 0.5).flatten(1)  # QUICK's mean/std are timm's 0.5 for 'L'
    seen: list[torch.Tensor] = []

    def record(module, inputs):
        # evaluation batches are never cropped; the FLOP count's forward (batch 2, on a copy) is no training step
        if isinstance(module, timm_smallvit.SmallViT) and module.training and len(inputs[0]) == 64:
            seen.append(inputs[0].detach().flatten(1).clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        _run(tmp_path, fmnist_src, 'crop_off', epochs=3, train_num_samples=256, hflip=0.0, crop_off_epoch=2)
    finally:
        handle.remove()
    assert len(seen) == 3 * 256 // 64
    # the distance from each training input to the nearest whole training image: zero only without a crop
    nearest = [
        torch.cdist(batch, whole, compute_mode='donot_use_mm_for_euclid_dist').min(dim=1).values for batch in seen
    ]
    before, after = torch.cat(nearest[:8]), torch.cat(nearest[8:])
    assert after.max() < 1e-3, 'epoch 2 (crop_off_epoch) still cropped'
    assert before.min() > 0.1, 'epochs 0-1 were not cropped'


def test_eval_hflip_scores_the_mean_of_each_image_and_its_mirror_and_only_the_ema_is_evaluated(tmp_path, fmnist_src):
    eval_forwards = []

    def count(module, inputs):
        if isinstance(module, timm_smallvit.SmallViT) and not module.training:
            eval_forwards.append(len(inputs[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        result = _run(
            tmp_path,
            fmnist_src,
            'hflip',
            epochs=3,
            val_num_samples=256,
            model_ema=True,
            model_ema_decay=0.9,
            eval_hflip=True,
        )
    finally:
        handle.remove()
    # each epoch one pass of two views over the 256 test images, by the EMA alone (the raw weights are not evaluated)
    assert sum(eval_forwards) == 3 * 2 * 256

    # oracle: the returned (EMA) model on the first 256 test images, the mirror flipping the width axis
    images, labels = load_fashion_mnist(fmnist_src, train=False)
    x, y = (images[:256, None].float() / 255 - 0.5) / 0.5, labels[:256]
    model = result['model'].eval()
    with torch.inference_mode():
        single = model(x)
        both = (single + model(x.flip(-1))) / 2
    row = _summary(result['output_dir'])[-1]
    assert row['eval_top1'] == pytest.approx(100 * (both.argmax(1) == y).float().mean().item())
    assert row['eval_top1_single'] == pytest.approx(100 * (single.argmax(1) == y).float().mean().item())
    assert row['eval_loss'] == pytest.approx(torch.nn.functional.cross_entropy(both, y).item(), rel=1e-4)
    assert row['eval_loss_single'] == pytest.approx(torch.nn.functional.cross_entropy(single, y).item(), rel=1e-4)
    assert result['history'][-1]['top1_single'] == row['eval_top1_single']

    # the export's card describes the weights alone: single-view numbers, the flip-TTA top-1 in a note
    folder = timm_smallvit.export_checkpoint(result['output_dir'] / 'last.pth.tar', tmp_path / 'export', use_ema=True)
    card = ModelCard.load(folder / 'README.md')
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {'accuracy': row['eval_top1_single'], 'top_5_accuracy': row['eval_top5_single']}
    assert f'with its mirror (eval_hflip: the mean of the two logits): top-1 {row["eval_top1"]:.2f}%' in card.text
    table_row = f'| 2 | {row["train_loss"]:.4f} | {row["eval_loss_single"]:.4f} | {row["eval_top1_single"]:.2f} |'
    assert table_row in card.text


def test_budget_minutes_fits_the_schedule_to_the_time_measured(tmp_path, fmnist_src):
    # a budget that two epochs already overrun: the run stops there, its schedule and crop_off_epoch refitted
    tiny = dict(train_num_samples=512, val_num_samples=128)
    result = _run(tmp_path, fmnist_src, 'tiny_budget', epochs=6, crop_off_epoch=3, budget_minutes=0.001, **tiny)
    assert [r['epoch'] for r in _summary(result['output_dir'])] == [0, 1]
    recorded = yaml.safe_load((result['output_dir'] / 'args.yaml').read_text())
    assert (recorded['epochs'], recorded['crop_off_epoch'], recorded['budget_minutes']) == (2, 1, 0.001)
    assert _load_checkpoint(result['output_dir'] / 'last.pth.tar')['epoch'] == 1

    args = argparse.Namespace(budget_minutes=1, distributed=False)
    assert budget_module.fit_to_budget(args, 2, elapsed_s=20.0) == 5  # 40 s left, 10.3 s an epoch
    assert budget_module.fit_to_budget(args, 2, elapsed_s=70.0) == 2


def _oracle_flops(model, in_shape, backward=True):
    # torch's FlopCounterMode on the model itself at batch 2, halved: no smallvit trim here (mean-pooled models)
    model = copy.deepcopy(model).train(backward)
    x = torch.randn(2, *in_shape)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        if backward:
            torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / 2


def test_budget_tflop_cuts_the_epochs_to_the_compute_counted(tmp_path, fmnist_src):
    tiny = dict(train_num_samples=512, val_num_samples=64, batch_size=64)  # 8 steps, 512 images an epoch
    flops = _oracle_flops(timm.create_model(QUICK['model']), (1, 28, 28))
    per_epoch = flops * 512 / 1e12
    budget = 2.5 * per_epoch  # two epochs and a half: two fit
    result = _run(tmp_path, fmnist_src, 'tflop', epochs=6, crop_off_epoch=3, budget_tflop=budget, **tiny)
    rows = _summary(result['output_dir'])
    assert [r['epoch'] for r in rows] == [0, 1] and result['args'].crop_off_epoch == 1  # round(3 * 2 / 6)
    assert [r['train_tflop'] for r in rows] == pytest.approx([per_epoch, 2 * per_epoch], rel=1e-6)
    recorded = yaml.safe_load((result['output_dir'] / 'args.yaml').read_text())
    assert recorded['epochs'] == 2 and recorded['train_tflop'] == pytest.approx(2 * per_epoch, abs=1e-3)
    assert recorded['train_gflop_per_image'] == pytest.approx(flops / 1e9, rel=1e-6)
    assert recorded['train_device'].endswith((' threads (CPU)', ' 1 thread (CPU)')) and recorded['train_wall_s'] > 0
    assert resolve_args(dict(recorded, data_dir=str(fmnist_src))).budget_tflop == budget  # args.yaml is a recipe
    # the export's card states the run's compute, epochs, device and wall time
    folder = timm_smallvit.export_checkpoint(result['output_dir'] / 'last.pth.tar', tmp_path / 'export')
    text = ModelCard.load(folder / 'README.md').text
    assert f'| training compute | {recorded["train_tflop"]:,.1f} TFLOP ({flops / 1e9:.4f} GFLOP per training' in text
    assert '| epochs | 2 |' in text and f'| compute budget | {budget:g} TFLOP |' in text
    assert f'| trained on | {recorded["train_device"]} |' in text and '| training wall time | ' in text
    # a budget exactly N epochs long trains N epochs; one that cannot pay for an epoch is refused before training
    exact = _run(tmp_path, fmnist_src, 'exact', epochs=6, budget_tflop=3 * per_epoch, **tiny)
    assert exact['args'].epochs == 3
    with pytest.raises(ValueError, match=r'budget_tflop .*one epoch of smallvit_tiny_convstem_28 costs'):
        _run(tmp_path, fmnist_src, 'none', epochs=6, budget_tflop=0.5 * per_epoch, **tiny)
    assert not (tmp_path / 'none').exists()


def test_a_teachers_forward_and_training_count_towards_the_compute(tmp_path, fmnist_src):
    tiny = dict(train_num_samples=256, val_num_samples=64, batch_size=64)
    teacher = 'smallvit_tiny_convstem_28.fmnist'  # shipped weights (no download), mean-pooled (no trimmed block)
    flops = _oracle_flops(timm.create_model(QUICK['model']), (1, 28, 28))
    flops += _oracle_flops(timm.create_model(teacher, pretrained=True), (1, 28, 28), backward=False)
    per_epoch = flops * 256 / 1e12
    kd = dict(kd_model_name=teacher, kd_teacher_tflop=per_epoch, **tiny)  # the teacher trained for one such epoch
    result = _run(tmp_path, fmnist_src, 'kd', epochs=5, budget_tflop=3.5 * per_epoch, **kd)
    rows = _summary(result['output_dir'])
    assert [r['epoch'] for r in rows] == [0, 1]  # 3.5 epochs of compute, one of them spent on the teacher
    assert [r['train_tflop'] for r in rows] == pytest.approx([2 * per_epoch, 3 * per_epoch], rel=1e-6)
    assert result['args'].train_gflop_per_image == pytest.approx(flops / 1e9, rel=1e-6)
    with pytest.raises(ValueError, match='kd_teacher_tflop to its training compute'):
        resolve_args(dict(QUICK, data_dir=str(fmnist_src), kd_model_name=teacher, budget_tflop=10))
    for bad in (-1, 'many', True, float('inf')):
        with pytest.raises(ValueError, match='budget_tflop'):
            resolve_args(dict(QUICK, data_dir=str(fmnist_src), budget_tflop=bad))


def test_budget_refits_as_the_pace_changes_until_the_last_fifth_or_crop_off(tmp_path, fmnist_src, monkeypatch):
    calls = []

    def pace(args, done, elapsed_s):  # the machine turns out faster after the second epoch
        calls.append(done)
        return 6 if done == 2 else 7

    monkeypatch.setattr(budget_module, 'fit_to_budget', pace)
    tiny = dict(train_num_samples=256, val_num_samples=64)
    result = _run(tmp_path, fmnist_src, 'refits', epochs=8, crop_off_epoch=6, budget_minutes=30, **tiny)
    # 6 epochs (crop off from round(6 * 6 / 8) = 4), then 7 (crop off from round(6 * 7 / 8) = 5), then no refit
    # once crop-off is next (after epoch 4, epoch 5 switches it off)
    assert calls == [2, 3, 4]
    assert (result['args'].epochs, result['args'].crop_off_epoch) == (7, 5)
    assert len(_summary(result['output_dir'])) == 7
    recorded = yaml.safe_load((result['output_dir'] / 'args.yaml').read_text())
    assert (recorded['epochs'], recorded['crop_off_epoch']) == (7, 5)


@pytest.mark.parametrize('per_step', [False, True], ids=['per_epoch', 'per_step'])
def test_a_schedule_refitted_by_the_budget_continues_as_if_planned_that_long(
    tmp_path, fmnist_src, monkeypatch, per_step
):
    common = dict(warmup_epochs=0, sched_on_updates=per_step, train_num_samples=512, val_num_samples=128)
    planned = _run(tmp_path, fmnist_src, 'planned', epochs=5, crop_off_epoch=3, **common)
    monkeypatch.setattr(budget_module, 'fit_to_budget', lambda args, done, elapsed_s: 5)
    fitted = _run(tmp_path, fmnist_src, 'fitted', epochs=7, crop_off_epoch=4, budget_minutes=30, **common)
    # a budget never raises the recipe's epochs (on a GPU 30 minutes would be hundreds of epochs)
    monkeypatch.setattr(budget_module, 'fit_to_budget', lambda args, done, elapsed_s: 9)
    kept = _run(tmp_path, fmnist_src, 'kept', epochs=3, budget_minutes=30, **common)
    assert len(_summary(kept['output_dir'])) == 3 and kept['args'].epochs == 3
    lr_planned = [r['lr'] for r in _summary(planned['output_dir'])]
    lr_fitted = [r['lr'] for r in _summary(fitted['output_dir'])]
    assert len(lr_fitted) == 5
    # summary.csv logs the lr each epoch trained at: epoch 1 still on the 7-epoch cosine, from epoch 2 (after the
    # refit at the end of epoch 1) on the 5-epoch one
    assert lr_fitted[1] != pytest.approx(lr_planned[1])
    assert lr_fitted[2:] == pytest.approx(lr_planned[2:], rel=1e-9)
    assert (fitted['args'].epochs, fitted['args'].crop_off_epoch) == (5, 3)  # round(4 * 5 / 7)


def test_a_refit_that_ends_the_run_after_a_skipped_epoch_evaluates_that_epoch(tmp_path, fmnist_src, monkeypatch):
    # the pace after the third epoch (which val_interval 2 skips) says the budget is spent: the refit makes that epoch
    # the last, and the last epoch is always evaluated, with its summary row and checkpoint
    monkeypatch.setattr(budget_module, 'fit_to_budget', lambda args, done, elapsed_s: 3 if done == 3 else 8)
    tiny = dict(train_num_samples=256, val_num_samples=64)
    result = _run(tmp_path, fmnist_src, 'spent', epochs=8, val_interval=2, budget_minutes=30, **tiny)
    assert result['args'].epochs == 3
    rows = _summary(result['output_dir'])
    assert [r['epoch'] for r in rows] == [1, 2] and [h['epoch'] for h in result['history']] == [1, 2]
    assert _load_checkpoint(result['output_dir'] / 'last.pth.tar')['epoch'] == 2
    assert (result['output_dir'] / 'checkpoint-2.pth.tar').is_file()
    # the row logs the lr the epoch trained at: the 8-epoch cosine's, not the refitted schedule's
    assert rows[1]['lr'] == pytest.approx(0.5 * QUICK['lr'] * (1 + math.cos(math.pi * 2 / 8)))


def test_channels_last_trains_the_same_model_and_exports(tmp_path, fmnist_src):
    # train.py's --channels-last: the conv stem runs NHWC (1.0-1.4x faster here); the result must not change
    sgd = dict(epochs=1, opt='sgd', lr=0.05)  # Adam would magnify rounding in near-zero gradients to whole steps
    plain = _run(tmp_path, fmnist_src, 'nchw', **sgd)
    fast = _run(tmp_path, fmnist_src, 'nhwc', channels_last=True, **sgd)
    stem_weight = fast['model'].patch_embed.stem[1].conv.weight  # stem[0] has 1 input channel: both layouts
    assert stem_weight.is_contiguous(memory_format=torch.channels_last) and not stem_weight.is_contiguous()
    # same data order and init: only the conv kernels' summation order differs (measured: at most 4e-4)
    plain_state = plain['model'].state_dict()
    for k, v in fast['model'].state_dict().items():
        torch.testing.assert_close(v, plain_state[k], rtol=1e-3, atol=2e-3)
    assert fast['eval_metrics']['loss'] == pytest.approx(plain['eval_metrics']['loss'], abs=2e-3)

    # safetensors takes only contiguous tensors: the export of an NHWC-trained checkpoint must still load back
    exported = timm_smallvit.export_checkpoint(fast['output_dir'] / 'last.pth.tar', tmp_path / 'export')
    reloaded = timm.create_model(f'local-dir:{exported}', pretrained=True).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), fast['model'].eval()(x), rtol=1e-4, atol=1e-5)


def test_batch_loader_yields_the_same_batches_in_nhwc():
    images, labels = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8), torch.arange(8)
    common = dict(batch_size=4, mean=(0.5,) * 3, std=(0.5,) * 3, img_size=(6, 6))
    for (x, y), (x_cl, y_cl) in zip(
        BatchLoader(images, labels, **common), BatchLoader(images, labels, channels_last=True, **common), strict=True
    ):
        assert x.is_contiguous() and x_cl.is_contiguous(memory_format=torch.channels_last)
        assert not x_cl.is_contiguous()  # 3 channels: the two layouts differ
        assert torch.equal(x, x_cl) and torch.equal(y, y_cl)


def test_alternate_flips_mirror_each_training_image_every_other_epoch():
    # shuffled, in two processes' shards: each image (its label says which) comes out mirrored in one of two epochs
    images = torch.randint(0, 256, (32, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32)
    augment = BatchAugment((6, 6), scale=None, hflip=0.5)
    common = dict(batch_size=4, mean=(0.0,), std=(1.0,), img_size=(6, 6), augment=augment, shuffle=True, seed=3)
    mirrored: dict[int, list[bool]] = {}
    for epoch in range(2):
        for rank in range(2):
            loader = BatchLoader(images, labels, alternate_flips=True, rank=rank, world_size=2, **common)
            loader.set_epoch(epoch)
            for x, y in loader:
                for image, label in zip(x, y.tolist(), strict=True):
                    whole = images[label].float() / 255
                    flipped = torch.allclose(image, whole.flip(-1), atol=1e-5)
                    assert flipped or torch.allclose(image, whole, atol=1e-5)
                    mirrored.setdefault(label, []).append(flipped)
    assert sorted(mirrored) == list(range(32)) and all(m in ([True, False], [False, True]) for m in mirrored.values())
    assert 8 <= sum(m[0] for m in mirrored.values()) <= 24  # a random half from the first epoch


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@needs_cuda
def test_batch_loader_on_the_gpu_yields_the_cpu_batches():
    # random parameters are drawn on the CPU, so the same seed crops, flips and jitters alike on either device
    images, labels = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8), torch.arange(32)
    augment = BatchAugment((28, 28), scale=(0.5, 1.0), hflip=0.5, color_jitter=0.4)
    common = dict(batch_size=8, mean=(0.5,), std=(0.5,), img_size=(28, 28), augment=augment, shuffle=True, seed=3)
    cpu, gpu = BatchLoader(images, labels, **common), BatchLoader(images, labels, device='cuda', **common)
    for epoch in range(2):
        cpu.set_epoch(epoch)
        gpu.set_epoch(epoch)
        for (x, y), (x_gpu, y_gpu) in zip(cpu, gpu, strict=True):
            assert x_gpu.device.type == 'cuda' and y_gpu.device.type == 'cuda'
            assert torch.equal(y, y_gpu.cpu())
            torch.testing.assert_close(x_gpu.cpu(), x, rtol=0, atol=1e-4)

    # timm's random erasing runs on the GPU batch in place
    erase = RandomErasing(1.0, mode='pixel', device='cuda')
    plain = BatchLoader(images, labels, batch_size=32, mean=(0.5,), std=(0.5,), img_size=(28, 28), device='cuda')
    erased = BatchLoader(
        images, labels, batch_size=32, mean=(0.5,), std=(0.5,), img_size=(28, 28), erase=erase, device='cuda'
    )
    (x, _), (x_erased, _) = next(iter(plain)), next(iter(erased))
    changed = (x != x_erased).flatten(1).any(1)
    assert x_erased.device.type == 'cuda' and changed.all()  # probability 1: every image has a box


@needs_cuda
def test_trains_on_the_gpu_as_on_the_cpu(tmp_path, fmnist_src):
    # the CPU test's recipe and bar (test_loss_falls_on_real_data...), on the GPU under bf16 autocast
    run = _run(tmp_path, fmnist_src, 'cuda', device='cuda', amp=True, amp_dtype='bfloat16', epochs=3)
    assert next(run['model'].parameters()).device.type == 'cuda'
    rows = _summary(run['output_dir'])
    assert rows[-1]['train_loss'] < 0.75 * rows[0]['train_loss']
    assert rows[-1]['eval_top1'] > 55.0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, fmnist_src):
    # epoch 0 trains normally; the step schedule then multiplies lr by 1e12 and the loss blows up in epoch 1
    message = r'at epoch 1 step \d+: training stopped\. The last good checkpoint is'
    with pytest.raises(NonFiniteLossError, match=message):
        _run(tmp_path, fmnist_src, 'nan', epochs=3, sched='step', decay_epochs=1, decay_rate=1e12, opt='sgd', lr=0.05)
    run_dir = tmp_path / 'nan'
    assert [r['epoch'] for r in _summary(run_dir)] == [0]
    checkpoint = _load_checkpoint(run_dir / 'last.pth.tar')
    assert checkpoint['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint['state_dict'].values())


def test_unknown_recipe_keys_are_refused_by_name(fmnist_src):
    with pytest.raises(ValueError, match=r'does not honour recipe key\(s\): aa, workers'):
        resolve_args(dict(QUICK, data_dir=str(fmnist_src), aa='rand-m9', workers=4))
    with pytest.raises(ValueError, match=r"dataset 'torch/imagenet'"):
        resolve_args(dict(QUICK, data_dir=str(fmnist_src), dataset='torch/imagenet'))
    with pytest.raises(ValueError, match='data_dir is not set'):
        resolve_args(dict(QUICK))
    for bad in (-1, 2.5, 'late', True):
        with pytest.raises(ValueError, match='crop_off_epoch'):
            resolve_args(dict(QUICK, data_dir=str(fmnist_src), crop_off_epoch=bad))
    for bad in (2, 'maybe', None):  # issue 31: true/false, yes/no, 1/0 are booleans for every boolean key
        with pytest.raises(ValueError, match='eval_hflip'):
            resolve_args(dict(QUICK, data_dir=str(fmnist_src), eval_hflip=bad))
    for bad in (-1, '30', True, float('inf'), None):
        with pytest.raises(ValueError, match='budget_minutes'):
            resolve_args(dict(QUICK, data_dir=str(fmnist_src), budget_minutes=bad))
    with pytest.raises(ValueError, match='plateau schedule'):
        resolve_args(dict(QUICK, data_dir=str(fmnist_src), budget_minutes=30, sched='plateau'))


def test_crop_off_epoch_past_the_last_epoch_warns(fmnist_src, caplog):
    with caplog.at_level(logging.WARNING, logger='timm_smallvit.recipe'):
        resolve_args(dict(QUICK, data_dir=str(fmnist_src), epochs=5, crop_off_epoch=4))
        assert not caplog.records
        resolve_args(dict(QUICK, data_dir=str(fmnist_src), epochs=4, crop_off_epoch=4))
    assert 'crop_off_epoch 4 is not below epochs (4): every epoch crops' in caplog.text


def test_existing_run_is_not_overwritten(tmp_path, fmnist_src):
    (tmp_path / 'taken').mkdir()
    (tmp_path / 'taken' / 'summary.csv').write_text('precious\n')
    with pytest.raises(FileExistsError, match='already holds a run'):
        _run(tmp_path, fmnist_src, 'taken', epochs=1)
    assert (tmp_path / 'taken' / 'summary.csv').read_text() == 'precious\n'


def test_fewer_images_than_a_batch_is_a_clear_error(tmp_path, fmnist_src):
    with pytest.raises(ValueError, match='100 training images make no full batch of 128'):
        _run(tmp_path, fmnist_src, 'tiny', epochs=1, batch_size=128, train_num_samples=100)
    assert not (tmp_path / 'tiny').exists()


def test_bf16_autocast_on_cpu(tmp_path, fmnist_src, caplog, monkeypatch):
    measured = []
    speedup = amp_module.bf16_speedup
    monkeypatch.setattr(amp_module, 'bf16_speedup', lambda step: measured.append(speedup(step)) or measured[-1])
    caplog.set_level(logging.INFO, logger=amp_module.__name__)
    result = _run(
        tmp_path,
        fmnist_src,
        'bf16',
        epochs=1,
        amp=True,
        amp_dtype='bfloat16',
        batch_size=16,
        train_num_samples=32,
        val_num_samples=32,
    )
    assert _summary(result['output_dir'])[0]['train_loss'] > 0
    faster = amp_module.cpu_has_native_bf16() and measured[0] >= amp_module.BF16_MIN_SPEEDUP
    assert result['args'].amp == faster  # bf16 where it is the fast path, float32 where it would be slower
    assert len(measured) == (1 if amp_module.cpu_has_native_bf16() else 0)  # the run's own step, timed once
    assert ('training in float32 instead' in caplog.text) != faster  # the fallback is said, not hidden
    recorded = yaml.safe_load((result['output_dir'] / 'args.yaml').read_text())
    assert recorded['amp'] == faster  # args.yaml says what ran


class _Clock:
    """A stub of time.perf_counter: each step advances it by what ``seconds`` says for that dtype and call."""

    def __init__(self, seconds):
        self.now, self.seconds, self.calls = 0.0, seconds, []

    def step(self, bf16: bool) -> None:
        self.calls.append(bf16)
        self.now += self.seconds(bf16, len(self.calls))

    def __call__(self) -> float:
        return self.now


def test_bf16_speedup_is_robust_to_a_drifting_and_noisy_vm():
    # the VM slows down 1.5x over the probe (drift) and one round is disturbed (another job, a page fault): the
    # true speed-up of 2x is still what the median of interleaved rounds reads
    def seconds(bf16, call):
        drift = 1 + 0.5 * call / 12
        base = 0.05 if bf16 else 0.10
        return base * drift * (6.0 if call == 7 else 1.0)

    clock = _Clock(seconds)
    speedup = amp_module.bf16_speedup(clock.step, rounds=5, timer=clock)
    assert speedup == pytest.approx(2.0, rel=0.1)
    assert clock.calls[:2] == [False, True] and len(clock.calls) == 2 + 2 * 5  # a warm-up of each, then the rounds
    assert clock.calls[2:6] == [False, True, True, False]  # the order alternates, so drift cancels over rounds
    # the matmul probe this replaces timed each dtype once, 0.3 s apart: one disturbed timing decided the run


@pytest.mark.parametrize(('true_speedup', 'expected'), [(2.1, True), (1.05, False)])
def test_the_decision_is_the_steps_not_one_noisy_timing(monkeypatch, caplog, true_speedup, expected):
    def seconds(bf16, call):
        noise = 1.6 if call in (5, 10) else 1.0  # two disturbed timings, one of each dtype
        return (0.1 / true_speedup if bf16 else 0.1) * noise

    clock = _Clock(seconds)
    monkeypatch.setattr(amp_module, 'cpu_has_native_bf16', lambda: True)
    monkeypatch.setattr(amp_module, 'training_step', lambda *a, **k: clock.step)
    monkeypatch.setattr(amp_module, 'bf16_speedup', lambda step: _real_speedup(step, timer=clock))
    args = argparse.Namespace(amp=True, amp_dtype='bfloat16', num_classes=10, batch_size=8, channels_last=False)
    with caplog.at_level(logging.INFO):
        speedup = amp_module.decide_cpu_amp(args, torch.nn.Linear(1, 1), (1, 28, 28), torch.device('cpu'))
    assert speedup == pytest.approx(true_speedup, rel=0.05) and args.amp == expected
    assert ('training in float32 instead' in caplog.text) != expected
    if not expected:  # the warning says why: the measured step and the threshold
        assert f'ran {true_speedup:.2f}x as fast in bf16' in caplog.text and '1.15x' in caplog.text


_real_speedup = amp_module.bf16_speedup


@pytest.mark.parametrize('native', [True, False])
@pytest.mark.parametrize('bf16_gain', [2.0, 0.5])
def test_amp_on_cpu_is_bf16_autocast_only_where_the_step_is_faster(monkeypatch, caplog, native, bf16_gain):
    # bf16 only with native bf16 whose training step beats float32 (an AVX512-BF16 VM without AMX ran at half speed)
    monkeypatch.setattr(amp_module, 'cpu_has_native_bf16', lambda: native)
    monkeypatch.setattr(amp_module, 'bf16_speedup', lambda step: bf16_gain)
    expected = native and bf16_gain > 1
    args = argparse.Namespace(amp=True, amp_dtype='bfloat16', num_classes=10, batch_size=4, channels_last=False)
    model = timm.create_model('smallvit_nano_patch4_28')
    with caplog.at_level(logging.WARNING):
        amp_module.decide_cpu_amp(args, model, (1, 28, 28), torch.device('cpu'))
    with amp_module.autocast_context(args, torch.device('cpu'))():
        enabled = torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
    assert enabled == expected and args.amp == expected
    assert ('training in float32 instead' in caplog.text) != expected
    if not expected:  # the warning says why: emulated, or the measured speed-up
        reason = 'no native bfloat16' if not native else 'the training step ran 0.50x as fast in bf16'
        assert reason in caplog.text
    for decide in (amp_module.decide_cpu_amp, lambda a, *_: amp_module.autocast_context(a, torch.device('cpu'))):
        with pytest.raises(ValueError, match='float16 autocast is for CUDA'):
            decide(argparse.Namespace(amp=True, amp_dtype='float16'), model, (1, 28, 28), torch.device('cpu'))


@pytest.mark.parametrize(('mine', 'first'), [(True, False), (False, True), (True, True)])
def test_cpu_processes_take_the_first_ones_bf16_answer(monkeypatch, mine, first):
    def broadcast(tensor, src):  # gloo's broadcast, as process 0 would send it
        assert src == 0
        tensor.fill_(int(first))

    monkeypatch.setattr(amp_module, 'cpu_bf16_pays', lambda step: (mine, 2.0 if mine else 1.0))  # its own timing
    monkeypatch.setattr(amp_module.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(amp_module.dist, 'broadcast', broadcast)
    args = argparse.Namespace(amp=True, amp_dtype='bfloat16', num_classes=10, batch_size=4, channels_last=False)
    amp_module.decide_cpu_amp(args, torch.nn.Linear(1, 1), (1, 28, 28), torch.device('cpu'))
    with amp_module.autocast_context(args, torch.device('cpu'))():
        enabled = torch.is_autocast_enabled('cpu')
    assert args.amp == first and enabled == first


def test_the_step_probe_leaves_the_model_and_the_seeded_generator_alone():
    # it runs after the trainer seeds torch and builds the model: drawing from the global generator would change
    # the run (dropout, augmentation), and a step on the model itself would train it
    model = timm.create_model('smallvit_tiny_convstem_28', drop_path_rate=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # batch-norm statistics included
    torch.manual_seed(0)
    state = torch.get_rng_state()
    step = amp_module.training_step(model, (1, 28, 28), 10, batch_size=8, channels_last=True)
    amp_module.bf16_speedup(step, rounds=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_step_probe_measures_the_step():
    # an oracle outside the probe: torch's own benchmark timer on the same step, float32 and bf16 autocast
    from torch.utils.benchmark import Timer

    step = amp_module.training_step(timm.create_model('smallvit_nano_patch4_28'), (1, 28, 28), 10, batch_size=32)
    speedup = amp_module.bf16_speedup(step, rounds=3)
    fp32, bf16 = (Timer('step(b)', globals={'step': step, 'b': b}).timeit(5).median for b in (False, True))
    assert 0.4 < speedup / (fp32 / bf16) < 2.5  # the same order as torch's timing, noise allowed


def test_a_recipe_that_names_cuda_warns_when_there_is_none(fmnist_src, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    recipe = load_recipe(Path(timm_smallvit.__file__).parent / 'recipes' / 'fashion_mnist_gpu.yaml')
    with caplog.at_level(logging.WARNING, logger=recipe_module.__name__):
        resolve_args(dict(QUICK), data_dir=str(fmnist_src))  # device left at its default: quiet
        assert not caplog.records
        resolve_args(recipe, data_dir=str(fmnist_src))
    assert 'asks for device: cuda, but no CUDA GPU is available' in caplog.text


def test_shipped_recipes_use_only_honoured_keys(fmnist_src):
    assert set(recipe_module.TRAIN_PY_WITHOUT) == set(QUICK_TRAINER_KEYS)  # train-py's warning names each one
    recipes = sorted((Path(__file__).parents[1] / 'timm_smallvit' / 'recipes').glob('*.yaml'))
    assert len(recipes) >= 3
    for path in recipes:
        recipe = load_recipe(path)
        assert set(recipe) <= set(TRAIN_PY_DEFAULTS) | set(QUICK_TRAINER_KEYS), path.name
        assert timm.is_model(recipe['model'])


def _train_py_module():
    path = os.environ.get('TIMM_TRAIN_PY')
    if not path:
        pytest.skip("TIMM_TRAIN_PY is not set (path to timm's train.py from a pytorch-image-models checkout)")
    spec = importlib.util.spec_from_file_location('timm_train_py', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the parser; main() runs only as __main__
    return module


def test_defaults_are_train_py_defaults():
    defaults = vars(_train_py_module().parser.parse_args([]))
    for key, value in TRAIN_PY_DEFAULTS.items():
        assert key in defaults, f'{key} is not a train.py argument'
        assert defaults[key] == value, f'{key}: train.py default {defaults[key]!r}, ours {value!r}'
    for key in QUICK_TRAINER_KEYS:  # if train.py gains one, it should be read from train.py's list instead
        assert key not in defaults, f'{key} is a train.py argument now'


@pytest.mark.slow
def test_distills_from_a_teacher_folder_through_timm_task(tmp_path, fmnist_src):
    # A teacher that answers class c as class perm[c]: a student taught by it alone (task_loss_weight 0) must learn
    # the permuted labels, which a student that quietly learned from the labels would not.
    teacher_run = _run(tmp_path, fmnist_src, 'teacher', epochs=2)
    folder = timm_smallvit.export_checkpoint(teacher_run['output_dir'] / 'last.pth.tar', tmp_path / 'teacher_export')
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    teacher = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    state = {k: v.contiguous() for k, v in teacher.state_dict().items()}
    state['head.weight'], state['head.bias'] = state['head.weight'][perm], state['head.bias'][perm]
    save_file(state, folder / 'model.safetensors')
    teacher.load_state_dict(state)

    student = _run(
        tmp_path,
        fmnist_src,
        'student',
        epochs=2,
        seed=1,
        kd_model_name=f'local-dir:{folder}',
        task_loss_weight=0.0,
        kd_temperature=1.0,
    )
    images, labels = load_fashion_mnist(fmnist_src, train=False)
    x = (images[:512].unsqueeze(1).float() / 255 - 0.5) / 0.5  # the recipe's mean and std
    with torch.no_grad():
        taught = teacher(x).argmax(-1)
        learned = student['model'].eval()(x).argmax(-1)
    teacher_top1 = (taught == perm.argsort()[labels[:512]]).float().mean().item()
    agreement = (learned == taught).float().mean().item()
    top1 = student['eval_metrics']['top1']
    print(f'teacher top-1 (permuted labels) {teacher_top1:.3f}, student agreement {agreement:.3f}, top-1 {top1:.2f}')
    assert teacher_top1 > 0.35  # the permuted teacher knows the classes (measured 0.53; chance is 0.1)
    assert agreement > 0.5  # measured 0.89 with distillation, 0.12 with it switched off
    assert top1 < 30.0  # against the true labels: the student learned the teacher's labels, not these
