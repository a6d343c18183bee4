"""``python -m timm_smallvit.run SCRIPT [ARGS...]``: run a timm script with the smallvit family registered.

For torchrun, which starts modules with ``-m``: ``torchrun --nproc_per_node=8 -m timm_smallvit.run validate.py ...``.
"""

import sys

from .launch import run_timm_script

if __name__ == '__main__':
    if len(sys.argv) < 2:
        sys.exit('usage: python -m timm_smallvit.run SCRIPT [ARGS...]')
    run_timm_script(sys.argv[1], sys.argv[2:])
