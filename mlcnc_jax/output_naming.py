"""File names for per-input outputs (attention maps, ...) that never overwrite one another.

Inputs `one.png` and `one.jpg` would both write `one.png`; `a/x.jpg` and `b/x.jpg` both `x.png`.
`output_names` keeps the plain stem where it is unique and otherwise adds what tells the
inputs apart: first the extension (`one_png.png`, `one_jpg.png`), then as many parent folders
as needed (`a_x_jpg.png`, `b_x_jpg.png`). Names are compared case-insensitively, as on the
file systems of macOS and Windows.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable


def _parts(path: str) -> tuple[list[str], str, str]:
    # (parent folders, stem, extension without the dot)
    absolute = os.path.normpath(os.path.abspath(os.path.expanduser(path)))
    folder, base = os.path.split(absolute)
    stem, ext = os.path.splitext(base)
    parents = [p for p in folder.split(os.sep) if p]
    return parents, stem, ext.lstrip(".")


def _name(path: str, level: int) -> str:
    parents, stem, ext = _parts(path)
    if level == 0:
        return stem
    with_ext = f"{stem}_{ext}" if ext else stem
    if level == 1:
        return with_ext
    return "_".join([*parents[len(parents) - (level - 1) :], with_ext])


def _max_level(path: str) -> int:
    return 1 + len(_parts(path)[0])


def output_names(paths: Iterable[str], extension: str = ".png") -> dict[str, str]:
    """A distinct output file name for each input path.

    Args:
      paths: the input files (duplicates are one input).
      extension: the outputs' extension, with its dot.

    Returns:
      {input path: output file name}, e.g. {'a/one.png': 'one_png.png', 'a/one.jpg':
      'one_jpg.png', 'a/cat.jpg': 'cat.png'}; no two names are equal, ignoring case.
    """
    paths = list(dict.fromkeys(paths))
    level = dict.fromkeys(paths, 0)
    while True:
        groups = defaultdict(list)
        for p in paths:
            groups[_name(p, level[p]).casefold()].append(p)
        clashing = [g for g in groups.values() if len(g) > 1]
        movable = [p for g in clashing for p in g if level[p] < _max_level(p)]
        if not movable:
            break
        for p in movable:
            level[p] += 1
    names = {p: _name(p, level[p]) for p in paths}
    # Only the same file spelt in ways that normalise alike can still clash: number them.
    taken = defaultdict(int)
    for p in paths:
        key = names[p].casefold()
        taken[key] += 1
        if taken[key] > 1:
            names[p] = f"{names[p]}_{taken[key]}"
    return {p: names[p] + extension for p in paths}
