"""Share exported smallvit models through the Hugging Face Hub: push an export, pull one with its files checked.

    push_to_hub     an export folder -> a Hub repo, through huggingface_hub (create_repo, upload_folder): the export's
                    files only, regular files only (never through a symbolic link), all checked first
    create_model    timm.create_model after the import that registers smallvit*, checking hf-hub: and local-dir:
                    files first so that bad exports fail with a message instead of odd timm errors
    stage_files     named files of a folder -> a private copy, as regular files only (what push sends; ``smallvit
                    space`` stages its folder with it too)
    upload_staged   a staged copy -> a Hub repo of any type, as one commit (what push does after its checks)

Exports are written by :mod:`timm_smallvit.export`; push renders the card again (:func:`timm_smallvit.card.render_for`)
from the values export kept in it, to name the Hub repo.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import importlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard, get_token, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from huggingface_hub.utils import validate_repo_id
from timm.data import resolve_data_config
from timm.models._hub import (
    hf_split,  # no public name in timm 1.0.31
    load_model_config_from_path,  # timm's reader of config.json; no public name in 1.0.31
)

from .card import render_for
from .checkpoint import check_architecture, load_strict
from .export import CARD_NAME, CONFIG_NAME, CURVE_NAME, EXPORT_FILES, GRID_NAME, ONNX_NAME, WEIGHTS_NAME
from .onnx_file import check_onnx_matches
from .preprocess import check_data_config, check_label_names

__all__ = ['create_model', 'push_to_hub', 'stage_files', 'upload_staged']

_logger = logging.getLogger(__name__)

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def push_to_hub(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    allow_edited_card: bool = False,
) -> CommitInfo:
    """Upload an exported folder to a Hub model repo (created if needed), as one commit.

    Only the files export writes go up (model.safetensors, config.json, README.md, learning_curve.png,
    predictions.png, model.onnx), as regular files: a symbolic link among them is refused, and nothing else in the
    folder is sent. config.json's preprocessing and label names are checked (:mod:`timm_smallvit.preprocess`), and a
    model.onnx must be the ONNX file of model.safetensors: its metadata as config.json says, its logits the weights'.
    Everything is checked before the first change on the Hub (the files, the card's metadata, the token, that the
    endpoint answers), and the commit removes the files an earlier push left on the branch that the folder no longer
    has. The uploaded card is rendered again from the template with ``repo_id`` (and the branch) in its usage snippet,
    from the values export kept in it; a card edited after export is refused unless ``allow_edited_card`` (then it
    goes up as it is). A file with more than one hard link is refused, whatever it holds: the name in the folder may
    be another file's (a secret's) second name. out_dir itself is not changed.
    The endpoint is huggingface_hub's (HF_ENDPOINT); the token is never written, printed or logged.

    Args:
        out_dir: Folder written by export_checkpoint.
        repo_id: 'user/name' (or 'org/name') of the model repo.
        private: Create the repo private. An existing public repo is refused rather than pushed to.
        revision: Branch to commit to (created from main if missing); default main.
        commit_message: Commit title; default 'Upload <architecture> (timm-smallvit)'.
        token: Hub token; default HF_TOKEN or the stored `hf auth login` token.
        allow_edited_card: Push a README.md that export did not write (edited by hand) as it is.

    Returns:
        The commit: a str (its URL) with .oid and .commit_url.
    """
    folder = Path(out_dir)
    if repo_id.count('/') != 1:
        raise ValueError(f"repo_id {repo_id!r} must be 'user/name' or 'org/name' (the namespace names the owner).")
    validate_repo_id(repo_id)  # a ValueError that says which characters are allowed
    branch = revision if revision and revision != 'main' else None
    # What upload_folder does not guard, and the private copy does: upload_folder picks files by name with
    # Path.is_file(), which follows symbolic links (a learning_curve.png linked to the stored token would go up as
    # the token), and reads them when it sends them, after any check made here (a file swapped or rewritten in
    # between would go up unchecked). So the export files are copied into a private temporary folder first, each
    # through an O_NOFOLLOW descriptor checked to be a regular file, the copies are what is checked, and that folder
    # is what upload_folder sends. allow_patterns then only restates what the copy holds.
    with tempfile.TemporaryDirectory(prefix='smallvit-push-') as tmp:
        stage = Path(tmp)
        model_ref = f'hf-hub:{repo_id}@{branch}' if branch else f'hf-hub:{repo_id}'
        names = _stage_upload(folder, stage, model_ref, allow_edited_card)
        config, model = _check_files(stage / CONFIG_NAME, stage / WEIGHTS_NAME, str(folder))
        if ONNX_NAME in names:
            _check_onnx(stage, folder, config, model)
        commit = upload_staged(
            stage,
            repo_id,
            names,
            # what this or an older push (which sent any *.png) may have uploaded; files in subfolders are someone
            # else's
            ours=lambda path: '/' not in path and (path in EXPORT_FILES or path.endswith('.png')),
            private=private,
            revision=branch,
            commit_message=commit_message or f'Upload {config["architecture"]} (timm-smallvit)',
            token=token,
        )
    _logger.info('Pushed %s to %s', folder, commit.commit_url)
    return commit


def upload_staged(
    stage: Path,
    repo_id: str,
    names: Sequence[str],
    *,
    ours: Callable[[str], bool],
    commit_message: str,
    repo_type: str | None = None,
    space_sdk: str | None = None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    check_target: Callable[[HfApi, Any], None] | None = None,
) -> CommitInfo:
    """Upload the checked copy in ``stage`` (see :func:`stage_files`) to a Hub repo (created if needed), as one commit.

    The commit holds ``names`` and removes what an earlier upload left on the branch that ``stage`` no longer has
    (the repo's files for which ``ours`` is true); other files are kept. It is made on the branch head that was
    listed, so nobody else's file can land in between. Auth and connection failures are one-line PermissionError /
    ConnectionError messages; the token is never written, printed or logged.

    Args:
        stage: The private folder holding exactly ``names``.
        repo_id: 'user/name'.
        names: The files to upload, as paths relative to stage ('app.py', 'model/config.json').
        ours: Whether a file already in the repo was put there by an earlier upload of this kind.
        commit_message: The commit title.
        repo_type: None (a model), 'space' or 'dataset'.
        space_sdk: The SDK of a Space created here ('gradio').
        private: Create the repo private; an existing public repo is refused.
        revision: Branch to commit to (created from main if missing); default main.
        token: Hub token; default HF_TOKEN or the stored `hf auth login` token.
        check_target: Called with the API and the branch's repo info before anything is uploaded; raises to refuse.
    """
    token = token or get_token()
    if not token:
        raise LocalTokenNotFoundError(
            'No Hugging Face token found: log in with `hf auth login` (stored by huggingface_hub) or set '
            'HF_TOKEN to a token with write access, then push again.'
        )
    api = HfApi(token=token)  # endpoint: HF_ENDPOINT, else huggingface.co
    with _hub_errors(api, repo_id):
        info = _target_repo(api, repo_id, private, revision, repo_type, space_sdk)
        if check_target is not None:
            check_target(api, info)
        stale = [path for path in (s.rfilename for s in info.siblings or []) if ours(path) and path not in names]
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=stage,
            repo_type=repo_type,
            revision=revision,
            commit_message=commit_message,
            # exact names (escaped: no pattern of ours may match a file someone else put in the repo)
            allow_patterns=[glob.escape(name) for name in names],
            delete_patterns=[glob.escape(path) for path in stale] or None,
            # the stale files were listed at this commit, so nobody else's may land in between
            parent_commit=info.sha,
        )


def _target_repo(
    api: HfApi, repo_id: str, private: bool, branch: str | None, repo_type: str | None, space_sdk: str | None
) -> Any:
    """The repo's branch to push to, created if needed; refuses a private push to an existing public repo."""
    api.whoami()  # the endpoint answers and takes the token before anything is created
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type, space_sdk=space_sdk)
    info = api.repo_info(repo_id, repo_type=repo_type)
    if private and not info.private:
        raise PermissionError(
            f'{repo_id} already exists and is public: nothing was pushed. Make it private on the Hub first, '
            f'or push without --private.'
        )
    if branch:
        api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type=repo_type)
        info = api.repo_info(repo_id, revision=branch, repo_type=repo_type)
    return info


