import pytest
import torch

from mgs.synthetic import SyntheticConfig, make_synthetic_scene

TINY_SCENE = dict(seed=3, num_views=30, width=96, height=72, num_points=1500, num_passes=3)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where no GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cpu_unless_asked():
    """Tests run on the CPU, also on a GPU node: `device: auto` (in this process and in the mgs
    processes the workflow tests start) reads MGS_DEVICE. Session-wide, so module fixtures that
    train are pinned too; the bitwise resume checks and CPU-measured tolerances assume the CPU.
    Tests marked `cuda` name their device explicitly."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MGS_DEVICE", "cpu")
        yield


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory):
    """A small synthetic scene shared by the training tests (read-only: copy before editing)."""
    out = tmp_path_factory.mktemp("tiny") / "scene"
    make_synthetic_scene(out, SyntheticConfig(**TINY_SCENE))
    return out
