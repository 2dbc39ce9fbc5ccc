"""opsd: on-policy self-distillation pipelines for language models.

Four floors, imports only pointing down (docs/architecture.md):

    opsd.cli  →  opsd.flows  →  opsd.stages  →  opsd (library) + opsd.storage

The source tree keeps ``flows/``, ``stages/`` and ``storage/`` beside ``opsd/`` (the folders a
reader looks for first); installed, setuptools maps them *into* this package (pyproject's
``package-dir``), so opsd claims no generic top-level names (``flows``, ``stages``, ``storage``)
in a user's environment. In a source checkout that is used without installing (a GPU machine
running ``bench/`` scripts from a copied tree), the same three names resolve from the siblings.
"""

from pathlib import Path as _Path

_FLOORS = ("flows", "stages", "storage")
_here = _Path(__file__).resolve().parent
if not (_here / "stages").is_dir() and all((_here.parent / f / "__init__.py").is_file()
                                            for f in _FLOORS):
    # Source layout: the floors are siblings of this folder. Submodule lookup searches
    # __path__, so adding the checkout root makes ``opsd.stages`` mean ``<root>/stages``.
    __path__.append(str(_here.parent))  # noqa: F821 - the package's own search path
