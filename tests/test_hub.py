"""Push to and pull from a Hub-protocol server on 127.0.0.1 (tests/hub_server.py), with the real huggingface_hub client.

Round trip: training checkpoint -> export -> push -> timm.create_model('hf-hub:...') -> identical logits. Also private
repos, tokens, branches, re-pushes, and folders that must be refused before anything is sent.
"""

import argparse
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, login
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError

import timm_smallvit
from tests.hub_server import HubServer, git_blob_oid, iter_files, make_training_run, use_hub
from timm_smallvit import cli
from timm_smallvit.data import FASHION_MNIST_CLASSES

ALICE = 'hf_alice_0123456789abcdefghijklmnopqrstuv'  # fake tokens, valid on the test server only
BOB = 'hf_bob_0123456789abcdefghijklmnopqrstuvwxyz'
WRONG = 'hf_wrong_0123456789abcdefghijklmnopqrstuvw'
MODEL = 'smallvit_nano_patch4_28'
UPLOADED = ['.gitattributes', 'README.md', 'config.json', 'learning_curve.png', 'model.safetensors']


def load_ckpt(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def reference_logits(checkpoint: Path, key: str = 'state_dict') -> torch.Tensor:
    model = timm.create_model(MODEL, in_chans=1, img_size=28)
    model.load_state_dict(load_ckpt(checkpoint)[key])
    return logits(model)


def logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def python_block(card_text: str) -> str:
    return re.search(r'```python\n(.*?)```', card_text, re.S).group(1)


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    # tiny models: on a busy 2-core machine a 2-thread forward took 0.5 s, a 1-thread one 5 ms
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def hub():
    with HubServer(tokens={ALICE: 'alice', BOB: 'bob'}) as server:
        yield server


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> Path:
    return make_training_run(tmp_path_factory.mktemp('run'), model_ema=False)


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory) -> Path:
    return timm_smallvit.export_checkpoint(run / 'model_best.pth.tar', tmp_path_factory.mktemp('exports') / 'best')


@pytest.fixture
def env(hub, tmp_path, monkeypatch) -> dict[str, str]:
    """Alice's token in HF_TOKEN, a fresh HF cache per test."""
    return use_hub(monkeypatch, hub, tmp_path, token=ALICE)


def test_round_trip_checkpoint_export_push_pull(hub, env, run, exported, monkeypatch, capsys):
    before = snapshot(exported)
    commit = timm_smallvit.push_to_hub(exported, 'alice/nano-fmnist')
    assert snapshot(exported) == before  # the export folder is left as it was

    repo = hub.repos['alice/nano-fmnist']
    assert not repo.private and commit.oid == repo.branches['main'] and len(commit.oid) == 40
    assert commit.commit_url == f'{hub.endpoint}/alice/nano-fmnist/commit/{commit.oid}'
    files = hub.files('alice/nano-fmnist')
    assert sorted(files) == UPLOADED
    for name in ('model.safetensors', 'config.json', 'learning_curve.png'):
        assert files[name] == before[name]
    pushed_card = files['README.md'].decode()
    assert pushed_card == before['README.md'].decode().replace(f"'local-dir:{exported}'", "'hf-hub:alice/nano-fmnist'")

    expected = reference_logits(run / 'model_best.pth.tar')
    model = timm.create_model('hf-hub:alice/nano-fmnist', pretrained=True)
    assert torch.equal(logits(model), expected)
    assert model.pretrained_cfg['label_names'] == list(FASHION_MNIST_CLASSES)
    assert model.pretrained_cfg['hf_hub_id'] == 'alice/nano-fmnist'
    assert torch.equal(logits(timm_smallvit.create_model('hf-hub:alice/nano-fmnist', pretrained=True)), expected)

    # the card, as the Hub serves it, parses and carries the eval results; its snippet runs as written
    card = ModelCard.load('alice/nano-fmnist')
    top1 = next(r for r in card.data.eval_results if r.metric_type == 'accuracy')
    assert top1.metric_value == load_ckpt(run / 'model_best.pth.tar')['metric']
    code = python_block(pushed_card)
    assert "timm.create_model('hf-hub:alice/nano-fmnist', pretrained=True)" in code
    monkeypatch.chdir(env['HF_HOME'])
    exec(compile(code, 'README.md', 'exec'), {'__name__': '__main__'})
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert hub.unhandled == []


