"""The layer table (README, docs/architecture.md#layers) as a test: no upward import, written or lazy.

Every `import` statement of every module is read with `ast` (imports inside functions count: a lazy
import is still a dependency), relative imports resolved, and checked against the rules below.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package (or module prefix) -> the top-level names (or dotted prefixes) it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "icd_core": ("fastapi", "celery", "kombu", "sqlalchemy", "click", "store", "api", "worker", "icd_cli"),
    "icd_core.data": ("icd_core.engine",),
    "store": ("api", "worker", "icd_cli", "fastapi", "click"),  # store.dispatch sends by name via Celery
    "api": ("worker", "icd_cli", "click", "celery"),
    "worker": ("api", "icd_cli", "fastapi", "click"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]  # `from x import sub`
    return found


def _violates(imported: str, forbidden: str) -> bool:
    return imported == forbidden or imported.startswith(forbidden + ".")


def _violations() -> list[str]:
    out = []
    for prefix, banned in FORBIDDEN.items():
        for path in sorted((REPO / prefix.replace(".", "/")).rglob("*.py")):
            for line, name in _imports(path):
                out += [
                    f"{path.relative_to(REPO)}:{line} imports {name} ({prefix} must not import {b})"
                    for b in banned
                    if _violates(name, b)
                ]
    return out


def test_no_module_imports_upward() -> None:
    assert _violations() == []


def test_the_walker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The check above could pass by reading nothing: prove it finds both kinds of import."""
    sample = REPO / "icd_core" / "study.py"  # `from .runner import ...` inside a function
    names = [name for _, name in _imports(sample)]
    assert "icd_core.runner" in names and "icd_core.study_plan" in names
    assert _violates("icd_core.engine.trainer", "icd_core.engine")
    assert not _violates("icd_core.engineer", "icd_core.engine")


# What runs a job and records its outcome is Celery-free, so a DDP rank (worker.ddp_rank) loads no Celery.
CELERY_FREE = ("worker.ddp_rank", "worker.run_job", "worker.outcome", "worker.export", "worker.state", "worker.upkeep")


@pytest.mark.parametrize("module", CELERY_FREE)
def test_running_a_job_never_imports_celery(module: str) -> None:
    """Neither in its own imports (lazy ones included) nor through the modules it loads."""
    path = REPO / (module.replace(".", "/") + ".py")
    banned = ("celery", "kombu", "worker.tasks", "worker.app")
    assert [name for _, name in _imports(path) if any(_violates(name, b) for b in banned)] == []
    code = (
        f"import sys, {module}, worker.outcome, worker.run_job\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu')], 'celery was imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# The API submits and serves; work runs in workers. The only process it starts is `git rev-parse` for
# GET /version, and its only thread is the periodic reaper's (api/periodic.py).
API_CONCURRENCY = {
    "subprocess": {"api/routers/system.py"},
    "threading": {"api/periodic.py"},
    "multiprocessing": set(),
    "concurrent": set(),
}


def test_the_api_starts_no_process_or_thread_for_work() -> None:
    found = {
        (name.split(".")[0], str(path.relative_to(REPO)))
        for path in sorted((REPO / "api").rglob("*.py"))
        for _, name in _imports(path)
        if name.split(".")[0] in API_CONCURRENCY
    }
    assert {(mod, path) for mod, path in found if path not in API_CONCURRENCY[mod]} == set()


@pytest.mark.parametrize("module", ["api.main", "icd_core.study_plan", "icd_cli.main"])
def test_light_modules_never_load_torch(module: str) -> None:
    """The API (and the planning it imports) and the `icd` group start without torch (nor CUDA)."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_every_method_has_a_distiller() -> None:
    """`spec.Method` is the one list of method names; the distiller table covers it exactly."""
    from icd_core.distill import DISTILLERS
    from icd_core.distill.masks import BASELINE_OPTIONS
    from icd_core.spec import METHODS

    assert set(DISTILLERS) | {"none"} == set(METHODS)
    assert set(BASELINE_OPTIONS) == set(METHODS) - {"none", "icd"}
