"""Under pytest-xdist (`-n 2 --dist worksteal`, the README's test command) every test process computes
on one thread, as the scripts the tests launch already do (test_pipeline.ENV): two workers of two
threads each on two cores slow each other down several times over. The longest tests (whole scripts,
often two ranks) go first, so that none starts last and runs alone while the other worker idles.
media_files: the video files the tests read as real clips (media.py), written once a session."""
import os

import pytest
import torch

import media  # imports av before any test file imports decord (whose libvpx breaks PyAV's VP8)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # processes the tests spawn


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name != "test_pipeline.py")  # stable: file order otherwise


@pytest.fixture(scope="session")
def media_files(tmp_path_factory):
    """name -> path: camera.mp4, short.mp4, no_count.webm, rotated_90.mov, corrupted.mp4."""
    return media.write_all(tmp_path_factory.mktemp("media"))