def test_unchanged_repush_is_no_commit_and_changed_weights_are_a_new_one(hub, env, run, exported, tmp_path):
    first = timm_smallvit.push_to_hub(exported, 'alice/versions')
    again = timm_smallvit.push_to_hub(exported, 'alice/versions')
    assert again.oid == first.oid and len(hub.history('alice/versions')) == 2  # initial commit + one upload

    best_epoch = load_ckpt(run / 'model_best.pth.tar')['epoch']
    other = next(p for p in sorted(run.glob('*.pth.tar')) if load_ckpt(p)['epoch'] != best_epoch)
    later = timm_smallvit.export_checkpoint(other, tmp_path / 'other')
    second = timm_smallvit.push_to_hub(later, 'alice/versions', commit_message='weights of another epoch')
    history = hub.history('alice/versions')
    assert second.oid != first.oid and [c.oid for c in history[:2]] == [second.oid, first.oid]
    assert history[0].title == 'weights of another epoch'
    assert [c.commit_id for c in HfApi().list_repo_commits('alice/versions')][:2] == [second.oid, first.oid]

    new = reference_logits(other)
    old = reference_logits(run / 'model_best.pth.tar')
    assert not torch.equal(new, old)
    assert torch.equal(logits(timm.create_model('hf-hub:alice/versions', pretrained=True)), new)
    assert torch.equal(logits(timm.create_model(f'hf-hub:alice/versions@{first.oid}', pretrained=True)), old)


def test_push_to_a_branch_leaves_main_alone(hub, env, run, exported, monkeypatch, capsys):
    commit = timm_smallvit.push_to_hub(exported, 'alice/branches', revision='v2')
    repo = hub.repos['alice/branches']
    assert repo.branches['v2'] == commit.oid
    assert sorted(hub.files('alice/branches', 'main')) == ['.gitattributes']
    assert sorted(hub.files('alice/branches', 'v2')) == UPLOADED
    refs = HfApi().list_repo_refs('alice/branches')
    assert {b.name: b.target_commit for b in refs.branches}['v2'] == commit.oid

    expected = reference_logits(run / 'model_best.pth.tar')
    assert torch.equal(logits(timm.create_model('hf-hub:alice/branches@v2', pretrained=True)), expected)
    with pytest.raises(HfHubHTTPError, match='Entry Not Found'):
        timm.create_model('hf-hub:alice/branches', pretrained=True)  # main has no model
    code = python_block(hub.file('alice/branches', 'README.md', 'v2').decode())
    assert "timm.create_model('hf-hub:alice/branches@v2', pretrained=True)" in code
    monkeypatch.chdir(env['HF_HOME'])
    exec(compile(code, 'README.md', 'exec'), {'__name__': '__main__'})
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_private_repo_is_denied_without_the_owners_token(hub, env, run, exported, tmp_path, monkeypatch):
    timm_smallvit.push_to_hub(exported, 'alice/secret', private=True)
    assert hub.repos['alice/secret'].private
    expected = reference_logits(run / 'model_best.pth.tar')

    use_hub(monkeypatch, hub, tmp_path / 'anonymous', token=None)
    with pytest.raises(RepositoryNotFoundError):
        timm.create_model('hf-hub:alice/secret', pretrained=True)
    use_hub(monkeypatch, hub, tmp_path / 'bob', token=BOB)
    with pytest.raises(RepositoryNotFoundError):
        timm_smallvit.create_model('hf-hub:alice/secret', pretrained=True)
    use_hub(monkeypatch, hub, tmp_path / 'wrong', token=WRONG)
    with pytest.raises(HfHubHTTPError, match='401'):
        timm.create_model('hf-hub:alice/secret', pretrained=True)
    use_hub(monkeypatch, hub, tmp_path / 'alice', token=ALICE)
    assert torch.equal(logits(timm.create_model('hf-hub:alice/secret', pretrained=True)), expected)


def test_private_push_to_an_existing_public_repo_is_refused(hub, env, exported):
    timm_smallvit.push_to_hub(exported, 'alice/public')
    head = hub.repos['alice/public'].branches['main']
    with pytest.raises(PermissionError, match='already exists and is public: nothing was pushed'):
        timm_smallvit.push_to_hub(exported, 'alice/public', private=True, commit_message='should not land')
    assert hub.repos['alice/public'].branches['main'] == head


