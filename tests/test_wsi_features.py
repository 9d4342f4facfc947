"""Feature files: TRIDENT/CLAM layout, atomic writes, lazy reading."""

import h5py
import numpy as np
import pytest

from mstar_hf.wsi.features import FeatureFile, open_features, read_attrs, tmp_path_for, write_features

ATTRS = {"patch_size": 256, "patch_size_level0": 512, "target_magnification": 20.0, "mpp": 0.25,
         "level0_width": 4096, "level0_height": 3072, "encoder": "vit_tiny_patch16_224",
         "encoder_config_hash": "0123456789abcdef", "seg": {"seg_mpp": 4.0}}


def test_round_trip_and_layout(tmp_path):
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 4000, (37, 2))
    feats = rng.standard_normal((37, 16)).astype(np.float32)
    path = write_features(tmp_path / "slide.h5", coords, feats, ATTRS)
    assert path == tmp_path / "slide.h5" and not tmp_path_for(path).exists()
    with h5py.File(path, "r") as f:  # what TRIDENT/CLAM readers see
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (37, 2)
        assert f["features"].dtype == np.float32 and f["features"].shape == (37, 16)
        assert f["coords"].attrs["patch_size_level0"] == 512
        assert f.attrs["encoder"] == "vit_tiny_patch16_224"
    with open_features(path) as ff:
        assert isinstance(ff, FeatureFile) and len(ff) == 37 and ff.dim == 16
        assert isinstance(ff.features, h5py.Dataset)  # lazy: nothing read yet
        np.testing.assert_array_equal(ff[5:9], feats[5:9])
        c, x = ff.load()
        np.testing.assert_array_equal(c, coords)
        np.testing.assert_array_equal(x, feats)
        attrs = ff.attrs
        for key in ("patch_size", "patch_size_level0", "target_magnification", "mpp", "level0_width",
                    "level0_height", "encoder", "encoder_config_hash"):
            assert attrs[key] == ATTRS[key], key
        assert attrs["seg"] == '{"seg_mpp": 4.0}'
    assert ff._h5 is None  # closed by the context manager
    assert read_attrs(path)["mpp"] == 0.25


def test_failed_write_leaves_nothing_under_either_name(tmp_path):
    path = tmp_path / "slide.h5"
    write_features(path, np.zeros((2, 2)), np.ones((2, 4)), ATTRS)
    with pytest.raises(TypeError):
        write_features(path, np.zeros((3, 2)), np.ones((3, 4)), {"bad": object()})
    assert not tmp_path_for(path).exists()
    with open_features(path) as ff:  # the earlier complete file is untouched
        assert len(ff) == 2
    with pytest.raises(ValueError, match="do not match"):
        write_features(tmp_path / "other.h5", np.zeros((3, 2)), np.ones((4, 4)))
    assert not (tmp_path / "other.h5").exists()


def test_reader_rejects_non_feature_files(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["coords"] = np.zeros((1, 2))
    with pytest.raises(ValueError, match="x.h5.*features"):
        open_features(tmp_path / "x.h5")
    (tmp_path / "y.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="y.h5"):
        open_features(tmp_path / "y.h5")
    assert read_attrs(tmp_path / "missing.h5") is None


def test_a_child_forked_during_the_write_does_not_lock_the_finished_file(tmp_path, monkeypatch):
    # Extraction writes in a thread while DataLoader workers are forked for the next slide: a child
    # that inherits the open file must not keep an HDF5 lock on it after the rename (CI saw errno 11).
    import os
    import signal

    real_file = h5py.File
    children = []

    def file_then_fork(*args, **kwargs):
        handle = real_file(*args, **kwargs)
        pid = os.fork()
        if pid == 0:  # the "worker": holds every inherited descriptor until killed
            signal.pause()
            os._exit(0)
        children.append(pid)
        return handle

    monkeypatch.setattr(h5py, "File", file_then_fork)
    try:
        path = write_features(tmp_path / "slide.h5", np.zeros((3, 2)), np.ones((3, 4)), ATTRS)
        monkeypatch.setattr(h5py, "File", real_file)
        with open_features(path) as ff:  # while the child still lives
            assert len(ff) == 3
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert children
