"""Sphinx configuration: the API reference, built from the docstrings.

Build it with ``bash scripts/docs.sh`` (warnings are errors). Only ``*.rst`` files are
Sphinx sources; the Markdown notes in this directory are read on the forge as they are.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import Any

import sphinx
import sphinx.util.logging
from sphinx.errors import PycodeError
from sphinx.ext.napoleon.docstring import GoogleDocstring
from sphinx.pycode import ModuleAnalyzer

project = "trio_qemu"
author = "the trio_qemu authors"
copyright = "the trio_qemu authors, MIT licensed"
release = importlib.metadata.version("trio-qemu")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxcontrib_trio",
]

# sphinxcontrib-trio marks async functions, async context managers and async iterators by
# extending autodoc's class-based documenters; Sphinx 9 keeps those behind this switch.
if sphinx.version_info >= (9,):
    autodoc_use_legacy_class_based = True

source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "*.md", "**/*.md"]

# Docstrings are Google style (Args:/Returns:/Raises:) mixed with plain reST field lists.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False


def _consume_inline_attribute(self: GoogleDocstring) -> tuple[str, list[str]]:
    """The whole docstring of an attribute, property or constant is its description.

    Napoleon reads a first line ``type: description`` as an inline type; here types come
    from annotations, and a sentence with a colon ("Where QMP runs. None: a socketpair")
    would lose its first half to a bogus type.
    """
    lines = [self._lines.next(), *self._dedent(self._consume_to_end())]
    return "", self.__class__(lines, self._config).lines()


GoogleDocstring._consume_inline_attribute = _consume_inline_attribute  # type: ignore[method-assign]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_default_options = {"exclude-members": "__init__, __new__"}
# No network here: no intersphinx mapping, so references to trio, qemu.qmp and the
# standard library stay plain text.

html_theme = "alabaster"
html_title = f"trio_qemu {release}"
html_static_path: list[str] = []

# -- public names ---------------------------------------------------------------------------
# Objects are defined in private modules (trio_qemu._machine, trio_qemu.qtest.client, ...) and
# documented where users import them (trio_qemu.Machine, trio_qemu.qtest.QtestMachine). The
# handlers below keep the build honest about that:
#
# - the package may set ``__module__`` of its public classes to the public path; autodoc
#   reads attribute docstrings (``#:`` comments, dataclass fields) from the module named by
#   ``__module__``, so for the build each class gets back the module that defines it;
# - type hints and "Bases:" lines name the defining module; they are linked to wherever the
#   same object is documented;
# - a constant a package re-exports gets its docstring from the module that defines it;
# - every name in a public module's ``__all__`` must be documented on some page.

PUBLIC_MODULES = [
    "trio_qemu",
    "trio_qemu.guest",
    "trio_qemu.network",
    "trio_qemu.migration",
    "trio_qemu.agent",
    "trio_qemu.qtest",
    "trio_qemu.snapshot",
    "trio_qemu.block",
    "trio_qemu.block.images",
    "trio_qemu.pytest_plugin",
]

_MISSING = object()
logger = sphinx.util.logging.getLogger("trio_qemu.docs")


def _public_names() -> list[tuple[str, str, Any]]:
    """``(module, name, object)`` for every name in a public module's ``__all__``. A module
    that fails to import is skipped here: autodoc reports that failure itself."""
    found = []
    for module_name in PUBLIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:
            continue
        for name in getattr(module, "__all__", ()):
            found.append((module_name, name, getattr(module, name, _MISSING)))
    return found


def _is_api_object(obj: Any) -> bool:
    """Objects whose identity names them (not ints or strings, which may be shared)."""
    return isinstance(obj, (type, property)) or callable(obj)


def _attr_docs(module_name: str) -> dict[tuple[str, str], list[str]]:
    try:
        return ModuleAnalyzer.for_module(module_name).find_attr_docs()
    except PycodeError:
        return {}


def _defines_class(module_name: str, qualname: str) -> bool:
    try:
        tags = ModuleAnalyzer.for_module(module_name).find_tags()
    except PycodeError:
        return False
    return tags.get(qualname, ("",))[0] == "class"


def _restore_defining_modules(app: Any) -> None:
    _documented_cache.clear()
    for _module, _name, obj in _public_names():
        if not isinstance(obj, type) or not obj.__module__.startswith("trio_qemu"):
            continue
        if _defines_class(obj.__module__, obj.__qualname__):
            continue
        for candidate in sorted(sys.modules):
            module = sys.modules[candidate]
            if (
                candidate.startswith("trio_qemu.")
                and getattr(module, obj.__name__, None) is obj
                and _defines_class(candidate, obj.__qualname__)
            ):
                obj.__module__ = candidate
                break


def _display_name(cls: type) -> str:
    for module_name, name, obj in _public_names():
        if obj is cls:
            return f"{module_name}.{name}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _process_bases(app: Any, name: str, obj: Any, options: Any, bases: list[Any]) -> None:
    """``Bases: trio_qemu.MachineError``, linked, rather than the defining module's path."""
    for index, base in enumerate(bases):
        if isinstance(base, type) and base.__module__.startswith("trio_qemu"):
            target = f"{base.__module__}.{base.__qualname__}"
            bases[index] = f":py:class:`{_display_name(base)} <{target}>`"


