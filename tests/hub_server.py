"""A small in-memory Hugging Face Hub for tests: the part of the HTTP protocol that huggingface_hub uses here.

The real ``huggingface_hub`` client talks to it unmodified, pointed at it by ``HF_ENDPOINT``. It listens on
127.0.0.1 only (an ephemeral port), keeps repos in memory, and stores every file as a regular git blob: the preupload
answer is always ``uploadMode: regular``, so file bytes travel inline (base64) in the commit's ndjson and no LFS or
Xet transfer is ever needed.

Endpoints served (``{repo}`` is ``namespace/name``; ``{rev}`` a branch name or a commit oid, URL-quoted):

    GET  /api/whoami-v2                            the token's user
    POST /api/repos/create                         create_repo (409 when it exists; create_repo(exist_ok=True) is fine)
    POST /api/validate-yaml                        README.md metadata check done before an upload (YAML must parse)
    GET  /api/models/{repo}                        model_info / repo_info of main
    GET  /api/models/{repo}/revision/{rev}         model_info / repo_info of a revision
    GET  /api/models/{repo}/refs                   list_repo_refs
    GET  /api/models/{repo}/commits/{rev}          list_repo_commits (newest first)
    GET  /api/models/{repo}/tree/{rev}[/{path}]    list_repo_files / list_repo_tree, recursive, files only (what
                                                   upload_folder lists to apply its delete_patterns)
    POST /api/models/{repo}/branch/{branch}        create_branch (from main, or from ``startingPoint``)
    POST /api/models/{repo}/preupload/{rev}        upload modes (always regular) and the oids of files already there
    POST /api/models/{repo}/commit/{rev}           create_commit: ndjson header, ``file`` (base64), ``deletedFile``
    HEAD /{repo}/resolve/{rev}/{path}              hf_hub_download's metadata: ETag, X-Repo-Commit, Content-Length
    GET  /{repo}/resolve/{rev}/{path}              the file (a ``Range: bytes=N-`` request gets 206)

Spaces (``repo_type='space'``) are served the same way under ``/api/spaces/{repo}/...`` and ``/spaces/{repo}/resolve/
...``; they are kept in ``HubServer.repos`` as ``spaces/{repo}`` (their own namespace, as on the Hub, where a model and
a Space may share a name). Creating one needs an ``sdk``; as on the Hub, a new Space starts with a README.md whose
metadata names that sdk.

Anything else answers 404 and is recorded in ``HubServer.unhandled``. Auth is ``Authorization: Bearer <token>``
against the server's token table. As on the Hub: an unknown token gets 401 "Invalid credentials in Authorization
header" on every endpoint; a private repo is "RepoNotFound" (401 without a token, 404 with another user's token);
writing needs a token whose user owns the namespace. Requests are bounded: bodies over ``max_body`` get 413 and a
connection that stalls for ``timeout`` seconds is dropped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

__all__ = ['HubServer', 'use_hub']

SPACE_SDKS = ('gradio', 'docker', 'static')
GITATTRIBUTES = b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n'


def git_blob_oid(data: bytes) -> str:
    """The oid git gives a blob: what huggingface_hub compares against for regular (non-LFS) files."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, str]  # path -> blob oid
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    sdk: str | None = None  # a Space's
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)


