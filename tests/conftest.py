"""Shared fixtures: tiny deterministic models built once per test session (see ``ipgo.testing``)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network; set before any HF import

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ipgo.testing import tiny_aesthetic_head_path, tiny_clip_path, tiny_sd_path  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped where CUDA is not available (CI, the development machines)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ipgo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache root for the whole session."""
    return tmp_path_factory.mktemp("ipgo-cache")


@pytest.fixture(scope="session")
def tiny_sd_dir(ipgo_cache: Path) -> Path:
    """Folder of a tiny random SD 1.x pipeline."""
    return tiny_sd_path(ipgo_cache)


@pytest.fixture(scope="session")
def tiny_clip_dir(ipgo_cache: Path) -> Path:
    """Folder of a tiny random CLIP model (projection 768) with processor and tokenizer."""
    return tiny_clip_path(ipgo_cache)


@pytest.fixture(scope="session")
def aesthetic_head_file(ipgo_cache: Path) -> Path:
    """A random LAION-format aesthetic head ``.pth``."""
    return tiny_aesthetic_head_path(ipgo_cache)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_sd_dir: Path):
    """The tiny SD model loaded through `StableDiffusion` (float32, CPU)."""
    from ipgo.backbones import StableDiffusion

    backbone = StableDiffusion(str(tiny_sd_dir))
    backbone.load()
    return backbone