def _import_path(path: str) -> Any:
    """The object ``path`` names (``package.module.Class.attr``), or _MISSING."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except Exception:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


_documented_cache: dict[int, str] = {}


def _documented(env: Any) -> dict[int, str]:
    """``id(object)`` -> the name it is documented under, for every documented API object
    (computed once all pages are read; ids only mean something within this process)."""
    if not _documented_cache:
        for name in sorted(env.get_domain("py").objects, key=len):
            obj = _import_path(name) if name.startswith("trio_qemu") else _MISSING
            if obj is not _MISSING and _is_api_object(obj):
                _documented_cache.setdefault(id(obj), name)
    return _documented_cache


def _missing_reference(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a reference to ``trio_qemu._x.Name`` (as type hints and bases name objects)
    to the entry that documents the same object."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("trio_qemu"):
        return None
    obj = _import_path(target)
    if obj is _MISSING or not _is_api_object(obj):
        return None
    documented = _documented(env).get(id(obj))
    if documented is None or documented == target:
        return None
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], documented, node, contnode
    )


def _constant_docstring(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """The docstring of a constant a package re-exports (``trio_qemu.qtest.COMMANDS``).

    autodoc looks for a constant's docstring in the module named in the directive; for a
    re-export that module has none, and autodoc falls back to the docstring of the value's
    type (``dict``'s, ``str``'s). Take it from the submodule that defines the constant.
    """
    if what != "data" or "." not in name:
        return
    module_name, attr = name.rsplit(".", 1)
    if ("", attr) in _attr_docs(module_name):
        return
    package = module_name + "."
    for candidate in sorted(sys.modules):
        if candidate != module_name and not candidate.startswith(package):
            continue
        if getattr(sys.modules[candidate], attr, _MISSING) is not obj:
            continue
        docs = _attr_docs(candidate).get(("", attr))
        if docs:
            lines[:] = list(docs)
            return
    lines[:] = []  # never the value's type's docstring


def _check_all_documented(app: Any, env: Any) -> None:
    """Warn (an error under -W) about a public name no page documents."""
    objects = env.get_domain("py").objects
    documented = _documented(env)
    for module_name, name, obj in _public_names():
        full = f"{module_name}.{name}"
        if full in objects or (_is_api_object(obj) and id(obj) in documented):
            continue
        logger.warning(
            "%s is in %s.__all__ but no page in docs/api documents it", full, module_name
        )


def setup(app: Any) -> None:
    app.connect("builder-inited", _restore_defining_modules)
    # Before napoleon (priority 500), so that it formats the docstring found here.
    app.connect("autodoc-process-docstring", _constant_docstring, priority=400)
    app.connect("autodoc-process-bases", _process_bases)
    app.connect("missing-reference", _missing_reference)
    app.connect("env-check-consistency", _check_all_documented)