class HubError(Exception):
    """An HTTP error answer, with the X-Error-Code / X-Error-Message headers huggingface_hub maps to exceptions."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more fields of the JSON body


class HubServer:
    """In-memory Hub on 127.0.0.1.

    Args:
        tokens: Token -> user name. Each user may write to repos in its own namespace.
        max_body: Largest request body accepted, in bytes.
        timeout: Seconds a connection may stall before it is dropped.
    """

    def __init__(self, tokens: dict[str, str], max_body: int = 128 << 20, timeout: float = 30.0) -> None:
        self.tokens = dict(tokens)
        self.max_body = max_body
        self.timeout = timeout
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, 'start() the server first'
        host, port = self._httpd.server_address[:2]
        return f'http://{host}:{port}'

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub
            timeout = hub.timeout

        self._httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name='hub-server', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            assert self._thread is not None
            self._thread.join(timeout=10)
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- state, also for tests to inspect -------------------------------------------------------------------------

    def file(self, repo_id: str, path: str, revision: str = 'main') -> bytes:
        """Bytes of ``path`` at ``revision`` (KeyError if absent)."""
        repo = self.repos[repo_id]
        return self.blobs[repo.commits[self._resolve(repo, revision)].files[path]]

    def files(self, repo_id: str, revision: str = 'main') -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {p: self.blobs[o] for p, o in repo.commits[self._resolve(repo, revision)].files.items()}

    def history(self, repo_id: str, revision: str = 'main') -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        repo = self.repos[repo_id]
        oid: str | None = self._resolve(repo, revision)
        out = []
        while oid is not None:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if len(revision) >= 7 and all(c in '0123456789abcdef' for c in revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f'Invalid rev id: {revision}', 'RevisionNotFound')

    def _commit(self, repo: Repo, parent: str | None, files: dict[str, str], title: str, message: str, user: str):
        self._counter += 1
        lines = [f'parent {parent}', *(f'{oid} {path}' for path, oid in sorted(files.items()))]
        lines += [f'author {user}', f'serial {self._counter}', '', title, message]
        oid = hashlib.sha1('\n'.join(lines).encode()).hexdigest()
        date = time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime())
        repo.commits[oid] = Commit(oid, parent, dict(files), title, message, user, date)
        return oid

    # ---- request handling -----------------------------------------------------------------------------------------

    def user_for(self, headers: Any) -> str | None:
        """The token's user; None without a token. An unknown token is a 401 on any endpoint, as on the Hub."""
        auth = headers.get('Authorization')
        if not auth:
            return None
        scheme, _, token = auth.partition(' ')
        if scheme.lower() != 'bearer' or token not in self.tokens:
            raise HubError(401, 'Invalid credentials in Authorization header')
        return self.tokens[token]

    def _readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            # the Hub does not tell a private repo from a missing one
            raise HubError(401 if user is None else 404, 'Repository not found', 'RepoNotFound')
        return repo

    def _writable(self, repo_id: str, user: str | None) -> Repo:
        repo = self._readable(repo_id, user)
        if user is None:
            raise HubError(401, 'You must be authenticated to write to a repo')
        if user != repo.owner:
            raise HubError(403, f'You do not have write access to {repo_id}')
        return repo

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Route one request: (status, headers, body)."""
        parts = [unquote(p) for p in path.split('/')[1:]]
        user = self.user_for(headers)
        with self._lock:
            if parts[:1] == ['api']:
                return self._api(method, parts[1:], user, body)
            if len(parts) >= 5 and parts[2] == 'resolve' and method in ('GET', 'HEAD'):
                repo_id, revision, file_path = f'{parts[0]}/{parts[1]}', parts[3], '/'.join(parts[4:])
                return self._resolve_file(method, repo_id, revision, file_path, user, headers)
            if len(parts) >= 6 and parts[0] == 'spaces' and parts[3] == 'resolve' and method in ('GET', 'HEAD'):
                repo_id, revision, file_path = '/'.join(parts[:3]), parts[4], '/'.join(parts[5:])
                return self._resolve_file(method, repo_id, revision, file_path, user, headers)
        self.unhandled.append((method, path))
        raise HubError(404, f'Not found: {method} {path}')

    def _api(self, method: str, parts: list[str], user: str | None, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if method == 'GET' and parts == ['whoami-v2']:
            if user is None:
                raise HubError(401, 'You must be authenticated')
            return _json({'type': 'user', 'name': user, 'orgs': [], 'auth': {'type': 'access_token'}})
        if method == 'POST' and parts == ['repos', 'create']:
            return self._create_repo(user, _loads(body))
        if method == 'POST' and parts == ['validate-yaml']:
            return self._validate_yaml(_loads(body))
        if len(parts) < 3 or parts[0] not in ('models', 'spaces'):
            raise HubError(404, f'Not found: /api/{"/".join(parts)}')
        repo_id, rest = f'{parts[1]}/{parts[2]}', parts[3:]
        if parts[0] == 'spaces':
            repo_id = f'spaces/{repo_id}'
        if method == 'GET' and rest == []:
            return self._info(repo_id, 'main', user)
        if method == 'GET' and len(rest) == 2 and rest[0] == 'revision':
            return self._info(repo_id, rest[1], user)
        if method == 'GET' and rest == ['refs']:
            repo = self._readable(repo_id, user)
            branches = [{'name': b, 'ref': f'refs/heads/{b}', 'targetCommit': o} for b, o in repo.branches.items()]
            return _json({'branches': branches, 'tags': [], 'converts': [], 'pullRequests': []})
        if method == 'GET' and len(rest) == 2 and rest[0] == 'commits':
            repo = self._readable(repo_id, user)
            history = self.history(repo_id, rest[1])
            return _json([_commit_json(c) for c in history])
        if method == 'GET' and len(rest) >= 2 and rest[0] == 'tree':
            return self._tree(repo_id, rest[1], '/'.join(rest[2:]), user)
        if method == 'POST' and len(rest) == 2 and rest[0] == 'branch':
            return self._create_branch(repo_id, rest[1], user, _loads(body) if body else {})
        if method == 'POST' and len(rest) == 2 and rest[0] == 'preupload':
            return self._preupload(repo_id, rest[1], user, _loads(body))
        if method == 'POST' and len(rest) == 2 and rest[0] == 'commit':
            return self._commit_files(repo_id, rest[1], user, body)
        self.unhandled.append((method, '/api/' + '/'.join(parts)))
        raise HubError(404, f'Not found: /api/{"/".join(parts)}')

    def _create_repo(self, user: str | None, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if user is None:
            raise HubError(401, 'You must be authenticated to create a repo')
        kind = payload.get('type', 'model')
        if kind not in ('model', 'space'):
            raise HubError(400, 'This test server only hosts model repos and Spaces')
        if kind == 'space' and payload.get('sdk') not in SPACE_SDKS:
            raise HubError(400, f'Invalid sdk: expected one of {", ".join(SPACE_SDKS)}')
        name, namespace = payload.get('name'), payload.get('organization') or user
        if not isinstance(name, str) or not name or '/' in name:
            raise HubError(400, 'Invalid repo name')
        repo_id = f'{namespace}/{name}'
        key = repo_id if kind == 'model' else f'spaces/{repo_id}'
        if namespace != user:
            raise HubError(403, f'You cannot create a repo in the namespace {namespace}')
        url = f'{self.endpoint}/{key}'
        if key in self.repos:
            # create_repo(exist_ok=True) reads the url from this answer
            raise HubError(409, f'You already created this {kind} repo', extra={'url': url})
        private = payload.get('visibility') == 'private' or payload.get('private') is True
        repo = Repo(key, owner=user, private=private, sdk=payload.get('sdk'))
        files = {'.gitattributes': GITATTRIBUTES}
        if kind == 'space':
            files['README.md'] = f'---\ntitle: {name}\nsdk: {payload["sdk"]}\npinned: false\n---\n'.encode()
        for data in files.values():
            self.blobs[git_blob_oid(data)] = data
        oids = {path: git_blob_oid(data) for path, data in files.items()}
        repo.branches['main'] = self._commit(repo, None, oids, 'initial commit', '', user)
        self.repos[key] = repo
        return _json({'url': url, 'name': repo_id, 'id': repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        content = payload.get('content', '')
        if content.startswith('---\n'):
            header = content[4:].split('\n---\n', 1)[0]
            try:
                meta = yaml.safe_load(header)
            except yaml.YAMLError as e:
                return _json({'errors': [{'message': f'Invalid YAML: {e}'}], 'warnings': []}, 400)
            if meta is not None and not isinstance(meta, dict):
                return _json({'errors': [{'message': 'Metadata must be a mapping'}], 'warnings': []}, 400)
        return _json({'errors': [], 'warnings': []})

    def _info(self, repo_id: str, revision: str, user: str | None) -> tuple[int, dict[str, str], bytes]:
        repo = self._readable(repo_id, user)
        commit = repo.commits[self._resolve(repo, revision)]
        siblings = [{'rfilename': p} for p in sorted(commit.files)]
        info = {'id': repo_id.removeprefix('spaces/'), 'author': repo.owner, 'sha': commit.oid, 'private': repo.private}
        kind = {'sdk': repo.sdk} if repo.sdk else {'library_name': 'timm'}
        return _json({**info, 'lastModified': commit.date, 'siblings': siblings, **kind})

    def _tree(self, repo_id: str, revision: str, folder: str, user: str | None) -> tuple[int, dict[str, str], bytes]:
        repo = self._readable(repo_id, user)
        files = repo.commits[self._resolve(repo, revision)].files
        prefix = f'{folder.strip("/")}/' if folder.strip('/') else ''
        entries = [
            {'type': 'file', 'oid': oid, 'size': len(self.blobs[oid]), 'path': path}
            for path, oid in sorted(files.items())
            if path.startswith(prefix)
        ]
        return _json(entries)

    def _create_branch(self, repo_id: str, branch: str, user: str | None, payload: dict[str, Any]):
        repo = self._writable(repo_id, user)
        if not branch or branch.startswith('refs/') or '..' in branch:
            raise HubError(400, f'Invalid branch name {branch!r}')
        if branch in repo.branches:
            raise HubError(409, f'Reference already exists: refs/heads/{branch}')
        repo.branches[branch] = self._resolve(repo, payload.get('startingPoint') or 'main')
        return _json({})

    def _preupload(self, repo_id: str, revision: str, user: str | None, payload: dict[str, Any]):
        repo = self._writable(repo_id, user)
        files = repo.commits[self._resolve(repo, revision)].files
        answer = [
            {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False, 'oid': files.get(f['path'])}
            for f in payload.get('files', [])
        ]
        return _json({'files': answer})

    def _commit_files(self, repo_id: str, revision: str, user: str | None, body: bytes):
        repo = self._writable(repo_id, user)
        if revision not in repo.branches:
            raise HubError(404, f'Invalid rev id: {revision} (commits go to a branch)', 'RevisionNotFound')
        head = repo.branches[revision]
        files = dict(repo.commits[head].files)
        header: dict[str, Any] | None = None
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get('key'), item.get('value', {})
            if key == 'header':
                header = value
            elif key == 'file':
                if value.get('encoding') != 'base64':
                    raise HubError(400, 'file content must be base64')
                data = base64.b64decode(value['content'], validate=True)
                self.blobs[oid := git_blob_oid(data)] = data
                files[_clean_path(value['path'])] = oid
            elif key == 'deletedFile':
                if files.pop(_clean_path(value['path']), None) is None:
                    raise HubError(404, "A file with this name doesn't exist", 'EntryNotFound')
            elif key in ('lfsFile', 'deletedFolder'):
                raise HubError(400, f'{key} operations are not supported by this test server (no LFS here)')
            else:
                raise HubError(400, f'Unknown commit operation {key!r}')
        if header is None or not header.get('summary'):
            raise HubError(400, 'A commit needs a header with a summary')
        parent = header.get('parentCommit')
        if parent is not None and parent != head:
            raise HubError(412, f'Parent commit {parent} is not the head of {revision} ({head})')
        oid = self._commit(repo, head, files, header['summary'], header.get('description', ''), user or '')
        repo.branches[revision] = oid
        return _json({'success': True, 'commitOid': oid, 'commitUrl': f'{self.endpoint}/{repo_id}/commit/{oid}'})

    def _resolve_file(self, method: str, repo_id: str, revision: str, path: str, user: str | None, headers: Any):
        repo = self._readable(repo_id, user)
        oid = self._resolve(repo, revision)
        blob = repo.commits[oid].files.get(path)
        if blob is None:
            raise HubError(404, 'Entry not found', 'EntryNotFound', {'X-Repo-Commit': oid})
        data = self.blobs[blob]
        out = {'ETag': f'"{blob}"', 'X-Repo-Commit': oid, 'Accept-Ranges': 'bytes'}
        status = 200
        byte_range = headers.get('Range', '')
        if method == 'GET' and byte_range.startswith('bytes=') and byte_range.endswith('-'):
            start = int(byte_range[6:-1])
            out['Content-Range'] = f'bytes {start}-{len(data) - 1}/{len(data)}'
            data, status = data[start:], 206
        out['Content-Type'] = 'application/octet-stream'
        return status, out, data


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = 'HTTP/1.1'

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests read their own output

    def _serve(self, method: str) -> None:
        hub = self.server_hub
        path = urlsplit(self.path).path
        hub.requests.append((method, path))
        try:
            length = int(self.headers.get('Content-Length') or 0)
            if length > hub.max_body:
                self.close_connection = True
                raise HubError(413, f'Request body over {hub.max_body} bytes')
            body = self.rfile.read(length) if length else b''
            status, headers, data = hub.handle(method, path, self.headers, body)
        except HubError as e:
            status, data = e.status, json.dumps({'error': e.message, **e.extra}).encode()
            headers = {'Content-Type': 'application/json', 'X-Error-Message': e.message, **e.headers}
            if e.code:
                headers['X-Error-Code'] = e.code
        except (ValueError, KeyError, TypeError) as e:
            status, headers = 400, {'Content-Type': 'application/json'}
            data = json.dumps({'error': f'Bad request: {type(e).__name__}'}).encode()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if method != 'HEAD':
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._serve('GET')

    def do_HEAD(self) -> None:
        self._serve('HEAD')

    def do_POST(self) -> None:
        self._serve('POST')

    def do_PUT(self) -> None:
        self._serve('PUT')

    def do_DELETE(self) -> None:
        self._serve('DELETE')


def _json(obj: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
    return status, {'Content-Type': 'application/json'}, json.dumps(obj).encode()


def _loads(body: bytes) -> dict[str, Any]:
    payload = json.loads(body or b'{}')
    if not isinstance(payload, dict):
        raise ValueError('expected a JSON object')
    return payload


def _clean_path(path: str) -> str:
    parts = path.split('/')
    if not path or path.startswith('/') or any(p in ('', '.', '..') for p in parts):
        raise HubError(400, f'Invalid path in repo: {path!r}')
    return path


def _commit_json(commit: Commit) -> dict[str, Any]:
    return {
        'id': commit.oid,
        'title': commit.title,
        'message': commit.message,
        'authors': [{'user': commit.author}],
        'date': commit.date,
    }


def use_hub(monkeypatch: Any, server: HubServer, home: Path, token: str | None = None) -> dict[str, str]:
    """Point huggingface_hub at ``server``, with its cache and token file under ``home``; returns the environment.

    The environment variables are what a user sets and what a subprocess (the ``smallvit`` command) reads.
    huggingface_hub reads them once, at import, and ``import timm`` has imported it before any fixture runs, so
    the same values are also set on ``huggingface_hub.constants`` (and on the module-level HfApi behind
    ``huggingface_hub.whoami`` and friends) for this process. ``token`` becomes HF_TOKEN;
    None leaves no token anywhere (the token file under ``home`` does not exist).
    """
    from huggingface_hub import constants, hf_api

    hf_home = home / 'hf-home'
    env = {
        'HF_ENDPOINT': server.endpoint,
        'HF_HOME': str(hf_home),
        'HF_HUB_CACHE': str(hf_home / 'hub'),
        'HF_TOKEN_PATH': str(hf_home / 'token'),
        'HF_HUB_DISABLE_TELEMETRY': '1',
        'HF_HUB_DISABLE_XET': '1',
        'HF_HUB_DISABLE_PROGRESS_BARS': '1',
        'HF_HUB_OFFLINE': '0',
        'NO_PROXY': '127.0.0.1,localhost',
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if token is None:
        monkeypatch.delenv('HF_TOKEN', raising=False)
    else:
        monkeypatch.setenv('HF_TOKEN', token)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    for name, value in {
        'ENDPOINT': server.endpoint,
        'HUGGINGFACE_CO_URL_TEMPLATE': server.endpoint + '/{repo_id}/resolve/{revision}/{filename}',
        'HF_HOME': str(hf_home),
        'HF_HUB_CACHE': str(hf_home / 'hub'),
        'HF_TOKEN_PATH': str(hf_home / 'token'),
        'HF_STORED_TOKENS_PATH': str(hf_home / 'stored_tokens'),
        'HF_HUB_DISABLE_TELEMETRY': True,
        'HF_HUB_DISABLE_XET': True,
        'HF_HUB_OFFLINE': False,
    }.items():
        monkeypatch.setattr(constants, name, value)
    # huggingface_hub.whoami, create_repo, ... are methods of an HfApi made at import, endpoint and all
    monkeypatch.setattr(hf_api.api, 'endpoint', server.endpoint)
    return {**env, **({'HF_TOKEN': token} if token else {})}


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (for scanning what a test wrote)."""
    yield from (p for p in root.rglob('*') if p.is_file() and not p.is_symlink())


