"""`smallvit app` in a real browser: Debian's Chromium (`apt-get install chromium`), driven by Playwright.

Playwright is given the system browser's path: nothing is downloaded (`playwright install` is never run). Without
Chromium or Playwright the test skips, saying which is missing. Every request the page makes to anything but the app
on 127.0.0.1 is refused and recorded, and fails the test.

    SMALLVIT_DOCS_SCREENSHOT=1 .venv/bin/python -m pytest tests/test_app_browser.py   # also writes docs/images/app.png
"""

import os
import re
import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

pytest.importorskip('gradio', reason="Gradio is the app extra: pip install -e '.[app]'")
playwright = pytest.importorskip('playwright.sync_api', reason='Playwright is not installed (the dev extra has it)')

from timm_smallvit import app as app_module  # noqa: E402

from .conftest import REPO_ROOT  # noqa: E402
from .test_app import predict_records  # noqa: E402

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
FLAGS = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
]
MODELS = ['smallvit_tiny_convstem_28.fmnist', 'smallvit_nano_patch4_28.fmnist']
EXAMPLE = sorted(app_module.EXAMPLES_DIR.glob('*.png'))[0]  # the first test image, an ankle boot
SCREENSHOT = REPO_ROOT / 'docs' / 'images' / 'app.png'

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH: install Debian's (apt-get install chromium); .ci/run does"
)


@pytest.fixture(scope='module')
def url(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv('GRADIO_TEMP_DIR', str(tmp_path_factory.mktemp('gradio')))
    demo = app_module.build_app(MODELS)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    yield app_module.serve(demo, '127.0.0.1', port, block=False)
    demo.close()
    mp.undo()


def test_a_browser_uploads_an_image_and_sees_the_top_label(url, tmp_path):
    expected = predict_records(EXAMPLE, model=MODELS[0])[EXAMPLE.name][0]['label']
    refused: list[str] = []

    def only_the_app(route):
        address = route.request.url
        if urlsplit(address).hostname == '127.0.0.1' or address.startswith(('data:', 'blob:')):
            route.continue_()
        else:
            refused.append(address)
            route.abort()

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            context = browser.new_context(viewport={'width': 1280, 'height': 1000})
            context.route('**/*', only_the_app)
            page = context.new_page()
            page.goto(url)
            page.locator('input[type=file]').first.set_input_files(EXAMPLE)
            label = page.get_by_test_id('label-output-value')
            playwright.expect(label).to_have_text(expected, timeout=60_000)
            # the attention maps arrive with the labels: both images drawn
            for panel in ('#smallvit-last', '#smallvit-rollout'):
                playwright.expect(page.locator(f'{panel} img')).to_be_visible(timeout=60_000)
            boot_map = page.locator('#smallvit-last img').get_attribute('src')
            page.wait_for_timeout(500)  # let the images paint
            shot = tmp_path / 'app.png'
            page.screenshot(path=str(shot), full_page=True)

            # a file that is not an image: a message in the page, and the app still answers
            (tmp_path / 'notes.png').write_text('not an image')
            page.get_by_label('Remove Image').first.click()
            page.locator('input[type=file]').first.set_input_files(tmp_path / 'notes.png')
            playwright.expect(page.get_by_text('notes.png: cannot read it as an image')).to_be_visible(timeout=60_000)

            # a stroke drawn with the mouse on the sketchpad, as the page sends it: labels and maps come back
            page.get_by_role('tab', name='Draw').click()
            page.get_by_role('button', name='Brush').first.click()
            box = page.locator('canvas').first.bounding_box()
            x, y = box['x'] + box['width'] * 0.4, box['y'] + box['height'] * 0.2
            page.mouse.move(x, y)
            page.mouse.down()
            for step in range(20):
                page.mouse.move(x + 4 * step, y + 8 * step)
            page.mouse.up()
            page.get_by_role('button', name='Classify the drawing').click()
            drawn_map = page.locator('#smallvit-last img')
            playwright.expect(drawn_map).to_be_visible(timeout=60_000)
            playwright.expect(drawn_map).not_to_have_attribute('src', boot_map or '')  # a new map: the drawing's
            playwright.expect(label).to_have_text(re.compile('.+'))
        finally:
            browser.close()
    assert refused == [], 'the page asked for something besides the app'
    with Image.open(shot) as img:
        assert img.format == 'PNG' and img.width == 1280 and img.height >= 800
    if os.environ.get('SMALLVIT_DOCS_SCREENSHOT'):
        shutil.copyfile(shot, SCREENSHOT)
        assert Path(SCREENSHOT).is_file()
