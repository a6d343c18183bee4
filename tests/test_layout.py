"""The house rules that keep the package navigable, checked on the source itself.

import-linter's layers contract (pyproject.toml, run by `make lint`) keeps imports one way; these tests add what it
cannot see: private names taken across modules, the size limits, and docs/ links that lead nowhere.
"""

import ast
import re
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / 'timm_smallvit'
MODULES = sorted(PACKAGE.glob('*.py'))
SCRIPTS = sorted((REPO_ROOT / 'scripts').glob('*.py'))
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 120
DOC_PAGES = [REPO_ROOT / 'README.md', *sorted((REPO_ROOT / 'docs').glob('*.md'))]
_LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def _private_names_taken(path: Path) -> list[str]:
    """`from .x import _name`, `from timm_smallvit.x import _name` and `module._name` on an imported smallvit module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own_modules: set[str] = set()  # local names bound to timm_smallvit modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or '').split('.')[0] == 'timm_smallvit'
            if not ours:
                continue
            for alias in node.names:
                if alias.name.startswith('_') and not alias.name.startswith('__'):
                    found.append(f'{path.name}:{node.lineno} imports {alias.name} from {node.module or "."}')
                elif node.module in (None, 'timm_smallvit') or (node.level > 0 and not node.module):
                    own_modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('timm_smallvit'):
                    own_modules.add(alias.asname or alias.name.split('.')[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith('_') and not node.attr.startswith('__'):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in own_modules:
                found.append(f'{path.name}:{node.lineno} uses {ast.unparse(node)}')
    return found


@pytest.mark.parametrize('path', MODULES + SCRIPTS, ids=lambda p: f'{p.parent.name}/{p.name}')
def test_no_private_names_across_modules(path):
    # `_files` and `_reference_d2l` are private to the package, but their names are their public API inside it
    assert _private_names_taken(path) == []


def test_the_private_name_check_can_fail(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('from .hub import _stage\nfrom timm_smallvit import trainer\ntrainer._EPOCH_HOOKS.append(1)\n')
    assert len(_private_names_taken(bad)) == 2


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.name)
def test_module_and_function_sizes(path):
    source = path.read_text()
    assert source.count('\n') <= MAX_MODULE_LINES, f'{path.name}: split it by job'
    long = [
        f'{node.name} ({node.end_lineno - node.lineno + 1} lines)'
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == [], f'{path.name}: split these functions'


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r'[`*_]', lambda m: '_' if m.group() == '_' else '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def _anchors(page: Path) -> set[str]:
    lines = page.read_text().splitlines()
    return {_slug(line.lstrip('#')) for line in lines if re.match(r'#{1,6} ', line)}


def _links(page: Path) -> list[str]:
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)  # commands in code blocks are not links
    return [m.group(1) for m in _LINK.finditer(text)]


@pytest.mark.parametrize('page', DOC_PAGES, ids=lambda p: p.name)
def test_doc_links_lead_somewhere(page):
    broken = []
    for link in _links(page):
        if re.match(r'[a-z]+:', link):
            continue  # the web: not reachable from here
        target, _, anchor = link.partition('#')
        path = (page.parent / target).resolve() if target else page
        if not path.exists() or (anchor and path.suffix == '.md' and anchor not in _anchors(path)):
            broken.append(link)
    assert broken == []


def test_every_result_file_is_linked():
    linked = set()
    for page in DOC_PAGES:
        for link in _links(page):
            target = link.partition('#')[0]
            if target and not re.match(r'[a-z]+:', target):
                linked.add((page.parent / target).resolve())
    results = REPO_ROOT / 'docs' / 'results'
    # a link to a folder shows all that it holds
    orphans = [
        str(f.relative_to(REPO_ROOT))
        for f in sorted(results.rglob('*'))
        if f.is_file() and not any(p in linked for p in (f, *f.parents))
    ]
    assert orphans == [], 'link these from a page under docs/'


def test_the_link_checks_can_fail(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('# Title\n[a](missing.md) [b](#title) [c](#nowhere)\n```\n[d](in-code.md)\n```\n')
    assert _links(page) == ['missing.md', '#title', '#nowhere']
    assert _anchors(page) == {'title'}
