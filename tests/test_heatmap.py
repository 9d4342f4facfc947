"""Heatmaps from feature h5 files: `mstar-hf extract` records the slide's path, so a zero-shot result on the
h5 is drawn on that slide; a moved slide is a clear error unless `slide=` / `--slide` names it; and the
`mstar-hf heatmap` command writes the heatmaps a user asks for."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import pipeline

import mstar_hf  # noqa: F401
from mstar_hf.cli import main as cli
from mstar_hf.pipelines.heatmap import save_zero_shot_heatmap, score_grid

CMU = Path(__file__).resolve().parent / "data" / "CMU-1-Small-Region.svs"
LABELS = ["adenocarcinoma", "squamous cell carcinoma"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A tiny MStarModel folder and the features `extract_features` (what `mstar-hf extract` runs) wrote."""
    from mstar_hf import MStarImageProcessor, MStarModel
    from mstar_hf.data import MStarProcessor, train_report_tokenizer
    from mstar_hf.presets import mstar_config
    from mstar_hf.wsi.extraction import extract_features

    root = tmp_path_factory.mktemp("heatmap")
    slide = root / "slides" / CMU.name
    slide.parent.mkdir()
    shutil.copyfile(CMU, slide)
    tokenizer = train_report_tokenizer(["adenocarcinoma with glands", "squamous cell carcinoma"], vocab_size=48)
    torch.manual_seed(0)
    model = MStarModel(mstar_config("tiny", num_genes=8, vocab_size=len(tokenizer))).eval()
    processor = MStarProcessor(image_processor=MStarImageProcessor(), tokenizer=tokenizer, max_length=32)
    folder = root / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    summary = extract_features([slide], root / "features", model.patch_model, processor.image_processor,
                               num_workers=0, qc=False, quiet=True)
    assert summary["failed"] == 0, summary
    zs = pipeline("wsi-zero-shot", model=model, processor=processor, device="cpu")
    return {"root": root, "slide": slide, "h5": root / "features" / f"{slide.stem}.h5", "folder": folder, "zs": zs}


def _is_png(png: Path) -> bool:
    with Image.open(png) as im:
        return im.format == "PNG" and min(im.size) > 200


def test_h5_result_is_drawn_on_the_recorded_slide(extracted, tmp_path):
    zs, h5, slide = extracted["zs"], extracted["h5"], extracted["slide"]
    result = zs(str(h5), candidate_labels=LABELS, return_patch_scores=True)
    assert result[0]["slide_path"] == str(slide.resolve())
    png = save_zero_shot_heatmap(result, tmp_path / "top.png")
    assert _is_png(png)
    other = save_zero_shot_heatmap(result, tmp_path / "second.png", label=result[1]["label"])
    assert other.read_bytes() != png.read_bytes()  # each class draws its own scores
    with pytest.raises(KeyError, match="not among the returned labels"):
        save_zero_shot_heatmap(zs(str(h5), candidate_labels=LABELS, return_patch_scores=True, top_k=1),
                               tmp_path / "x.png", label=result[1]["label"])
    with pytest.raises(ValueError, match="return_patch_scores=True"):
        save_zero_shot_heatmap(zs(str(h5), candidate_labels=LABELS), tmp_path / "x.png")


def test_moved_slide_needs_the_slide_argument(extracted, tmp_path):
    zs = extracted["zs"]
    h5 = tmp_path / "features" / "moved.h5"
    h5.parent.mkdir()
    shutil.copyfile(extracted["h5"], h5)
    import h5py

    with h5py.File(h5, "a") as f:  # the slide is gone from where it was extracted
        f.attrs["slide_path"] = str(tmp_path / "gone" / CMU.name)
    result = zs(str(h5), candidate_labels=LABELS, return_patch_scores=True)
    assert result[0]["slide_path"] is None
    with pytest.raises(ValueError, match=r"moved\.h5: the slide these patches come from is unknown.*slide="):
        save_zero_shot_heatmap(result, tmp_path / "h.png")
    png = save_zero_shot_heatmap(result, tmp_path / "h.png", slide=extracted["slide"])
    assert _is_png(png)
    # the recorded file name next to the features folder is found too
    shutil.copyfile(extracted["slide"], tmp_path / CMU.name)
    assert zs(str(h5), candidate_labels=LABELS, return_patch_scores=True)[0]["slide_path"] == str(tmp_path / CMU.name)


def test_heatmap_cells_carry_the_patch_scores(extracted):
    result = extracted["zs"](str(extracted["h5"]), candidate_labels=LABELS, return_patch_scores=True)
    entry = result[0]
    size0 = entry["patch_size_level0"]
    grid = score_grid(entry["coords"], entry["patch_scores"], size0, float(size0), (50, 50))
    for (x, y), score in zip(entry["coords"], entry["patch_scores"]):
        assert grid[y // size0, x // size0] == pytest.approx(score)


def test_heatmap_command(extracted, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    classnames = {"LUAD": ["adenocarcinoma"], "LUSC": ["squamous cell carcinoma"]}
    prompts.write_text(json.dumps({"0": {"classnames": classnames, "templates": ["CLASSNAME."]}}))
    h5, folder = str(extracted["h5"]), str(extracted["folder"])
    rc = cli(["heatmap", h5, "--model", folder, "--prompts", str(prompts), "--out", str(tmp_path / "maps"),
              "--all-labels", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    written = json.loads(out.strip().splitlines()[-1])["heatmaps"]
    stem = extracted["slide"].stem
    assert sorted(Path(p).name for p in written) == sorted(f"{stem}_{c}.png" for c in ("LUAD", "LUSC"))
    assert all(_is_png(Path(p)) for p in written)
    want = extracted["zs"](h5, candidate_labels=str(prompts))
    assert out.splitlines()[0] == f"{h5}: " + ", ".join(f"{d['label']} {d['score']:.3f}" for d in want)
    one = tmp_path / "one.png"
    assert cli(["heatmap", h5, "--model", folder, "--labels", *LABELS, "--label", LABELS[1], "--out", str(one),
                "--slide", str(extracted["slide"]), "--device", "cpu"]) == 0 and one.is_file()
    capsys.readouterr()
    assert cli(["heatmap", h5, h5, "--model", folder, "--labels", "a", "--out", str(one)]) == 1
    assert "one PNG" in capsys.readouterr().err
    assert cli(["heatmap", str(tmp_path / "nope.h5"), "--model", folder, "--labels", "a"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert cli(["heatmap", h5, "--model", folder, "--prompts", str(tmp_path / "missing.json"), "--out",
                str(tmp_path / "m"), "--device", "cpu"]) == 1
    assert "missing.json: no such prompt file" in capsys.readouterr().err
