"""Hostile and careless input (issue 31): each case is one row of CASES.

A row names the input (its id starts with the issue's case number), builds it (``setup``, given a :class:`Given`:
tmp_path, monkeypatch and the module's fixtures), makes the call a user would make (``act``), and says what must
happen: a one-line error matching ``error``, or a call that succeeds and passes ``check``; ``warning`` is a logged
line the call must give either way. To add an input, add a row; the helpers below build image folders, symlinks,
full disks, caches, exports and command lines.
"""

import contextlib
import errno
import io
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import timm_smallvit
from tests.hub_server import HubServer, make_training_run, use_hub
from timm_smallvit import cli
from timm_smallvit import data as data_module
from timm_smallvit.data import SmallImageDataset


@dataclass(frozen=True)
class Given:
    tmp: Path
    mp: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)


Setup = Callable[[Given], Any]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Setup  # -> what `act` takes
    act: Callable[[Any], Any]
    error: str = ''  # regex of the one-line error; '' : the call must succeed
    warning: str = ''  # regex of a line the call must log
    check: Callable[[Any, Any], None] | None = None  # (setup's value, act's result or error): asserts


# ---- inputs ----------------------------------------------------------------------------------------------------------


def png(value: int | np.ndarray = 0) -> bytes:
    """A PNG: 28x28 of one grey value, or the given array (uint16 arrays are 16-bit PNGs)."""
    array = np.full((28, 28), value, np.uint8) if isinstance(value, int) else value
    buf = BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


GOOD = {'train/a/1.png': png(1), 'train/b/2.png': png(2), 'val/a/3.png': png(3), 'val/b/4.png': png(4)}
RAMP = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) % 256  # 8-bit values, written 16-bit as v * 257


def folder(
    files: dict[str, bytes] = GOOD,
    links: dict[str, str] | None = None,
    then: Callable[[Path, pytest.MonkeyPatch], None] | None = None,
) -> Setup:
    """An image folder ``data/`` with these files and symlinks (name -> target, relative to the link's folder)."""

    def setup(given: Given) -> Path:
        root = given.tmp / 'data'
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        for rel, target in (links or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).symlink_to(target)
        if then is not None:
            then(root, given.mp)
        return root

    return setup


def load_train(root: Path) -> torch.Tensor:
    """What the quick trainer decodes from a folder's train split."""
    return SmallImageDataset('', root).load('train', in_chans=1, img_size=(28, 28), progress=False).images


def cached_then(change: Callable[[Path], None]) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """Decode the train split once (filling the cache), then change something behind the cache's back."""

    def then(root: Path, mp: pytest.MonkeyPatch) -> None:
        load_train(root)
        change(root)

    return then


def flip_cache_bytes(root: Path) -> None:
    (path,) = (Path(os.environ['SMALLVIT_CACHE']) / 'decoded').glob('*.safetensors')
    raw = bytearray(path.read_bytes())
    raw[-10:] = bytes(255 - b for b in raw[-10:])  # pixels of the last image; the header stays intact
    path.write_bytes(bytes(raw))


def replace_keeping_stat(*pairs: tuple[str, bytes]) -> Callable[[Path], None]:
    """New bytes of the same size in each file, its modification time put back: names, sizes and times lie."""

    def change(root: Path) -> None:
        for rel, content in pairs:
            st = (root / rel).stat()
            assert len(content) == st.st_size
            (root / rel).write_bytes(content)
            os.utime(root / rel, ns=(st.st_atime_ns, st.st_mtime_ns))

    return change


def read_only_cache(root: Path, mp: pytest.MonkeyPatch) -> None:
    """The cache already holds the decoded data, then its file system becomes read-only (simulated: tests may run
    as root, whom permissions do not stop): opening anything in it for writing fails with EROFS."""
    load_train(root)
    cache = str(Path(os.environ['SMALLVIT_CACHE']).resolve())
    real_open = os.open

    def open_read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and os.path.abspath(path).startswith(cache):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    mp.setattr(os, 'open', open_read_only)


DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
SAFETENSORS_DISK_FULL = Exception('Error while serializing: I/O error: No space left on device (os error 28)')
TORCH_DISK_FULL = RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')