@contextlib.contextmanager
def _hub_errors(api: HfApi, repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub's auth and connection errors into one-line PermissionError / ConnectionError messages."""
    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise PermissionError(
                f'{api.endpoint} rejected the token (401 Unauthorized) while pushing to {repo_id}: set HF_TOKEN '
                f'to a valid token with write access, or log in again with `hf auth login`.'
            ) from e
        if status == 403:
            raise PermissionError(
                f'The token has no write access to {repo_id} on {api.endpoint} (403 Forbidden): push to a '
                f'namespace you own, or use a token with write access to it.'
            ) from e
        raise
    except _connection_errors() as e:
        reason = ' '.join(str(e).split()) or type(e).__name__
        raise ConnectionError(
            f'Could not reach the Hub at {api.endpoint} ({reason}) while pushing to {repo_id}: check HF_ENDPOINT '
            f'and the network connection, then push again.'
        ) from e


def _connection_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's HTTP client raises its own transport errors: httpx2 (2.x), httpx (1.x), requests (0.x)
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (('httpx2', 'TransportError'), ('httpx', 'TransportError'), ('requests', 'RequestException')):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _stage_upload(folder: Path, stage: Path, model_ref: str, allow_edited_card: bool) -> list[str]:
    """Copy the export files into stage, as regular files only; the card is rendered again to name model_ref."""
    real, names, others = _export_files(folder)
    links = {name: _copy_regular(real / name, stage / name, folder / name) for name in names}
    for png in (CURVE_NAME, GRID_NAME):
        if png in names and not (stage / png).read_bytes().startswith(PNG_MAGIC):
            raise ValueError(f'{folder / png} is not a PNG image: remove it, or export again.')
    linked = [name for name, count in links.items() if count != 1]
    if linked:  # a hard link is a regular file, and its other name may be anything (a secret)
        raise ValueError(
            f'{folder / linked[0]}: a hard link ({links[linked[0]]} names for one file): only files export wrote are '
            'pushed, never a link (even with --allow-edited-card). Export again.'
        )
    if CARD_NAME in names:
        path = stage / CARD_NAME
        try:
            text = path.read_text(encoding='utf-8')
        except UnicodeDecodeError as e:
            raise ValueError(f'{folder / CARD_NAME} is not UTF-8 text ({e}): fix it, or export again.') from e
        try:
            card = ModelCard(text)  # the Hub's own parse of the metadata block
        except (yaml.YAMLError, ValueError, TypeError, KeyError) as e:
            reason = ' '.join(str(e).split())
            raise ValueError(
                f'{folder / CARD_NAME}: the card metadata (the YAML front matter between the --- lines) is invalid '
                f'({reason}). Fix it, or export again; nothing was pushed.'
            ) from e
        rendered = render_for(card, text, model_ref)
        if rendered is None and not allow_edited_card:
            raise ValueError(
                f'{folder / CARD_NAME} is not the card export wrote (edited since, or by an older timm-smallvit): '
                'export again, or push it as it is with --allow-edited-card (allow_edited_card=True).'
            )
        if rendered is None:
            _logger.warning(
                '%s is not the card export wrote (edited since, or by an older timm-smallvit): it goes up as it is, '
                'its usage snippet not rendered again for %s.',
                folder / CARD_NAME,
                model_ref,
            )
        path.write_text(text if rendered is None else rendered, encoding='utf-8')
    if others:
        _logger.warning('Not uploading %s: only %s go up.', others, ', '.join(EXPORT_FILES))
    return names


def stage_files(folder: Path, names: Sequence[str], stage: Path) -> None:
    """Copy ``folder/name`` for each name into ``stage``, as regular files only, each read through a descriptor
    that never follows a link: a symbolic link anywhere on the path (the file, or a subfolder such as ``model/``) or
    a file with more than one hard link is refused, naming it. What is copied is what a check of ``stage`` sees and
    what an upload sends, even if the folder changes meanwhile.

    Args:
        folder: The folder (itself it may be a link: it is resolved once).
        names: Paths relative to folder, '/'-separated ('app.py', 'model/config.json').
        stage: An empty private folder.
    """
    real = folder.resolve()
    for name in names:
        shown = folder / name
        parent_fd = os.open(real, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
        try:
            *dirs, base = name.split('/')
            for part in dirs:
                try:
                    fd = os.open(
                        part,
                        os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0) | getattr(os, 'O_NOFOLLOW', 0),
                        dir_fd=parent_fd,
                    )
                except OSError as e:
                    raise ValueError(
                        f'{shown}: {part}/ is a link or not a folder ({e.strerror or e}): only files inside '
                        f'{folder} itself are read.'
                    ) from None
                os.close(parent_fd)
                parent_fd = fd
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            links = _copy_regular(Path(base), stage / name, shown, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
        if links != 1:
            raise ValueError(
                f'{shown}: a hard link ({links} names for one file): only files written for this are '
                'uploaded, never a link.'
            )


def _copy_regular(src: Path, dst: Path, shown: Path, dir_fd: int | None = None) -> int:
    # O_NOFOLLOW + fstat: what is copied is the regular file that was checked, even if the name changed since;
    # returns its link count, which that same fstat read
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0), dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP or (dir_fd is None and src.is_symlink()):
            raise ValueError(f'{shown} is a symbolic link: only regular files are pushed.') from e
        raise
    with os.fdopen(fd, 'rb') as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f'{shown} is not a regular file: remove it, or export again.')
        with dst.open('wb') as out:
            shutil.copyfileobj(f, out)
        return st.st_nlink


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm.create_model, with the smallvit family registered and exported files checked first.

    ``timm.create_model('hf-hub:user/name', pretrained=True)`` works after ``import timm_smallvit``; this does the
    same in one call. For 'hf-hub:' and 'local-dir:' names with pretrained=True it first checks config.json and
    model.safetensors (architecture, num_classes, corrupt or truncated weights), then builds the model once, through
    timm; when timm cannot load the export it says what does not fit (missing, unexpected or mis-shaped weights),
    and without kwargs it demands that the model holds model.safetensors exactly (nothing resampled or dropped).

    Args:
        model_name: A smallvit name, 'hf-hub:user/name[@revision]', or 'local-dir:/path/to/export'.
        pretrained: Load the weights.
        **kwargs: Passed to timm.create_model (num_classes, in_chans, img_size, global_pool, ...).
    """
    if not pretrained or not model_name.startswith(('local-dir:', 'hf-hub:')):
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if model_name.startswith('local-dir:'):
        folder = Path(model_name[len('local-dir:') :])
        real, _, _ = _export_files(folder)
        config_path, weights_path, where = real / CONFIG_NAME, real / WEIGHTS_NAME, str(folder)
    else:
        repo_id, revision = hf_split(model_name[len('hf-hub:') :])
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision))
        weights_path = Path(hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision))
        where = model_name
    config, state_dict = _read_export(config_path, weights_path, where)
    try:
        model = timm.create_model(model_name, pretrained=True, **kwargs)
    except Exception:
        # a broken export: the model config.json describes says which weights do not fit, in one line
        _check_weights(config, state_dict, where)
        raise
    if not kwargs:  # no adaptation asked for: the weights timm loaded must be model.safetensors as it is
        load_strict(model, state_dict, f'{where}: the weights in model.safetensors', config['architecture'])
    return model


def _check_files(config_path: Path, weights_path: Path, where: str) -> tuple[dict[str, Any], nn.Module]:
    """Check that config.json and model.safetensors describe one smallvit model timm can load: the config and it."""
    config, state_dict = _read_export(config_path, weights_path, where)
    return config, _check_weights(config, state_dict, where)


def _check_onnx(stage: Path, folder: Path, config: dict[str, Any], model: nn.Module) -> None:
    """model.onnx must be the ONNX file of these weights, as config.json describes them (or nothing is pushed)."""
    shown = str(folder / ONNX_NAME)
    pretrained_cfg, _, _ = load_model_config_from_path(stage)  # the preprocessing timm reads from config.json
    try:
        check_onnx_matches(stage / ONNX_NAME, config, resolve_data_config(pretrained_cfg=pretrained_cfg), model, shown)
    except ImportError as e:
        raise ValueError(
            f'{shown}: cannot be checked without onnx and onnxruntime ({e}): install timm-smallvit[onnx], or remove '
            'it from the folder. Nothing was pushed.'
        ) from None
    except ValueError as e:
        raise ValueError(f'{e} Nothing was pushed.') from None


def _read_export(config_path: Path, weights_path: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the tensors of model.safetensors, checked as far as they go without building the model."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f'{where}: config.json is not readable JSON ({e}). Export the model again.') from e
    if not isinstance(config, dict):
        raise ValueError(f'{where}: config.json is not a timm model config. Export the model again.')
    check_architecture(config.get('architecture'), f'{where}: config.json describes architecture')
    # timm reads these with .get/.update: anything but a JSON object would end in an AttributeError there
    for key in ('model_args', 'pretrained_cfg'):
        if key in config and not isinstance(config[key], dict):
            raise ValueError(
                f'{where}: config.json has {key}: {json.dumps(config[key])}, where timm expects a JSON object '
                f'({{...}}). Export the model again.'
            )
    model_args = dict(config.get('model_args', {}))
    num_classes = config.get('num_classes', model_args.get('num_classes'))
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)):
        raise ValueError(
            f'{where}: config.json has num_classes: {json.dumps(num_classes)}, where an integer is expected. '
            f'Export the model again.'
        )
    if model_args.get('num_classes', num_classes) != num_classes:
        raise ValueError(
            f'{where}: num_classes mismatch in config.json: {num_classes} at the top, '
            f'{model_args["num_classes"]} in model_args. Export the model again.'
        )
    try:
        state_dict = safetensors.torch.load_file(weights_path)  # as timm reads an export: the tensors as they are
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises SafetensorError, OSError or ValueError on bad files
        raise ValueError(f'{where}: model.safetensors is corrupt or truncated ({e}). Export the model again.') from e
    head = state_dict.get('head.weight')
    if head is None and num_classes:
        raise ValueError(
            f'{where}: model.safetensors: head.weight missing (the classifier of the {num_classes} classes '
            'config.json names). Export the model again.'
        )
    weight_classes = head.shape[0] if head is not None else 0
    if num_classes is not None and num_classes != weight_classes:
        raise ValueError(
            f'{where}: num_classes mismatch: config.json says {num_classes} classes, but the classifier in '
            f'model.safetensors (head.weight) has {weight_classes} outputs. Export the model again.'
        )
    _check_tensors(config, state_dict, where)
    _check_preprocessing(config, state_dict, f'{where}/config.json', weight_classes)
    return config, state_dict


def _check_preprocessing(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor], source: str, classes: int
) -> None:
    """The data config and label names config.json gives, checked against the weights' channels and classes."""
    pretrained_cfg = dict(config.get('pretrained_cfg') or {})
    first_conv = timm.models.get_pretrained_cfg_value(config['architecture'], 'first_conv') or 'patch_embed.proj'
    conv = state_dict.get(f'{first_conv}.weight')
    in_chans = int(conv.shape[1]) if conv is not None and conv.ndim == 4 else None
    check_data_config(pretrained_cfg, source=source, in_chans=in_chans, num_classes=classes)
    check_label_names(config.get('label_names'), source=source, num_classes=classes)


