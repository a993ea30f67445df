"""mkdocs hook: the figures the pages show are served from where the project keeps them.

``figures/`` (what ``make figures`` writes) and ``benchmarks/results/`` hold the PNG files; the pages
link them as ``figures/<name>.png`` and ``benchmarks/results/<name>.png`` (relative to ``docs/``).
This hook adds those files to the site at build time, so no image is committed twice and a link to a
missing figure fails ``mkdocs build --strict``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
IMAGE_FOLDERS = ("figures", "benchmarks/results")


def on_files(files: Files, config) -> Files:
    """Add every PNG under the image folders, at the same path inside the site."""
    for folder in IMAGE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.png")):
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files