def full_disk(module: Any, writer: str = 'write_atomically', error: Exception = DISK_FULL) -> Setup:
    """The disk fills while ``module.writer`` writes: it writes (part of) its file, then fails with ``error``."""

    def setup(given: Given) -> None:
        real = getattr(module, writer)

        def write(*args: Any, **kwargs: Any) -> None:
            if writer == 'write_atomically':  # (path, write(tmp)): the write itself fails
                path, inner = args

                def fill(tmp_name: str) -> None:
                    inner(tmp_name)
                    raise error

                return real(path, fill)
            real(*args, **kwargs)
            raise error

        given.mp.setattr(module, writer, write)

    return setup


def both(*setups: Setup) -> Setup:
    """Setups in order; the value of the first."""

    def setup(given: Given) -> Any:
        values = [s(given) for s in setups]
        return values[0]

    return setup


def pillow_limit(pixels: int) -> Setup:
    def setup(given: Given) -> None:
        given.mp.setattr(Image, 'MAX_IMAGE_PIXELS', pixels)

    return setup


class CliError(Exception):
    """What `smallvit` printed as its error (the message after 'error: ')."""


def smallvit(*argv: str) -> str:
    """Run the smallvit command in this process: its stdout, or CliError with its one-line error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    if code:
        raise CliError(err.getvalue().strip().split(': error: ', 1)[-1])
    return out.getvalue()


ALICE = 'hf_alice_0123456789abcdefghijklmnopqrstuv'  # a fake token, valid on the test server only
RECIPE = dict(model='smallvit_nano_patch4_28', data_dir='.', epochs=1, batch_size=2, in_chans=1)


def resolve(**overrides: Any) -> Callable[[Any], Any]:
    """resolve_args on a small recipe, with overrides as `--set` gives them (strings where literal_eval fails)."""
    from timm_smallvit.recipe import resolve_args

    return lambda given: resolve_args(dict(RECIPE), **overrides)


def train_with(*settings: str) -> Callable[[Path], str]:
    """`smallvit train --config RECIPE --set KEY=VALUE ...`"""
    return lambda path: smallvit('train', '--config', path, '--set', *settings)


def recipe_file(**keys: Any) -> Setup:
    """A recipe file (YAML as written here, so quoted strings stay strings) in the test's folder."""

    def setup(given: Given) -> Path:
        path = given.tmp / 'recipe.yaml'
        path.write_text(''.join(f'{k}: {json.dumps(v)}\n' for k, v in {**RECIPE, **keys}.items()))
        return path

    return setup


def nothing(given: Given) -> None:
    return None


def export_copy(*changes: Callable[[Path, Given], None], hub: bool = False) -> Setup:
    """A copy of the module's export in the test's folder, changed; with ``hub``, the local Hub and Alice's token."""

    def setup(given: Given) -> Path:
        folder = Path(shutil.copytree(given.fixture('exported'), given.tmp / 'export'))
        for change in changes:
            change(folder, given)
        if hub:
            use_hub(given.mp, given.fixture('hub'), given.tmp, token=ALICE)
        return folder

    return setup


def hard_link(name: str, secret: bytes | None = None) -> Callable[[Path, Given], None]:
    """``name`` replaced by a hard link to a file outside the folder (a secret, or a copy of the file itself)."""

    def change(folder: Path, given: Given) -> None:
        outside = given.tmp / f'outside-{name}'
        outside.write_bytes(secret if secret is not None else (folder / name).read_bytes())
        (folder / name).unlink()
        os.link(outside, folder / name)

    return change


def edit_card(folder: Path, given: Given) -> None:
    card = folder / 'README.md'
    card.write_text(card.read_text().replace('## Usage', 'A hand-written note.\n\n## Usage'))


def edit_config(**model_args: Any) -> Callable[[Path, Given], None]:
    def change(folder: Path, given: Given) -> None:
        config = json.loads((folder / 'config.json').read_text())
        config['model_args'].update(model_args)
        (folder / 'config.json').write_text(json.dumps(config))

    return change


def edit_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, Given], None]:
    def change(folder: Path, given: Given) -> None:
        import safetensors.torch

        tensors = safetensors.torch.load_file(folder / 'model.safetensors')
        edit(tensors)
        safetensors.torch.save_file(tensors, folder / 'model.safetensors')

    return change


