import pytest

from mgs.synthetic import SyntheticConfig, make_synthetic_scene

TINY_SCENE = dict(seed=3, num_views=30, width=96, height=72, num_points=1500, num_passes=3)


@pytest.fixture(scope="session")
def tiny_scene(tmp_path_factory):
    """A small synthetic scene shared by the training tests (read-only: copy before editing)."""
    out = tmp_path_factory.mktemp("tiny") / "scene"
    make_synthetic_scene(out, SyntheticConfig(**TINY_SCENE))
    return out
