"""``smallvit space``: a Hugging Face Space folder that serves ``smallvit app`` over one model, and its push.

    write_space     a model (export folder, Hub repo, pretrained name, training checkpoint or ``.onnx`` file) ->
                    OUT_DIR: app.py (a few lines calling :func:`timm_smallvit.app.launch`), requirements.txt (the
                    package and the versions it was tested with), README.md (the Spaces YAML header) and the model's
                    files, or a reference to its Hub repo
    push_space      that folder -> a Space repo (repo_type='space') through :func:`hub.upload_staged`, with push's
                    guarantees: only the files written here, regular files only, the token never printed

The folder is written under a temporary name beside OUT_DIR and renamed into place at the end. This module does not
import Gradio: the Space's ``sdk_version`` is the installed Gradio's version, read from its metadata.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, SpaceCard, SpaceCardData, hf_hub_download
from huggingface_hub.utils import validate_repo_id

from .export import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, export_checkpoint
from .hub import stage_files, upload_staged
from .onnx_export import OnnxClassifier
from .predict import load_model

__all__ = ['MODEL_DIR', 'SPACE_FILES', 'SPACE_TAG', 'push_space', 'write_space']

_logger = logging.getLogger(__name__)

APP_FILE = 'app.py'
SPACE_FILES = (APP_FILE, 'requirements.txt', 'README.md')  # always written
MODEL_DIR = 'model'  # an export's files, when the model is not on the Hub or in the package
MODEL_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)  # what the app reads of an export
ONNX_FILE = 'model.onnx'
SPACE_TAG = 'timm-smallvit'  # in the card's tags: marks a Space this module wrote (push replaces only such an app)
SHORT_DESCRIPTION = 'What a small ViT sees: top labels and attention'  # the Hub allows 60 characters
_CHECKPOINT_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.safetensors')

APP_TEMPLATE = '''"""A Space written by `smallvit space` (timm-smallvit {version}): `smallvit app` over one model."""

from pathlib import Path

from timm_smallvit.app import launch

HERE = Path(__file__).resolve().parent
launch([{model}])  # host, port: $GRADIO_SERVER_NAME, $GRADIO_SERVER_PORT (Spaces set them)
'''


def write_space(model: str, out_dir: str | os.PathLike, *, overwrite: bool = False, package: str | None = None) -> Path:
    """Write a Space folder serving ``smallvit app`` over ``model``; the model is loaded first, so a Space is never
    written for a model that does not load.

    Args:
        model: What ``smallvit predict`` takes: ``local-dir:<export>`` (or the folder), ``hf-hub:<repo>`` (the Space
            refers to the repo, named in its card's ``models:``), a pretrained name (the weights ship with the
            package), a training checkpoint (exported into the Space) or an ``.onnx`` file (copied).
        out_dir: The folder to write; it must not exist or be empty, unless overwrite.
        overwrite: Replace a non-empty out_dir.
        package: The requirement line for the package (default ``timm-smallvit[app]==<this version>``; a wheel URL
            or a git URL where the package is not on PyPI).

    Returns:
        The written folder.
    """
    from . import __version__

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f'{out}: exists and is not empty: choose a new folder, or pass --overwrite.')
    gradio_version = _installed('gradio')
    if gradio_version is None:
        raise ValueError("smallvit space needs Gradio (the app extra): pip install 'timm-smallvit[app]'.")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f'.{out.name}.space-', dir=out.parent))
    try:
        ref, facts = _stage_model(model, stage)
        extras = ['app', 'onnx'] if (stage / ONNX_FILE).exists() else ['app']
        (stage / APP_FILE).write_text(APP_TEMPLATE.format(version=__version__, model=ref))
        (stage / 'requirements.txt').write_text(_requirements(extras, package or f'timm-smallvit[app]=={__version__}'))
        (stage / 'README.md').write_text(str(_card(model, facts, gradio_version)) + '\n')
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _stage_model(model: str, stage: Path) -> tuple[str, dict[str, Any]]:
    """The model's files into stage (checked by loading them from there); returns app.py's model expression and the
    facts the card quotes."""
    folder = Path(model.removeprefix('local-dir:'))
    if model.lower().endswith('.onnx'):
        source = Path(model)
        stage_files(source.parent, [source.name], stage)
        (stage / source.name).rename(stage / ONNX_FILE)
        onnx = OnnxClassifier(stage / ONNX_FILE)  # refuses a file without smallvit's metadata
        return f'str(HERE / "{ONNX_FILE}")', {'architecture': onnx.architecture, 'labels': onnx.label_names}
    if model.startswith('local-dir:') or folder.is_dir():
        present = [name for name in MODEL_FILES if (folder / name).exists()]
        stage_files(folder, present, stage / MODEL_DIR)
    elif Path(model).is_file() or model.endswith(_CHECKPOINT_SUFFIXES):
        export_checkpoint(model, stage / MODEL_DIR)
        for extra in sorted((stage / MODEL_DIR).iterdir()):  # the app reads only these
            if extra.name not in MODEL_FILES:
                extra.unlink()
    if (stage / MODEL_DIR).is_dir():
        loaded = load_model(f'local-dir:{stage / MODEL_DIR}')
        expression = 'f"local-dir:{HERE / ' + repr(MODEL_DIR) + '}"'
    else:  # a Hub repo or a pretrained name: the Space loads it as the app would here
        loaded = load_model(model)
        expression = repr(model)
    cfg = loaded.pretrained_cfg
    return expression, {
        'architecture': cfg.get('architecture', ''),
        'labels': list(cfg.get('label_names') or []),
        'license': cfg.get('license'),
    }


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name).split('+')[0]  # a local label (+cpu) is not on PyPI
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirements(extras: list[str], package: str) -> str:
    """The package's line, then each requirement it has (with those extras) pinned to the installed version."""
    from packaging.requirements import Requirement

    lines = [
        '# Written by `smallvit space`: timm-smallvit and the versions it was tested with (Spaces install these).',
        package,
    ]
    for text in importlib.metadata.requires('timm-smallvit') or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({'extra': e}) for e in extras):
            continue
        version = _installed(req.name)
        if version is not None:
            lines.append(f'{req.name}=={version}')
    return '\n'.join(dict.fromkeys(lines)) + '\n'