def no_model_built(folder: Path, given: Given) -> None:
    """Building a model fails the test: a config must be refused before memory is allocated for it."""
    import timm

    real = timm.create_model

    def refuse(*args: Any, **kwargs: Any) -> Any:
        if torch.get_default_device().type == 'meta':  # shapes only: no memory
            return real(*args, **kwargs)
        raise AssertionError(f'a model was built: timm.create_model{args}{kwargs}')

    given.mp.setattr(timm, 'create_model', refuse)


def push(**kwargs: Any) -> Callable[[Path], Any]:
    return lambda folder: timm_smallvit.push_to_hub(folder, 'alice/hostile', **kwargs)


def pull(folder: Path) -> Any:
    return timm_smallvit.create_model(f'local-dir:{folder}', pretrained=True)


def predict_into(json_name: str, *flags: str, image: str = 'shoe.png') -> Setup:
    """An export, an image and (for json_name 'old.json') an existing JSON file; act: smallvit predict."""

    def setup(given: Given) -> tuple[Path, Path, Path]:
        folder = export_copy()(given)
        (given.tmp / image).write_bytes(png(7))
        target = given.tmp / json_name
        if json_name == 'old.json':
            target.write_text('kept\n')
        return folder, given.tmp / image, target

    return setup


def predict(*flags: str) -> Callable[[tuple[Path, Path, Path]], str]:
    return lambda given: smallvit('predict', given[0], given[1], '--json', given[2], *flags)


def file_kept(given: tuple[Path, Path, Path], result: Any) -> None:
    assert given[2].read_text() == 'kept\n'


def printed_escaped(given: tuple[Path, Path, Path], stdout: str) -> None:
    lines = stdout.splitlines()
    assert len(lines) == 1 and 'forged\\nline.png' in lines[0], stdout


def full_disk_export(error: Exception = DISK_FULL) -> Setup:
    """A training run to export, on a disk that fills while export writes the weights."""

    def setup(given: Given) -> Path:
        from timm_smallvit import export as export_module

        run = given.tmp / 'run'
        make_training_run(run, epochs=1, model_ema=False)
        full_disk(export_module, 'save_for_hf', error)(given)
        return run

    return setup


def export_run(run: Path) -> Any:
    out = run.parent / 'export'
    try:
        return timm_smallvit.export_checkpoint(run / 'last.pth.tar', out)
    finally:
        assert not out.exists() and not list(run.parent.glob('.export.export-*'))  # nothing half-written left


TINY_RUN = dict(
    model='smallvit_nano_patch4_28',
    dataset='',
    epochs=1,
    batch_size=2,
    in_chans=1,
    opt='adamw',
    lr=1e-3,
    warmup_epochs=0,
    smoothing=0.0,
    color_jitter=0.0,
    checkpoint_hist=1,
    experiment='x',
)


def train_run(root: Path) -> Any:
    """`smallvit train` of a 1-epoch run on the image folder ``root``, into ``<root>/../runs/x``."""
    from timm_smallvit.recipe import resolve_args
    from timm_smallvit.trainer import train

    return train(resolve_args(dict(TINY_RUN, data_dir=str(root), output=str(root.parent / 'runs'))))


class Killed(BaseException):
    """A kill: nothing of the process runs after it (no except clause catches a BaseException of ours)."""


def killed_at_the_first_checkpoint(given: Given) -> tuple[Path, pytest.MonkeyPatch]:
    return folder()(given), given.mp