def test_wrong_token_and_foreign_namespace_are_denied(hub, env, exported, monkeypatch, tmp_path):
    use_hub(monkeypatch, hub, tmp_path, token=WRONG)
    with pytest.raises(PermissionError, match=r'rejected the token \(401 Unauthorized\)') as info:
        timm_smallvit.push_to_hub(exported, 'alice/wrong-token')
    assert WRONG not in str(info.value) and 'alice/wrong-token' not in hub.repos

    use_hub(monkeypatch, hub, tmp_path, token=ALICE)
    timm_smallvit.push_to_hub(exported, 'alice/theirs')
    head = hub.repos['alice/theirs'].branches['main']
    use_hub(monkeypatch, hub, tmp_path, token=BOB)
    with pytest.raises(PermissionError, match=r'no write access to alice/theirs .*403'):
        timm_smallvit.push_to_hub(exported, 'alice/theirs')
    assert hub.repos['alice/theirs'].branches['main'] == head


def test_missing_token_fails_before_any_request(hub, exported, tmp_path, monkeypatch):
    use_hub(monkeypatch, hub, tmp_path, token=None)
    sent = len(hub.requests)
    with pytest.raises(LocalTokenNotFoundError, match=r'No Hugging Face token found: log in with `hf auth login`'):
        timm_smallvit.push_to_hub(exported, 'alice/no-token', private=True)
    assert len(hub.requests) == sent and 'alice/no-token' not in hub.repos


@pytest.mark.parametrize(
    ('repo_id', 'message'),
    [('no-namespace', r"must be 'user/name' or 'org/name'"), ('alice/bad name', 'Repo id must use alphanumeric chars')],
)
def test_bad_repo_id_fails_before_any_request(hub, env, exported, repo_id, message):
    sent = len(hub.requests)
    with pytest.raises(ValueError, match=message):
        timm_smallvit.push_to_hub(exported, repo_id)
    assert len(hub.requests) == sent


def test_stored_login_is_used_without_hf_token(hub, exported, tmp_path, monkeypatch):
    use_hub(monkeypatch, hub, tmp_path, token=None)
    login(token=ALICE, skip_if_logged_in=False)  # what `hf auth login` does: checks whoami, stores the token
    assert Path(os.environ['HF_TOKEN_PATH']).read_text().strip() == ALICE
    commit = timm_smallvit.push_to_hub(exported, 'alice/logged-in', private=True)
    assert hub.repos['alice/logged-in'].private and hub.history('alice/logged-in')[0].oid == commit.oid


def test_card_edited_after_export_goes_up_as_it_is(hub, env, exported, tmp_path, caplog):
    folder = shutil.copytree(exported, tmp_path / 'export')
    card = (folder / 'README.md').read_text()
    edited = card.replace('## Usage', "A note naming 'hf-hub:someone/else'.\n\n## Usage")
    assert edited != card
    (folder / 'README.md').write_text(edited)
    with caplog.at_level(logging.WARNING, logger='timm_smallvit.hub'):
        timm_smallvit.push_to_hub(folder, 'alice/edited-card', allow_edited_card=True)  # refused without it
    assert hub.file('alice/edited-card', 'README.md').decode() == edited  # nothing in it rewritten
    assert 'README.md is not the card export wrote' in caplog.text and 'hf-hub:alice/edited-card' in caplog.text


def test_pickle_files_are_never_uploaded(hub, env, exported, tmp_path, caplog):
    folder = shutil.copytree(exported, tmp_path / 'export')
    for name in ('pytorch_model.bin', 'model_best.pth.tar', 'weights.pt', 'extra.pkl'):
        (folder / name).write_bytes(b'\x80\x04pickle')
    with caplog.at_level(logging.WARNING, logger='timm_smallvit.hub'):
        timm_smallvit.push_to_hub(folder, 'alice/no-pickles')
    assert sorted(hub.files('alice/no-pickles')) == UPLOADED
    assert "Not uploading ['extra.pkl', 'model_best.pth.tar', 'pytorch_model.bin', 'weights.pt']" in caplog.text


