"""Write the app's example images: the first few Fashion-MNIST test images of each class, as PNG files.

    python scripts/app_examples.py --data ../shared/data/fashion-mnist [--per-class 2] [--out timm_smallvit/examples]

Reads the release files' bytes (t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) and writes each chosen image
as it is (28x28, 8-bit grayscale) to OUT/<test index>_<class>.png, with OUT/README.md stating where they come from
and their licence (Fashion-MNIST: Zalando SE, MIT). `smallvit app` shows them as its example gallery.
"""

import argparse
import gzip
import re
from pathlib import Path

import numpy as np
from PIL import Image

from timm_smallvit.data import FASHION_MNIST_CLASSES

ROOT = Path(__file__).resolve().parents[1]
NOTICE = """# Example images

{count} images of the Fashion-MNIST test split (the first {per_class} of each class, in test-set order), written by
`scripts/app_examples.py` from the release files. File names give the image's index in the test split and its class.

Fashion-MNIST is Zalando Research's (https://github.com/zalandoresearch/fashion-mnist), under the MIT licence:

The MIT License (MIT) Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def read_idx(path: Path, header: int) -> np.ndarray:
    """The bytes after an idx file's header (16 bytes for images, 8 for labels)."""
    return np.frombuffer(gzip.decompress(path.read_bytes())[header:], dtype=np.uint8)


def file_name(index: int, label: int) -> str:
    return f'{index:04d}_{re.sub(r"[^a-z]+", "_", FASHION_MNIST_CLASSES[label].lower())}.png'


def write_examples(data: Path, out: Path, per_class: int = 2) -> list[Path]:
    """Write the first per_class test images of each class into out (created); returns the files, in test order."""
    images = read_idx(data / 't10k-images-idx3-ubyte.gz', 16).reshape(-1, 28, 28)
    labels = read_idx(data / 't10k-labels-idx1-ubyte.gz', 8)
    chosen = sorted(i for c in range(len(FASHION_MNIST_CLASSES)) for i in np.flatnonzero(labels == c)[:per_class])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in chosen:
        path = out / file_name(int(i), int(labels[i]))
        Image.fromarray(images[i], 'L').save(path, format='PNG', optimize=True)
        written.append(path)
    (out / 'README.md').write_text(NOTICE.format(count=len(written), per_class=per_class))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', type=Path, default=ROOT.parent / 'shared' / 'data' / 'fashion-mnist')
    parser.add_argument('--per-class', type=int, default=2)
    parser.add_argument('--out', type=Path, default=ROOT / 'timm_smallvit' / 'examples')
    args = parser.parse_args()
    for path in write_examples(args.data, args.out, args.per_class):
        print(path)


if __name__ == '__main__':
    main()