def _check_tensors(config: dict[str, Any], state_dict: dict[str, torch.Tensor], where: str) -> None:
    """What export would not write, refused before a model is built: non-float or non-finite weights, and a config
    asking for an image size its weights' position embedding cannot be (img_size 100000: a 160 GB model)."""
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point() and not name.endswith('num_batches_tracked'):  # BatchNorm's step count
            raise ValueError(
                f'{where}: model.safetensors: {name}: {str(tensor.dtype).removeprefix("torch.")}, where float weights '
                'are expected. Export the model again.'
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f'{where}: model.safetensors: {name}: not finite (NaN or inf). Export the model again.')
    size = dict(config.get('model_args', {})).get('img_size')
    pos_embed = state_dict.get('pos_embed')
    if size is None or pos_embed is None or pos_embed.ndim != 3:
        return
    sides = [size, size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
    if len(sides) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
        raise ValueError(f'{where}: config.json has img_size {json.dumps(size)}, where a size in pixels is expected.')
    # each position covers one patch; no smallvit patch (or stem stride) is near 64 px
    if sides[0] * sides[1] > pos_embed.shape[1] * 64 * 64:
        raise ValueError(
            f'{where}: config.json asks for img_size {size}, but model.safetensors holds {pos_embed.shape[1]} '
            'positions (pos_embed): not a size these weights were trained at, and the model would not fit in '
            'memory. Export the model again.'
        )


def _check_weights(config: dict[str, Any], state_dict: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Build the model a checked config.json (_read_export) describes, load state_dict into it strictly: the model."""
    model_args = dict(config.get('model_args', {}))
    num_classes = config.get('num_classes', model_args.get('num_classes'))
    try:
        if num_classes is not None:
            model_args['num_classes'] = num_classes
        model = timm.create_model(config['architecture'], **model_args)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{where}: config.json model_args do not build {config["architecture"]}: {e}') from e
    load_strict(model, state_dict, f'{where}: the weights in model.safetensors', config['architecture'])
    return model


def _export_files(folder: Path) -> tuple[Path, list[str], list[str]]:
    """The folder's real path, the export files it holds, and its other entries; refuses symbolic links.

    The folder itself may be a link (resolved once); the files in it are taken only as regular files, so that
    nothing outside the folder (a token file, /etc/passwd) is ever read or uploaded through a link.
    """
    if not folder.is_dir():
        raise NotADirectoryError(f'{folder} is not a folder: give the OUT_DIR written by `smallvit export`.')
    real = folder.resolve()
    names, others = [], []
    with os.scandir(real) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name not in EXPORT_FILES:
                others.append(entry.name)
            elif entry.is_symlink():
                raise ValueError(
                    f'{folder / entry.name} is a symbolic link: only regular files are read or pushed, never what a '
                    f'link points to. Replace it with the file itself (or remove it).'
                )
            elif not entry.is_file(follow_symlinks=False):
                raise ValueError(f'{folder / entry.name} is not a regular file: remove it, or export again.')
            else:
                names.append(entry.name)
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if n not in names]
    if missing:
        raise FileNotFoundError(
            f'{folder} has no {" or ".join(missing)}: give a folder written by `smallvit export` (timm loads '
            f'model.safetensors and config.json).'
        )
    return real, names, others