def _break(folder: Path, kind: str) -> None:
    config_path = folder / 'config.json'
    config = json.loads(config_path.read_text())
    weights = folder / 'model.safetensors'
    if kind == 'corrupt_weights':
        weights.write_bytes(b'\x00' * 64 + weights.read_bytes()[64:])
    elif kind == 'truncated_weights':
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == 'other_architecture':
        config['architecture'] = 'resnet18'
        config_path.write_text(json.dumps(config))
    elif kind == 'num_classes_config':
        config['num_classes'] = 5
        config_path.write_text(json.dumps(config))
    elif kind == 'num_classes_weights':
        state_dict = safetensors.torch.load_file(weights)
        state_dict['head.weight'], state_dict['head.bias'] = state_dict['head.weight'][:5], state_dict['head.bias'][:5]
        safetensors.torch.save_file(state_dict, weights)
    elif kind == 'other_variant':
        config['architecture'] = 'smallvit_tiny_patch4_28'
        config_path.write_text(json.dumps(config))
    elif kind == 'no_weights':
        weights.unlink()
    elif kind == 'no_config':
        config_path.unlink()
    elif kind.startswith('model_args_'):
        config['model_args'] = {'null': None, 'list': [10, 1], 'string': 'num_classes=10'}[kind[len('model_args_') :]]
        config_path.write_text(json.dumps(config))
    elif kind == 'pretrained_cfg_list':
        config['pretrained_cfg'] = []
        config_path.write_text(json.dumps(config))
    elif kind == 'num_classes_string':
        config['num_classes'] = '10'
        config_path.write_text(json.dumps(config))


BAD_FOLDERS = {
    'corrupt_weights': (ValueError, r'model.safetensors is corrupt or truncated'),
    'truncated_weights': (ValueError, r'model.safetensors is corrupt or truncated'),
    'other_architecture': (ValueError, r"config.json describes architecture 'resnet18', which is not a smallvit model"),
    # exports write num_classes only at the top (transformers fails on a second one in model_args): the weights disagree
    'num_classes_config': (ValueError, r'num_classes mismatch: config.json says 5 classes, but .* has 10 outputs'),
    'num_classes_weights': (ValueError, r'num_classes mismatch: config.json says 10 classes, but .* has 5 outputs'),
    'other_variant': (ValueError, r'do not fit smallvit_tiny_patch4_28: shapes differ'),
    'no_weights': (FileNotFoundError, r'has no model.safetensors: give a folder written by `smallvit export`'),
    'no_config': (FileNotFoundError, r'has no config.json: give a folder written by `smallvit export`'),
    'model_args_null': (ValueError, r'config.json has model_args: null, where timm expects a JSON object'),
    'model_args_list': (ValueError, r'config.json has model_args: \[10, 1\], where timm expects a JSON object'),
    'model_args_string': (ValueError, r'config.json has model_args: "num_classes=10", where timm expects a JSON'),
    'pretrained_cfg_list': (ValueError, r'config.json has pretrained_cfg: \[\], where timm expects a JSON object'),
    'num_classes_string': (ValueError, r'config.json has num_classes: "10", where an integer is expected'),
}


@pytest.mark.parametrize('kind', list(BAD_FOLDERS))
def test_bad_export_folder_is_refused_before_any_request(kind, hub, env, exported, tmp_path):
    folder = shutil.copytree(exported, tmp_path / 'export')
    _break(folder, kind)
    before, sent = snapshot(folder), len(hub.requests)
    error, message = BAD_FOLDERS[kind]
    with pytest.raises(error, match=message) as info:
        timm_smallvit.push_to_hub(folder, f'alice/bad-{kind}')
    assert len(hub.requests) == sent and snapshot(folder) == before and '\n' not in str(info.value)
    with pytest.raises(error, match=message):
        timm_smallvit.create_model(f'local-dir:{folder}', pretrained=True)


def test_pull_helper_checks_hub_files_too(hub, env, exported, tmp_path):
    # a repo uploaded by other means, with a truncated weights file
    folder = shutil.copytree(exported, tmp_path / 'export')
    _break(folder, 'truncated_weights')
    api = HfApi()
    api.create_repo('alice/broken')
    api.upload_folder(repo_id='alice/broken', folder_path=folder, allow_patterns=['*.json', '*.safetensors'])
    with pytest.raises(ValueError, match=r'hf-hub:alice/broken: model.safetensors is corrupt or truncated'):
        timm_smallvit.create_model('hf-hub:alice/broken', pretrained=True)

    # model_args: null made timm fail with an AttributeError; the helper names the key
    _break(folder := shutil.copytree(exported, tmp_path / 'null-args'), 'model_args_null')
    api.create_repo('alice/null-args')
    api.upload_folder(repo_id='alice/null-args', folder_path=folder, allow_patterns=['*.json', '*.safetensors'])
    with pytest.raises(ValueError, match=r'hf-hub:alice/null-args: config.json has model_args: null'):
        timm_smallvit.create_model('hf-hub:alice/null-args', pretrained=True)