# ---- training runs in timm's own format, for export tests -----------------------------------------------------------


def train_py_args(**overrides: Any) -> Any:
    """An argparse.Namespace with timm train.py's dests, as a checkpoint's 'args' holds them."""
    import argparse

    args = dict(
        model='smallvit_nano_patch4_28',
        pretrained=False,
        num_classes=10,
        in_chans=1,
        img_size=None,
        input_size=None,
        gp=None,
        model_kwargs={'img_size': 28},
        dataset='torch/fashion_mnist',
        train_split='train',
        val_split='validation',
        mean=[0.286],
        std=[0.353],
        interpolation='bilinear',
        crop_pct=1.0,
        opt='adamw',
        lr=3e-3,
        weight_decay=0.05,
        epochs=3,
        batch_size=32,
        sched='cosine',
        warmup_epochs=0,
        smoothing=0.1,
        mixup=0.0,
        cutmix=0.0,
        drop=0.0,
        drop_path=0.1,
        model_ema=True,
        model_ema_decay=0.5,
        model_ema_force_cpu=False,
        amp=False,
        amp_dtype='float16',
        seed=0,
        eval_metric='top1',
        output='',
        experiment='',
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def make_training_run(out: Path, epochs: int = 3, **arg_overrides: Any) -> Path:
    """A few optimizer steps on random images, saved each epoch by timm's CheckpointSaver and update_summary.

    The folder gets what train.py writes: checkpoint-N.pth.tar, model_best.pth.tar, last.pth.tar, summary.csv.
    Eval metrics are measured (on the random training batch) with timm's accuracy, on the EMA model when there is
    one, as train.py does.
    """
    import timm
    import torch
    import torch.nn.functional as F
    from timm.utils import CheckpointSaver, ModelEmaV3, accuracy, update_summary

    import timm_smallvit  # noqa: F401

    args = train_py_args(epochs=epochs, **arg_overrides)
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)  # train.py's rule
    model = timm.create_model(
        args.model,
        num_classes=args.num_classes,
        in_chans=in_chans,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        global_pool=args.gp,
        **args.model_kwargs,
    )
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(
        model, optimizer, args=args, model_ema=ema, checkpoint_dir=str(out), recovery_dir=str(out), max_history=2
    )
    # one fixed batch, trained on and evaluated on: the metrics move from epoch to epoch
    generator = torch.Generator().manual_seed(args.seed)
    x = x_eval = torch.randn(args.batch_size, in_chans, *model.patch_embed.img_size, generator=generator)
    y = y_eval = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator)
    for epoch in range(epochs):
        model.train()
        loss = F.cross_entropy(model(x), y, label_smoothing=args.smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
        eval_model = (ema.module if ema is not None else model).eval()
        with torch.no_grad():
            logits = eval_model(x_eval)
        top1, top5 = accuracy(logits, y_eval, topk=(1, 5))
        eval_metrics = {'loss': F.cross_entropy(logits, y_eval).item(), 'top1': top1.item(), 'top5': top5.item()}
        update_summary(
            epoch,
            {'loss': loss.item()},
            eval_metrics,
            filename=str(out / 'summary.csv'),
            lr=args.lr,
            write_header=epoch == 0,
        )
        saver.save_checkpoint(epoch, metric=eval_metrics['top1'])
    return out