def _card(model: str, facts: dict[str, Any], gradio_version: str) -> SpaceCard:
    repo = None
    if model.startswith('hf-hub:'):
        repo = model.removeprefix('hf-hub:').split('@')[0]
    arch = facts['architecture'] or 'smallvit'
    data = SpaceCardData(
        title=f'smallvit: {arch}'[:60],
        sdk='gradio',
        sdk_version=gradio_version,
        python_version=f'{sys.version_info.major}.{sys.version_info.minor}',
        app_file=APP_FILE,
        license=facts.get('license') or 'apache-2.0',
        models=[repo] if repo else None,
        tags=[SPACE_TAG, 'timm', 'image-classification', 'vision-transformer'],
        short_description=SHORT_DESCRIPTION,
        emoji='👗',
        colorFrom='indigo',
        colorTo='gray',
        pinned=False,
    )
    labels = ', '.join(_plain(label) for label in facts['labels']) or 'its classes'
    code = ''.join(c for c in arch if c.isprintable() and c != '`')  # in a code span only a backtick could end it
    body = (
        f'# What `{code}` sees\n\n'
        f"Upload, paste or draw an image: the top labels ({labels}), and where the model looks (its last block's "
        'attention and the attention rollout over the image).\n\n'
        'Written by `smallvit space` from [timm-smallvit](https://github.com/timm-smallvit/timm-smallvit); '
        "`app.py` calls the package's app. The prediction endpoint is `/predict`:\n\n"
        '```python\nfrom gradio_client import Client, handle_file\n\n'
        "Client('<this Space>').predict(handle_file('shoe.png'), api_name='/predict')\n```\n"
    )
    return SpaceCard(f'---\n{data.to_yaml()}\n---\n\n{body}')


def _plain(text: str) -> str:
    # names from files, shown in the card as text: no Markdown or HTML of their own
    return ''.join(f'\\{c}' if c in '\\*_[]<>|' else c for c in str(text) if c.isprintable() and c != '`')


def push_space(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    overwrite: bool = False,
) -> CommitInfo:
    """Upload a folder written by :func:`write_space` to a Space repo (created with the gradio SDK if needed), as one
    commit: the files write_space writes, as regular files (links refused), checked before anything is sent.

    Args:
        folder: The Space folder.
        repo_id: 'user/name' of the Space.
        private: Create it private; an existing public Space is refused.
        commit_message: The commit title.
        token: Hub token; default HF_TOKEN or the stored `hf auth login` token.
        overwrite: Replace the app of an existing Space that `smallvit space` did not write.
    """
    folder = Path(folder)
    if repo_id.count('/') != 1:
        raise ValueError(f"repo_id {repo_id!r} must be 'user/name' or 'org/name' (the namespace names the owner).")
    validate_repo_id(repo_id)
    names = [name for name in (*SPACE_FILES, ONNX_FILE) if (folder / name).exists() or (folder / name).is_symlink()]
    names += [f'{MODEL_DIR}/{name}' for name in MODEL_FILES if (folder / MODEL_DIR / name).exists()]
    missing = [name for name in SPACE_FILES if name not in names]
    if missing:
        raise FileNotFoundError(f'{folder}: no {", ".join(missing)}: give a folder written by `smallvit space`.')
    others = sorted(
        str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file() and str(p.relative_to(folder)) not in names
    )
    if others:
        _logger.warning('Not uploading %s: only the files `smallvit space` writes go up.', ', '.join(others))
    with tempfile.TemporaryDirectory(prefix='smallvit-space-') as tmp:
        stage = Path(tmp)
        stage_files(folder, names, stage)
        try:
            SpaceCard((stage / 'README.md').read_text(encoding='utf-8'))  # the Hub's own parse of the header
        except Exception as e:
            raise ValueError(f'{folder / "README.md"}: not a Space card ({" ".join(str(e).split())}).') from None

        def check_target(api: HfApi, info: Any) -> None:
            siblings = {s.rfilename for s in info.siblings or []}
            if overwrite or APP_FILE not in siblings or _written_here(repo_id, info.sha, api.token):
                return
            raise FileExistsError(
                f'{repo_id}: the Space has an {APP_FILE} that `smallvit space` did not write: nothing was pushed. '
                'Push to a new Space, or pass --overwrite to replace its app.'
            )

        return upload_staged(
            stage,
            repo_id,
            names,
            ours=lambda path: path in (*SPACE_FILES, ONNX_FILE) or path.startswith(f'{MODEL_DIR}/'),
            commit_message=commit_message or 'Upload a timm-smallvit app (smallvit space)',
            repo_type='space',
            space_sdk='gradio',
            private=private,
            token=token,
            check_target=check_target,
        )


def _written_here(repo_id: str, revision: str | None, token: Any) -> bool:
    """Whether the Space's card at revision carries SPACE_TAG (an app this module wrote)."""
    try:
        path = hf_hub_download(repo_id, 'README.md', repo_type='space', revision=revision, token=token)
        card = SpaceCard.load(path)
    except Exception:  # no card, or not one: not ours
        return False
    return SPACE_TAG in (card.data.tags or [])