def test_token_is_never_printed_logged_or_written(hub, env, run, exported, tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger='huggingface_hub')  # it sets its own level (WARNING)
    assert cli.main(['push', str(exported), '--repo-id', 'alice/quiet', '--private', '--revision', 'dev']) == 0
    timm.create_model('hf-hub:alice/quiet@dev', pretrained=True)
    use_hub(monkeypatch, hub, tmp_path, token=WRONG)
    assert cli.main(['push', str(exported), '--repo-id', 'alice/quiet']) == 1
    out = capsys.readouterr()
    assert 'Pushed' in out.out and 'smallvit push: error:' in out.err and 'rejected the token' in out.err
    assert 'authorization' in caplog.text.lower()  # huggingface_hub's request log ran, with the header hidden
    for token in (ALICE, WRONG):
        assert token not in out.out + out.err + caplog.text
        for path in (*iter_files(tmp_path), *iter_files(exported), *iter_files(run)):
            assert token.encode() not in path.read_bytes(), path


def test_cli_push_honours_hf_endpoint_and_hf_token(hub, env, run, exported):
    # a fresh process: huggingface_hub reads HF_ENDPOINT and HF_TOKEN from the environment, as for a user
    result = subprocess.run(
        [sys.executable, '-m', 'timm_smallvit.cli', 'push', str(exported), '--repo-id', 'alice/from-cli'],
        env={**os.environ, **env, 'OMP_NUM_THREADS': '1'},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert ALICE not in result.stdout + result.stderr
    oid = hub.repos['alice/from-cli'].branches['main']
    assert f'{hub.endpoint}/alice/from-cli/commit/{oid}' in result.stdout
    assert hub.file('alice/from-cli', 'model.safetensors') == (exported / 'model.safetensors').read_bytes()
    downloaded = Path(hf_hub_download('alice/from-cli', 'config.json'))
    assert downloaded.read_bytes() == (exported / 'config.json').read_bytes()
    # the cache keys blobs by the ETag the server sent: the git blob oid, as on the Hub
    assert downloaded.resolve().name == git_blob_oid(downloaded.read_bytes())


# ---- what push may send: issue 21 ------------------------------------------------------------------------------------

SECRET = b'hf_local_secret_never_to_be_uploaded_0123456789\n'  # stands in for a stored token file
PNG = b'\x89PNG\r\n\x1a\n' + bytes(32)


def _secret_file(tmp_path: Path) -> Path:
    path = tmp_path / 'hf-home' / 'secret-token'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SECRET)
    return path


def _assert_never_sent(hub: HubServer, *contents: bytes) -> None:
    for blob in hub.blobs.values():
        assert not any(c in blob for c in contents)


@pytest.mark.parametrize(
    ('name', 'target'),
    [
        ('learning_curve.png', 'secret'),  # the issue: a link to the stored token went up as the curve
        ('README.md', '/etc/hostname'),
        ('config.json', 'copy'),  # a link to a good config elsewhere: still not read through
        ('model.safetensors', 'copy'),
        ('learning_curve.png', 'inside'),  # a link to another file of the folder: no links at all
    ],
)
def test_symlinked_export_file_is_refused_before_any_request(hub, env, exported, tmp_path, name, target):
    folder = shutil.copytree(exported, tmp_path / 'export')
    if target == 'secret':
        target_path = _secret_file(tmp_path)
    elif target == 'copy':
        target_path = Path(shutil.copyfile(folder / name, tmp_path / name))
    elif target == 'inside':
        target_path = Path(shutil.copyfile(folder / name, folder / 'curve-copy.png'))
    else:
        target_path = Path(target)
    (folder / name).unlink()
    (folder / name).symlink_to(target_path)
    repo_id = f'alice/link-{name.split(".")[0].replace("_", "-")}-{target.strip("/").replace("/", "-")}'
    sent = len(hub.requests)
    with pytest.raises(ValueError, match=rf'{re.escape(str(folder / name))} is a symbolic link') as info:
        timm_smallvit.push_to_hub(folder, repo_id)
    assert '\n' not in str(info.value)
    assert len(hub.requests) == sent and repo_id not in hub.repos  # nothing sent, no repo created
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, name)
    if target == 'secret':
        _assert_never_sent(hub, SECRET)
    if name in ('config.json', 'model.safetensors'):
        with pytest.raises(ValueError, match='is a symbolic link'):
            timm_smallvit.create_model(f'local-dir:{folder}', pretrained=True)