def rerun_after_a_kill(given: tuple[Path, pytest.MonkeyPatch]) -> Any:
    """The run killed while its first checkpoint is half written, then the same command again."""
    root, mp = given
    real = torch.save

    def half_then_killed(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        buf = io.BytesIO()
        real(obj, buf)
        Path(path).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise Killed

    mp.setattr(torch, 'save', half_then_killed)
    with contextlib.suppress(Killed):
        train_run(root)
    mp.setattr(torch, 'save', real)
    return train_run(root)


def resumable(given: Any, result: Any) -> None:
    run = Path(result['output_dir'])
    assert (run / 'last.pth.tar').is_file() and not (run / 'tmp.pth.tar').exists()
    assert [line.split(',')[0] for line in (run / 'summary.csv').read_text().splitlines()] == ['epoch', '0']


def left_nothing(root: Path, error: Any) -> None:
    from timm_smallvit.recipe import holds_run

    run = root.parent / 'runs' / 'x'
    assert not run.exists() or (not holds_run(run) and not (run / 'tmp.pth.tar').exists()), list(run.iterdir())


HOSTILE_LABELS = ['two\nlines', '---', '<b>bold</b>', '<!-- hidden', 'a|b', '[x](javascript:1)', 'f', 'g', 'h', 'i']


def exported_run(**args: Any) -> Setup:
    """A short training run with these training args, exported: the export's folder."""

    def setup(given: Given) -> Path:
        run = make_training_run(given.tmp / 'run', epochs=1, model_ema=False, **args)
        return timm_smallvit.export_checkpoint(run / 'last.pth.tar', given.tmp / 'export')

    return setup


def read_card(folder: Path) -> tuple[Any, str]:
    from huggingface_hub import ModelCard

    text = (folder / 'README.md').read_text()
    return ModelCard(text), text


def labels_escaped(folder: Path, card: tuple[Any, str]) -> None:
    data, text = card
    body = text.split('\n---\n', 1)[1]  # after the front matter
    body = body.rpartition('<!-- timm-smallvit card: ')[0]  # before export's own closing comment
    assert '\n---\n' not in body and '<b>' not in body and '<!--' not in body and ' [x](javascript' not in body
    assert 'two\\nlines' in body and '&lt;b&gt;bold&lt;/b&gt;' in body and 'a\\|b' in body
    assert list(data.data.to_dict()) and data.content == text  # the front matter still parses


def fine_tune_card(folder: Path, card: tuple[Any, str]) -> None:
    data, text = card
    assert data.data.base_model == 'timm-smallvit/smallvit_nano_patch4_28.fmnist'
    assert 'smallvit_nano_patch4_28.fmnist`' not in text and '`smallvit_nano_patch4_28`' in text


# ---- checks --------------------------------------------------------------------------------------------------------


def grey_values(*values: int) -> Callable[[Any, torch.Tensor], None]:
    """The decoded train images are these constant images, in order."""

    def check(given: Any, images: torch.Tensor) -> None:
        expected = torch.stack([torch.full((1, 28, 28), v, dtype=torch.uint8) for v in values])
        assert torch.equal(images, expected), images.flatten(1).float().mean(1).tolist()

    return check


def first_image(expected: np.ndarray) -> Callable[[Any, torch.Tensor], None]:
    def check(given: Any, images: torch.Tensor) -> None:
        assert torch.equal(images[0, 0], torch.from_numpy(expected.astype(np.uint8)))

    return check


def args_are(**expected: Any) -> Callable[[Any, Any], None]:
    def check(given: Any, args: Any) -> None:
        assert {k: getattr(args, k) for k in expected} == expected
        assert all(type(getattr(args, k)) is bool for k in expected)

    return check


def args_yaml_records_bools(given: Any, args: Any) -> None:
    from timm_smallvit.recipe import write_args

    folder = Path(args.data_dir)
    write_args(folder, args)
    text = (folder / 'args.yaml').read_text()
    assert 'amp: false' in text and 'pretrained: false' in text, text


def classes(*names: str) -> Callable[[Path, Any], None]:
    def check(root: Path, result: Any) -> None:
        assert SmallImageDataset('', root).classes == names

    return check


# ---- the cases -------------------------------------------------------------------------------------------------------

CASES = [
    # 4: the decoded cache is verified by a digest of its pixels and keyed by the files' content
    Case('4_cache_bytes_flipped', folder(then=cached_then(flip_cache_bytes)), load_train,
         warning=r'decoded cache .*pixels', check=grey_values(1, 2)),
    Case('4_image_replaced_same_size_and_mtime',
         folder(then=cached_then(replace_keeping_stat(('train/a/1.png', png(9))))), load_train,
         check=grey_values(9, 2)),
    Case('4_images_swapped_same_sizes_and_mtimes',
         folder({**GOOD, 'train/b/2.png': png(9)},
                then=cached_then(replace_keeping_stat(('train/a/1.png', png(9)), ('train/b/2.png', png(1))))),
         load_train, check=grey_values(9, 1)),
    Case('8_cache_write_on_a_full_disk', both(folder(), full_disk(data_module)), load_train,
         error=r'no space left on .*: \d+(\.\d+)? MB needed .*decoded'),
    # 5: symlinked folders are followed once at most; a loop is an error naming it
    Case('5_symlink_loop_to_the_split', folder(links={'train/a/loop': '..'}), load_train,
         error=r'train/a/loop: symlink loop'),
    Case('5_symlink_to_itself', folder(links={'train/b/self': '.'}), load_train, error=r'train/b/self: symlink loop'),
    Case('5_two_links_to_one_folder', folder(links={'train/c': 'a'}), load_train,
         error=r'train/c: .*same folder as .*train/a'),
    Case('5_link_to_a_folder_outside_is_read_once',
         folder({**GOOD, 'extra/c/5.png': png(5)}, links={'train/c': '../extra/c'}), load_train,
         check=grey_values(1, 2, 5)),
    # 7: 16-bit images are scaled to 8 bits, not clipped to white
    Case('7_16_bit_png', folder({**GOOD, 'train/a/1.png': png(RAMP * 257)}), load_train, check=first_image(RAMP)),
    # 8: one-line errors naming the file
    Case('8_decompression_bomb', both(folder(), pillow_limit(100)), load_train,
         error=r'train/a/1.png: .*decompression bomb'),
    # 12: a read-only cache that holds the data works; a one-class dataset warns
    Case('12_read_only_cache_holding_the_data', folder(then=read_only_cache), load_train, check=grey_values(1, 2)),
    Case('12_one_class', folder({'train/a/1.png': png(1), 'val/a/3.png': png(3)}), load_train,
         warning=r'train: one class \(a\)'),
    # 1: push sends only the files export wrote, never through a link
    Case('1_hard_linked_secret_as_the_card', export_copy(hard_link('README.md', b'hf_secret'), hub=True), push(),
         error=r'README.md: .*hard link'),
    Case('1_hard_linked_card_even_with_allow_edited_card', export_copy(hard_link('README.md', b'x'), hub=True),
         push(allow_edited_card=True), error=r'README.md: .*hard link'),
    Case('1_hard_linked_weights', export_copy(hard_link('model.safetensors'), hub=True), push(),
         error=r'model.safetensors: .*hard link'),
    Case('1_edited_card_without_the_flag', export_copy(edit_card, hub=True), push(),
         error=r'README.md is not the card export wrote.*allow.edited.card'),
    Case('1_edited_card_with_the_flag', export_copy(edit_card, hub=True), push(allow_edited_card=True),
         warning=r'README.md is not the card export wrote'),
    # 2: one boolean parser for every boolean recipe key, for --set and YAML alike
    Case('2_false_strings_are_false', nothing, resolve(pretrained='false', amp='FALSE', channels_last='No',
         model_ema='0', eval_hflip='no'),
         check=args_are(pretrained=False, amp=False, channels_last=False, model_ema=False, eval_hflip=False)),
    Case('2_true_strings_are_true', nothing, resolve(amp='True', channels_last='yes', model_ema=1),
         check=args_are(amp=True, channels_last=True, model_ema=True)),
    Case('2_quoted_yaml_no_is_false', recipe_file(amp='no', pretrained='False'),
         lambda path: _resolve_file(path), check=args_are(amp=False, pretrained=False)),
    Case('2_not_a_boolean', nothing, resolve(amp='maybe'), error=r"amp 'maybe': .*true.*false"),
    Case('2_not_a_boolean_via_set', recipe_file(), train_with('amp=maybe'),
         error=r"amp 'maybe': .*true.*false"),
    Case('2_args_yaml_records_a_bool', lambda given: given.tmp, lambda tmp: _resolve_in(tmp, amp='false',
         pretrained='no'), check=args_yaml_records_bools),
    # 6: predict keeps an existing --json file, and escapes control characters in what it prints
    Case('6_existing_json_kept', predict_into('old.json'), predict(), error=r'old.json already exists.*--overwrite',
         check=file_kept),
    Case('6_existing_json_with_overwrite', predict_into('old.json'), predict('--overwrite')),
    Case('6_control_characters_in_a_name', predict_into('new.json', image='forged\nline.png'), predict(),
         check=printed_escaped),
    # 8: recipe values and pulled configs that used to end in tracebacks
    Case('8_lr_not_a_number', nothing, resolve(lr='fast'), error=r"lr 'fast': "),
    Case('8_lr_not_a_number_via_set', recipe_file(), train_with('lr=fast'),
         error=r"lr 'fast': "),
    Case('8_negative_img_size', nothing, resolve(img_size=-1), error=r'img_size -1: '),
    Case('8_unknown_model', nothing, resolve(model='smallvit_huge_patch4_28'),
         error=r"model 'smallvit_huge_patch4_28': "),
    Case('8_model_kwargs_a_string', nothing, resolve(model_kwargs='img_size=56'),
         error=r"model_kwargs 'img_size=56': "),
    Case('8_model_kwargs_unknown_key', nothing, resolve(model_kwargs={'img_sise': 56}),
         error=r'model_kwargs: .*img_sise'),
    Case('8_model_kwargs_unknown_key_via_set', recipe_file(),
         train_with("model_kwargs={'img_sise': 56}"),
         error=r'model_kwargs: .*img_sise'),
    Case('8_pulled_config_asks_for_a_huge_image', export_copy(edit_config(img_size=100_000), no_model_built), pull,
         error=r'img_size 100000, .*positions \(pos_embed\)'),
    Case('8_export_on_a_full_disk', full_disk_export(), export_run,
         error=r'no space left on .*: \d+ MB needed .*export'),
    Case('8_export_on_a_full_disk_safetensors_error', full_disk_export(SAFETENSORS_DISK_FULL), export_run,
         error=r'no space left on .*: \d+ MB needed .*export'),
    # 3: a kill or a full disk at the first checkpoint leaves a resumable run or nothing, and says so in one line
    Case('3_full_disk_at_the_first_checkpoint', both(folder(), full_disk(torch, 'save', TORCH_DISK_FULL)), train_run,
         error=r'no space left on .*: \d+ MB needed for the checkpoint', check=left_nothing),
    Case('3_full_disk_oserror_at_the_first_checkpoint', both(folder(), full_disk(torch, 'save')), train_run,
         error=r'no space left on .*: \d+ MB needed for the checkpoint', check=left_nothing),
    Case('3_killed_at_the_first_checkpoint_then_run_again', killed_at_the_first_checkpoint, rerun_after_a_kill,
         check=resumable),
    # 9: names from class folders are escaped in the card body
    Case('9_hostile_label_names', exported_run(label_names=HOSTILE_LABELS), read_card, check=labels_escaped),
    # 11: a fine-tuned export's card says where it started, and names the untagged architecture
    Case('11_fine_tuned_card', exported_run(model='smallvit_nano_patch4_28.fmnist', pretrained=True), read_card,
         check=fine_tune_card),
    # 10: checked pulls refuse what export would not write
    Case('10_nan_weights', export_copy(edit_weights(lambda t: t['head.bias'].fill_(math.nan))), pull,
         error=r'head.bias: .*not finite'),
    Case('10_integer_weights', export_copy(edit_weights(lambda t: t.update(
         {'head.weight': t['head.weight'].round().long()}))), pull, error=r'head.weight: .*int64'),
    Case('10_missing_head', export_copy(edit_weights(lambda t: t.pop('head.weight'))), pull,
         error=r'head.weight.* missing'),
]  # fmt: skip


def _resolve_file(path: Path) -> Any:
    from timm_smallvit.recipe import load_recipe, resolve_args

    return resolve_args(load_recipe(path))


def _resolve_in(tmp: Path, **overrides: Any) -> Any:
    from timm_smallvit.recipe import resolve_args

    return resolve_args(dict(RECIPE, data_dir=str(tmp)), **overrides)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('SMALLVIT_CACHE', str(tmp_path / 'cache'))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    run = make_training_run(tmp_path_factory.mktemp('run'), epochs=1, model_ema=False)
    return timm_smallvit.export_checkpoint(run / 'model_best.pth.tar', tmp_path_factory.mktemp('exports') / 'best')


@pytest.fixture(scope='module')
def hub():
    with HubServer(tokens={ALICE: 'alice'}) as server:
        yield server


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any, request: Any) -> None:
    caplog.set_level(logging.WARNING)
    given = case.setup(Given(tmp_path, monkeypatch, request))
    if case.error:
        with pytest.raises(Exception) as info:  # the message is what is checked
            case.act(given)
        message = str(info.value)
        assert re.search(case.error, message), f'{type(info.value).__name__}: {message}'
        assert '\n' not in message.strip(), message
        result = info.value
    else:
        result = case.act(given)
    if case.check is not None:
        case.check(given, result)
    if case.warning:
        assert re.search(case.warning, caplog.text), caplog.text


def test_case_ids_are_unique_and_numbered():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and all(re.match(r'\d+_', i) for i in ids)
