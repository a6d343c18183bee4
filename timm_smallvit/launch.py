"""Run timm's own scripts with the smallvit family registered.

timm's train.py imports the package itself with ``--device-modules timm_smallvit``; validate.py, inference.py and
benchmark.py have no such flag and answer "Unknown model" for smallvit names. :func:`run_timm_script` imports the
package, then runs the script as ``__main__`` with its own arguments, in this process (so torchrun can start it:
``torchrun ... -m timm_smallvit.run validate.py ...``).
"""

import os
import runpy
import shlex
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

__all__ = ['list_recipes', 'recipe_path', 'run_timm_script', 'train_py_command']


def list_recipes() -> dict[str, Path]:
    """The recipes shipped with the package, by name (file name without .yaml)."""
    folder = resources.files('timm_smallvit') / 'recipes'
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith('.yaml')}


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped recipe's path from its name, or the given path if it is a file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipes = list_recipes()
    if str(name_or_path) in recipes:
        return recipes[str(name_or_path)]
    raise FileNotFoundError(f'No recipe file {name_or_path!r}; shipped recipes: {", ".join(sorted(recipes))}.')


def train_py_command(
    recipe: str | os.PathLike,
    train_py: str | os.PathLike,
    data_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    experiment: str | None = None,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that runs a recipe with timm's train.py, under torchrun for several GPUs or nodes.

    The recipe goes to train.py's own ``--config``; this adds only what depends on the machine: the data folder
    (``--dataset-download`` lets torchvision unpack release files already in place, or fetch them where allowed),
    the output folder and ``--device-modules timm_smallvit``.
    """
    script = [
        str(train_py),
        '--config',
        str(recipe_path(recipe)),
        '--device-modules',
        'timm_smallvit',
        '--data-dir',
        str(data_dir),
        '--dataset-download',
    ]
    if output:
        script += ['--output', str(output)]
    if experiment:
        script += ['--experiment', experiment]
    script += list(extra)
    if nproc_per_node == 1 and nnodes == 1:
        return [sys.executable, *script]
    launcher = ['torchrun', f'--nproc_per_node={nproc_per_node}', f'--nnodes={nnodes}']
    if nnodes > 1:
        if not master_addr:
            raise ValueError('Several nodes need master_addr (the address of node 0) and the same master_port.')
        launcher += [
            f'--node_rank={node_rank}',
            f'--master_addr={master_addr}',
            f'--master_port={master_port or 29500}',
        ]
    return [*launcher, *script]


def format_command(command: Sequence[str]) -> str:
    return ' '.join(shlex.quote(part) for part in command)


def run_timm_script(script: str | os.PathLike, argv: Sequence[str]) -> None:
    """Run one of timm's scripts (validate.py, inference.py, benchmark.py, train.py) with smallvit registered."""
    import timm_smallvit  # noqa: F401  (registers the smallvit family before the script asks timm for it)

    script = Path(script)
    if not script.is_file():
        raise FileNotFoundError(
            f'{script} not found: pass the path of a timm script from a pytorch-image-models checkout.'
        )
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))  # as `python script.py` would (timm is already imported: the installed one)
    try:
        runpy.run_path(str(script), run_name='__main__')
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