def test_secret_behind_a_link_never_reaches_an_existing_repo(hub, env, exported, tmp_path, capsys):
    timm_smallvit.push_to_hub(exported, 'alice/m2')
    head = hub.repos['alice/m2'].branches['main']
    folder = shutil.copytree(exported, tmp_path / 'p')
    (folder / 'learning_curve.png').unlink()
    (folder / 'learning_curve.png').symlink_to(_secret_file(tmp_path))
    assert cli.main(['push', str(folder), '--repo-id', 'alice/m2']) == 1
    err = capsys.readouterr().err
    assert err.startswith('smallvit push: error: ') and err.count('\n') == 1 and 'Traceback' not in err
    assert 'learning_curve.png is a symbolic link' in err
    assert hub.repos['alice/m2'].branches['main'] == head
    assert (
        Path(hf_hub_download('alice/m2', 'learning_curve.png')).read_bytes()
        == (exported / 'learning_curve.png').read_bytes()
    )
    _assert_never_sent(hub, SECRET)


def test_hard_linked_secret_is_not_a_png(hub, env, exported, tmp_path):
    # a hard link is a regular file: the curve is only sent when it is a PNG image
    folder = shutil.copytree(exported, tmp_path / 'export')
    (folder / 'learning_curve.png').unlink()
    os.link(_secret_file(tmp_path), folder / 'learning_curve.png')
    sent = len(hub.requests)
    with pytest.raises(ValueError, match=r'learning_curve.png is not a PNG image'):
        timm_smallvit.push_to_hub(folder, 'alice/hard-link')
    assert len(hub.requests) == sent and 'alice/hard-link' not in hub.repos


def test_links_and_files_outside_the_allow_list_are_not_uploaded(hub, env, exported, tmp_path, caplog):
    folder = shutil.copytree(exported, tmp_path / 'export')
    (folder / 'link.png').symlink_to('/etc/passwd')
    (folder / 'token.png').symlink_to(_secret_file(tmp_path))
    (folder / 'other.png').write_bytes((folder / 'learning_curve.png').read_bytes())
    with caplog.at_level(logging.WARNING, logger='timm_smallvit.hub'):
        timm_smallvit.push_to_hub(folder, 'alice/allow-list')
    assert sorted(hub.files('alice/allow-list')) == UPLOADED
    assert "Not uploading ['link.png', 'other.png', 'token.png']" in caplog.text
    for name in ('link.png', 'token.png', 'other.png'):
        with pytest.raises(EntryNotFoundError):
            hf_hub_download('alice/allow-list', name)
    _assert_never_sent(hub, SECRET, Path('/etc/passwd').read_bytes())


def test_folder_behind_a_link_is_pushed_from_its_real_path(hub, env, exported, tmp_path):
    link = tmp_path / 'latest'
    link.symlink_to(exported, target_is_directory=True)
    timm_smallvit.push_to_hub(link, 'alice/via-link')
    assert sorted(hub.files('alice/via-link')) == UPLOADED
    assert hub.file('alice/via-link', 'model.safetensors') == (exported / 'model.safetensors').read_bytes()


@pytest.mark.parametrize('revision', [None, 'v2'])
def test_repush_removes_what_the_folder_no_longer_has(hub, env, exported, tmp_path, revision):
    repo_id = f'alice/stale-{revision or "main"}'
    folder = shutil.copytree(exported, tmp_path / 'export')
    timm_smallvit.push_to_hub(folder, repo_id, revision=revision)
    branch = revision or 'main'
    assert sorted(hub.files(repo_id, branch)) == UPLOADED
    # what older pushes (any *.png) left, and files someone else put there
    api = HfApi()
    api.upload_file(path_or_fileobj=b'root:x:0:0', path_in_repo='link.png', repo_id=repo_id, revision=revision)
    api.upload_file(path_or_fileobj=PNG, path_in_repo='figures/keep.png', repo_id=repo_id, revision=revision)
    api.upload_file(path_or_fileobj=b'notes', path_in_repo='NOTES.txt', repo_id=repo_id, revision=revision)

    (folder / 'learning_curve.png').unlink()
    commit = timm_smallvit.push_to_hub(folder, repo_id, revision=revision)
    expected = ['.gitattributes', 'NOTES.txt', 'README.md', 'config.json', 'figures/keep.png', 'model.safetensors']
    assert sorted(s.rfilename for s in api.model_info(repo_id, revision=revision).siblings) == expected
    assert hub.repos[repo_id].branches[branch] == commit.oid
    for name in ('learning_curve.png', 'link.png'):
        with pytest.raises(EntryNotFoundError):
            hf_hub_download(repo_id, name, revision=revision)
    # pushing the same folder again changes nothing
    assert timm_smallvit.push_to_hub(folder, repo_id, revision=revision).oid == commit.oid


