"""`smallvit space`: a Hugging Face Space folder from any model, and its push to the loopback Hub (tests/hub_server.py).

The written app.py is run as a Space runs it (its `launch` served in-process instead of blocking) and asked through
gradio_client; `smallvit predict` on the same weights is the oracle. The push goes through the real huggingface_hub
client to the test server, which keeps Spaces apart from models as the Hub does.
"""

import importlib.metadata
import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip('gradio', reason="Gradio is the app extra: pip install -e '.[app]'")

from gradio_client import Client, handle_file
from huggingface_hub import HfApi, SpaceCard

from tests.hub_server import HubServer, use_hub
from timm_smallvit import app as app_module
from timm_smallvit import push_to_hub
from timm_smallvit.cli import main
from timm_smallvit.smallvit import PRETRAINED_DIR
from timm_smallvit.space import push_space, write_space

from .test_app import assert_same_as_predict, free_port, predict_records

ALICE = 'hf_alice_0123456789abcdefghijklmnopqrstuv'  # fake tokens, valid on the test server only
BOB = 'hf_bob_0123456789abcdefghijklmnopqrstuvwxyz'
MODEL = 'smallvit_nano_patch4_28.fmnist'
EXPORT = PRETRAINED_DIR / MODEL  # the shipped weights are an export folder
EXAMPLE = sorted(app_module.EXAMPLES_DIR.glob('*.png'))[0]
WRITTEN = ['README.md', 'app.py', 'model/README.md', 'model/config.json', 'model/model.safetensors', 'requirements.txt']


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def hub():
    with HubServer(tokens={ALICE: 'alice', BOB: 'bob'}) as server:
        yield server


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    monkeypatch.setenv('GRADIO_TEMP_DIR', str(tmp_path / 'gradio'))
    return use_hub(monkeypatch, hub, tmp_path, token=ALICE)


@pytest.fixture(scope='module')
def space(tmp_path_factory) -> Path:
    return write_space(f'local-dir:{EXPORT}', tmp_path_factory.mktemp('spaces') / 'nano')


def run_space_app(folder: Path, monkeypatch):
    """Run folder/app.py as Spaces run it, its launch() served in this process on a free port: (the app, its URL)."""
    served = []

    def launch(models, host=None, port=None):
        demo = app_module.build_app(models)
        served.append((demo, app_module.serve(demo, '127.0.0.1', free_port(), block=False)))

    monkeypatch.setattr(app_module, 'launch', launch)
    runpy.run_path(str(folder / 'app.py'), run_name='__main__')
    return served[0]


def test_a_space_from_an_export_holds_it_and_serves_it(space, env, monkeypatch, tmp_path):
    files = listing(space)
    assert sorted(files) == WRITTEN
    for name in ('README.md', 'config.json', 'model.safetensors'):
        assert files[f'model/{name}'] == (EXPORT / name).read_bytes()

    card = SpaceCard.load(space / 'README.md')
    data = card.data
    assert data.sdk == 'gradio' and data.sdk_version == importlib.metadata.version('gradio')
    assert data.app_file == 'app.py' and data.python_version == f'{sys.version_info.major}.{sys.version_info.minor}'
    assert data.license == 'apache-2.0' and data.models is None and 'timm-smallvit' in data.tags
    assert 0 < len(data.short_description) <= 60  # the Hub's limit
    assert 'smallvit_nano_patch4_28' in data.title and "api_name='/predict'" in card.text

    lines = files['requirements.txt'].decode().splitlines()
    assert lines[1] == f'timm-smallvit[app]=={importlib.metadata.version("timm-smallvit")}'
    pins = dict(line.split('==') for line in lines[2:])
    for name in ('torch', 'timm', 'gradio', 'gradio-client', 'huggingface-hub', 'safetensors'):
        assert pins[name] == importlib.metadata.version(name).split('+')[0]
    assert 'onnxruntime' not in pins

    demo, url = run_space_app(space, monkeypatch)
    try:
        label, _, _ = Client(url, verbose=False).predict(handle_file(EXAMPLE), api_name='/predict')
    finally:
        demo.close()
    assert_same_as_predict(label, predict_records(EXAMPLE)[EXAMPLE.name])


def test_a_hub_model_is_named_not_copied(hub, env, tmp_path):
    push_to_hub(EXPORT, 'alice/nano', allow_edited_card=True)
    out = write_space('hf-hub:alice/nano', tmp_path / 'space')
    assert sorted(listing(out)) == ['README.md', 'app.py', 'requirements.txt']
    assert "launch(['hf-hub:alice/nano'])" in (out / 'app.py').read_text()
    assert SpaceCard.load(out / 'README.md').data.models == ['alice/nano']


