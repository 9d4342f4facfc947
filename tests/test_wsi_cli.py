"""`mstar-hf extract`: inputs, bad input, resume after SIGKILL, and a 2-process split."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from wsi_fixtures import (ROOT, assert_same_outputs, cli_env, cmu, copy_to, read_outputs, run_cli,  # noqa: F401
                          synthetic_slide, tiny_model_dir)

from mstar_hf.cli import build_parser, main
from mstar_hf.wsi.features import open_features

FAST = ["--num-workers", "1", "--num-threads", "1", "--batch-size", "32"]


def test_extract_is_registered(capsys):
    assert "extract" in build_parser().format_help()
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--help"])
    assert exit_.value.code == 0
    assert "--slides" in capsys.readouterr().out


def test_real_slide_end_to_end(cmu, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["extract", "--slides", str(cmu), "--out", str(out), "--model", str(tiny_model_dir()), "--quiet", *FAST])
    assert rc == 0
    assert "1 done, 0 skipped, 0 failed" in capsys.readouterr().out
    with open_features(out / "CMU-1-Small-Region.h5") as ff:
        coords, feats = ff.load()
        assert 12 <= len(ff) <= 60 and feats.shape[1] == 64 and np.isfinite(feats).all()
        assert (coords >= 0).all() and (coords[:, 0] + 256 <= 2220).all() and (coords[:, 1] + 256 <= 2967).all()
        assert ff.attrs["target_magnification"] == 20 and ff.attrs["encoder_config_hash"]
    assert (out / "qc" / "CMU-1-Small-Region.png").stat().st_size > 10_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 1 and summary["patches"] == len(coords) and summary["patches_per_s"] > 0
    with open(out / "failures.csv") as fh:
        assert fh.read().strip() == "slide,error,reason"


def test_csv_input_with_per_slide_mpp_and_options(tmp_path, capsys):
    folder = tmp_path / "slides"
    copy_to(synthetic_slide("csv_nompp", 1536, 1536, seed=11, mpp=None, tissue_fraction=0.6), folder / "a.tif")
    copy_to(synthetic_slide("csv_20x", 1536, 1536, seed=12, mpp=0.5, tissue_fraction=0.6), folder / "b.tif")
    listing = tmp_path / "slides.csv"
    listing.write_text("slide,mpp\nslides/a.tif,0.5\nslides/b.tif,\n")
    out = tmp_path / "out"
    rc = main(["extract", "--slides", str(listing), "--out", str(out), "--model", str(tiny_model_dir()), "--quiet",
               "--patch-size", "128", "--magnification", "10", "--no-qc", *FAST])
    assert rc == 0, capsys.readouterr().err
    for name in ("a.h5", "b.h5"):
        attrs = open_features(out / name).attrs
        assert attrs["patch_size"] == 128 and attrs["target_magnification"] == 10 and attrs["patch_size_level0"] == 256
    assert open_features(out / "a.h5").attrs["mpp_source"] == "override"
    assert not (out / "qc").exists()


def test_bad_arguments_give_clear_errors(tmp_path, cmu, capsys, monkeypatch):
    model = str(tiny_model_dir())
    missing = tmp_path / "nowhere"
    assert main(["extract", "--slides", str(missing), "--out", str(tmp_path / "o"), "--model", model]) == 2
    assert str(missing) in capsys.readouterr().err

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["extract", "--slides", str(cmu), "--out", str(blocker / "out"), "--model", model]) == 2
    err = capsys.readouterr().err
    assert str(blocker / "out") in err and "not writable" in err

    assert main(["extract", "--slides", str(cmu), "--out", str(tmp_path / "o"), "--model", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err

    bad_csv = tmp_path / "list.csv"
    bad_csv.write_text("name\nx.svs\n")
    assert main(["extract", "--slides", str(bad_csv), "--out", str(tmp_path / "o"), "--model", model]) == 2
    assert "'slide'" in capsys.readouterr().err

    # An unreadable slide folder (simulated: the tests may run as root, which reads everything).
    locked = tmp_path / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert main(["extract", "--slides", str(locked), "--out", str(tmp_path / "o"), "--model", model]) == 2
    err = capsys.readouterr().err
    assert str(locked) in err and "Permission denied" in err

    # Inside a --recursive scan the unreadable sub-folder is a recorded failure and the rest is done.
    top = tmp_path / "top"
    copy_to(cmu, top / "cmu.svs")
    locked.rename(top / "locked")
    locked = top / "locked"
    out = tmp_path / "rec"
    assert main(["extract", "--slides", str(top), "--recursive", "--out", str(out), "--model", model, "--quiet",
                 "--no-qc", *FAST]) == 1
    with open(out / "failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide"] for r in rows] == [str(locked)] and "cannot read directory" in rows[0]["reason"]
    assert (out / "cmu.h5").exists()


# -- resume after SIGKILL and multi-process ------------------------------------------------------------
@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Five slides plus one bad file, and the outputs of one uninterrupted single-process run."""
    root = tmp_path_factory.mktemp("batch")
    folder = root / "slides"
    for i in range(5):
        copy_to(synthetic_slide(f"batch{i}", 2048, 2048, seed=20 + i, mpp=0.5, tissue_fraction=0.6),
                folder / f"slide{i}.tif")
    (folder / "broken.svs").write_text("not a slide")
    reference = root / "reference"
    assert main(["extract", "--slides", str(folder), "--out", str(reference), "--model", str(tiny_model_dir()),
                 "--quiet", *FAST]) == 1  # 1: the broken file failed
    return folder, reference


def _cli_args(folder, out):
    return ["extract", "--slides", folder, "--out", out, "--model", tiny_model_dir(), "--quiet", *FAST]


def test_resume_after_sigkill_matches_an_uninterrupted_run(batch, tmp_path):
    folder, reference = batch
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mstar_hf.cli", *map(str, _cli_args(folder, out))], env=cli_env(),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("*.h5")):  # kill as soon as the first slide is complete
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no slide finished in time"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its reader workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    partial = read_outputs(out)  # every file under a final name opens and is complete...
    assert 1 <= len(partial) < 5, "the kill came after the run had finished"
    reference_outputs = read_outputs(reference)
    assert_same_outputs(partial, {k: reference_outputs[k] for k in partial})  # ...and equals the reference

    result = run_cli(_cli_args(folder, out))
    assert result.returncode == 1, result.stderr  # the broken file still fails
    assert f"{5 - len(partial)} done, {len(partial)} skipped, 1 failed" in result.stdout
    assert_same_outputs(read_outputs(out), reference_outputs)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    assert (out / "failures.csv").read_text() == (reference / "failures.csv").read_text()


def test_two_processes_split_the_slides_and_match_one(batch, tmp_path):
    folder, reference = batch
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mstar_hf.cli", *map(str, _cli_args(folder, out))]
    result = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "5 done, 0 skipped, 1 failed" in result.stdout, result.stderr
    assert_same_outputs(read_outputs(out), read_outputs(reference))
    assert (out / "failures.csv").read_text() == (reference / "failures.csv").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["done"] == 5 and summary["failed"] == 1
    assert sorted(p.name for p in (out / "qc").iterdir()) == [f"slide{i}.png" for i in range(5)]
    assert not list(out.glob(".*"))