@pytest.mark.parametrize(
    ('front_matter', 'reason'),
    [
        ('license: [apache-2.0\nlibrary_name: timm', 'while parsing a flow sequence'),  # unclosed bracket
        ('- a list\n- not a mapping', 'metadata block should be a dict'),
        ('model-index:\n- name: x\n  results: 3', ''),
    ],
)
def test_bad_card_metadata_is_refused_and_creates_no_repo(hub, env, exported, tmp_path, front_matter, reason):
    folder = shutil.copytree(exported, tmp_path / 'export')
    text = (folder / 'README.md').read_text()
    body = text.split('\n---\n', 1)[1]
    (folder / 'README.md').write_text(f'---\n{front_matter}\n---\n{body}')
    sent = len(hub.requests)
    with pytest.raises(
        ValueError, match=r'README.md: the card metadata \(the YAML front matter .*\) is invalid'
    ) as info:
        timm_smallvit.push_to_hub(folder, 'alice/bad-yaml')
    assert reason in str(info.value) and '\n' not in str(info.value)
    assert len(hub.requests) == sent and 'alice/bad-yaml' not in hub.repos
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info('alice/bad-yaml')


def test_closed_port_is_a_one_line_error_naming_the_endpoint(hub, env, exported, monkeypatch, capsys):
    with socket.socket() as s:  # a port that was free a moment ago, with nothing listening now
        s.bind(('127.0.0.1', 0))
        closed = f'http://127.0.0.1:{s.getsockname()[1]}'
    monkeypatch.setenv('HF_ENDPOINT', closed)
    monkeypatch.setattr(hf_constants, 'ENDPOINT', closed)
    with pytest.raises(ConnectionError, match=rf'Could not reach the Hub at {re.escape(closed)} .*HF_ENDPOINT'):
        timm_smallvit.push_to_hub(exported, 'alice/closed-port')
    assert cli.main(['push', str(exported), '--repo-id', 'alice/closed-port']) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'smallvit push: error: Could not reach the Hub at {closed} ')
    assert err.count('\n') == 1 and 'Traceback' not in err and 'check HF_ENDPOINT' in err
    assert ALICE not in err and 'alice/closed-port' not in hub.repos


def test_a_recipe_fine_tunes_from_a_hub_repo_and_its_run_exports(hub, env, exported, tmp_path, fmnist_src, monkeypatch):
    from timm_smallvit import trainer as trainer_module
    from timm_smallvit.recipe import resolve_args

    timm_smallvit.push_to_hub(exported, 'alice/ft-base')
    pushed = safetensors.torch.load_file(exported / 'model.safetensors')
    started = []
    real_create = trainer_module._create_model

    def create(*args):
        model = real_create(*args)
        started.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(trainer_module, '_create_model', create)
    recipe = dict(
        model='hf-hub:alice/ft-base', pretrained=True, dataset='torch/fashion_mnist', data_dir=str(fmnist_src),
        num_classes=10, opt='adamw', lr=1e-4, epochs=1, batch_size=64, train_num_samples=256, val_num_samples=128,
        output=str(tmp_path / 'out'), experiment='ft', warmup_epochs=0,
    )  # fmt: skip
    result = trainer_module.train(resolve_args(recipe))
    assert started[0].keys() == pushed.keys()
    assert all(torch.equal(started[0][k], v) for k, v in pushed.items())  # it started from the repo's weights
    # the run exports as the architecture the repo holds (its config.json, from the HF cache)
    out = timm_smallvit.export_checkpoint(result['output_dir'] / 'last.pth.tar', tmp_path / 'ft-export')
    assert json.loads((out / 'config.json').read_text())['architecture'] == MODEL