def test_an_onnx_file_is_copied_and_its_runtime_required(tmp_path):
    from .test_app import tiny_onnx

    out = write_space(str(tiny_onnx(tmp_path)), tmp_path / 'space')
    assert sorted(listing(out)) == ['README.md', 'app.py', 'model.onnx', 'requirements.txt']
    assert (out / 'model.onnx').read_bytes() == (tmp_path / 'tiny.onnx').read_bytes()
    assert 'onnxruntime==' in (out / 'requirements.txt').read_text()


def test_push_publishes_the_written_files_as_a_space(hub, env, space, capsys):
    commit = push_space(space, 'alice/nano-space')
    files = hub.files('spaces/alice/nano-space')
    assert sorted(files) == sorted(['.gitattributes', *WRITTEN])  # the Hub's own README.md replaced
    assert all(files[name] == (space / name).read_bytes() for name in WRITTEN)
    assert 'alice/nano-space' not in hub.repos  # a Space, not a model repo
    assert commit.commit_url == f'{hub.endpoint}/spaces/alice/nano-space/commit/{commit.oid}'
    info = HfApi().space_info('alice/nano-space')
    assert info.sdk == 'gradio' and not info.private
    assert SpaceCard.load('alice/nano-space', repo_type='space').data.sdk == 'gradio'  # as the Hub serves it
    again = push_space(space, 'alice/nano-space')
    assert again.oid == commit.oid  # nothing changed: no new commit

    assert main(['space', f'local-dir:{EXPORT}', str(space.parent / 'cli'), '--push', '--repo-id', 'alice/cli']) == 0
    out = capsys.readouterr()
    assert f'{hub.endpoint}/spaces/alice/cli/commit/' in out.out
    assert ALICE not in out.out + out.err and ALICE not in json.dumps(hub.files('spaces/alice/cli'), default=str)
    assert hub.unhandled == []


@pytest.mark.parametrize('link', ['symlinked file', 'symlinked folder', 'hard link'])
def test_links_are_refused_and_nothing_is_sent(link, hub, env, space, tmp_path):
    folder = Path(shutil.copytree(space, tmp_path / 'space'))
    secret = tmp_path / 'token.txt'
    secret.write_text(ALICE)
    if link == 'symlinked file':
        (folder / 'app.py').unlink()
        (folder / 'app.py').symlink_to(secret)
    elif link == 'symlinked folder':
        outside = Path(shutil.copytree(folder / 'model', tmp_path / 'elsewhere'))
        shutil.rmtree(folder / 'model')
        (folder / 'model').symlink_to(outside)
    else:
        (folder / 'requirements.txt').unlink()
        os.link(secret, folder / 'requirements.txt')
    sent = len(hub.requests)
    with pytest.raises(ValueError, match='link'):
        push_space(folder, 'alice/linked')
    assert len(hub.requests) == sent and 'spaces/alice/linked' not in hub.repos


def test_an_app_smallvit_space_did_not_write_is_not_replaced_silently(hub, env, space, tmp_path):
    api = HfApi()
    api.create_repo('alice/theirs', repo_type='space', space_sdk='gradio')
    (tmp_path / 'app.py').write_text('print("their own app")\n')
    api.upload_file(
        path_or_fileobj=tmp_path / 'app.py', path_in_repo='app.py', repo_id='alice/theirs', repo_type='space'
    )
    head = hub.repos['spaces/alice/theirs'].branches['main']
    with pytest.raises(
        FileExistsError, match=r'has an app\.py that `smallvit space` did not write: nothing was pushed'
    ):
        push_space(space, 'alice/theirs')
    assert hub.repos['spaces/alice/theirs'].branches['main'] == head
    push_space(space, 'alice/theirs', overwrite=True)
    assert hub.file('spaces/alice/theirs', 'app.py') == (space / 'app.py').read_bytes()
    push_space(space, 'alice/theirs')  # now it is ours: no flag needed


def test_an_out_dir_is_not_overwritten_silently_and_a_bad_model_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'space'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    assert main(['space', MODEL, str(out)]) == 1
    assert 'exists and is not empty' in capsys.readouterr().err and listing(out) == {'notes.txt': b'mine'}
    assert main(['space', MODEL, str(out), '--overwrite']) == 0
    assert sorted(listing(out)) == ['README.md', 'app.py', 'requirements.txt']
    assert f"launch(['{MODEL}'])" in (out / 'app.py').read_text()

    assert main(['space', 'resnet50.a1_in1k', str(tmp_path / 'bad')]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'not a smallvit name' in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['space']  # no folder, no temporary one left


def test_push_needs_a_repo_id(tmp_path, capsys):
    assert main(['space', MODEL, str(tmp_path / 's'), '--push']) == 1
    assert '--push needs --repo-id' in capsys.readouterr().err and not (tmp_path / 's').exists()
