"""Fixtures and the environment every test runs in; plain helpers are in helpers.py."""

import os

import pytest
from helpers import REACHED, refuse_network

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

refuse_network()        # helpers.py: no test reaches beyond this machine


@pytest.fixture(autouse=True)
def no_network():
    before = len(REACHED)
    yield
    assert REACHED[before:] == [], f"the test tried to reach the network: {REACHED[before:]}"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny models of each architecture, made once per session: ``model_dirs(arch)`` -> folder."""
    made = {}

    def get(arch, **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            from nb_offload.tiny import make_tiny_model
            folder = tmp_path_factory.mktemp(f"{arch}-model")
            made[key] = make_tiny_model(str(folder), arch, **overrides)
        return made[key]

    return get


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """A real IPython shell (fresh IPYTHONDIR) with the extension loaded, one per test module."""
    os.environ["IPYTHONDIR"] = str(tmp_path_factory.mktemp("ipython"))
    from IPython.core.interactiveshell import InteractiveShell
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext nb_offload", store_history=False)
    yield sh
    sh.run_cell("%unload_ext nb_offload", store_history=False)
