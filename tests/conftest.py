"""Shared fixtures.  Tests marked ``gpu`` are skipped where torch sees no CUDA device."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
# Llama 3 8B's attention: group 4, head_dim 128.
TEST_MODEL = {"name": "test/model", "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch  # only when GPU tests were collected: importing torch takes seconds

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A private cubin cache, so that tests neither read nor fill the user's."""
    path = tmp_path / "cubin-cache"
    path.mkdir()
    return path


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[..., Path]:
    """Write ``<tmp>/recipes/<name>.yaml`` from YAML text, with a ``model:`` section unless model=None."""
    recipes_dir = tmp_path / "recipes"

    def write(text: str, name: str = "test", model: dict[str, Any] | None = TEST_MODEL) -> Path:
        recipes_dir.mkdir(exist_ok=True)
        header = yaml.safe_dump({"model": model}, sort_keys=False) if model is not None else ""
        path = recipes_dir / f"{name}.yaml"
        path.write_text(header + textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def read_tree() -> Callable[[Path], dict[str, bytes]]:
    """A folder's files as {relative path: bytes}, for comparing generated trees."""
    def read(root: Path) -> dict[str, bytes]:
        return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}

    return read
