"""Without mstar_hf: folders saved by the top-level models and pushed with `mstar-hf push` serve all three
pipelines and the Auto classes through `trust_remote_code=True`, from the local Hub (tests/hub_server.py),
in a subprocess where importing mstar_hf fails. The numbers must equal what the installed package gives.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_fixtures import hub_server  # noqa: F401  (fixture)
from transformers import pipeline

import mstar_hf  # noqa: F401
from mstar_hf import MStarImageProcessor, MStarModel
from mstar_hf.data import MStarProcessor, train_report_tokenizer, write_slide_features
from mstar_hf.hub import push_folder
from mstar_hf.pipelines import add_custom_pipelines, custom_pipeline_files
from mstar_hf.presets import mstar_config

# mstar_hf "not installed": every import of it fails the way a missing package does
BLOCK = """
import sys
class _NoMstar:
    def find_spec(self, name, path=None, target=None):
        if name == "mstar_hf" or name.startswith("mstar_hf."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoMstar())
"""
CMU = Path(__file__).resolve().parent / "data" / "CMU-1-Small-Region.svs"
REPORTS = ["adenocarcinoma with gland formation", "squamous cell carcinoma with keratin pearls",
           "clear cell carcinoma with clear cytoplasm"]
PROMPTS = {"0": {"classnames": {"LUAD": ["adenocarcinoma", "glands"], "LUSC": ["squamous cell carcinoma"]},
                 "templates": ["CLASSNAME.", "an image of CLASSNAME."]}}


def _run_without_package(code: str, env: dict, timeout: int = 300) -> dict:
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    result = subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    marker = result.stdout.rfind("RESULT ")  # progress bars may share the line
    assert marker >= 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout[marker + len("RESULT "):].splitlines()[0])


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """A tiny MStarModel saved with `save_pretrained` (+ processor), a small slide and its features h5."""
    from mstar_hf.wsi.extraction import extract_slide_features

    root = tmp_path_factory.mktemp("package_free")
    tokenizer = train_report_tokenizer(REPORTS * 4, vocab_size=64)
    torch.manual_seed(0)
    model = MStarModel(mstar_config("tiny", num_genes=12, vocab_size=len(tokenizer))).eval()
    processor = MStarProcessor(image_processor=MStarImageProcessor(), tokenizer=tokenizer,
                               gene_vocab=[f"G{i}" for i in range(12)])
    folder = root / "mstar"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    slide = root / "slides" / CMU.name  # the real Aperio slide of the repository
    slide.parent.mkdir()
    shutil.copyfile(CMU, slide)
    coords, feats = extract_slide_features(slide, model.patch_model, processor.image_processor, num_workers=0,
                                           progress=False)
    h5 = write_slide_features(root / "features" / "s1.h5", feats, coords, patch_size_level0=256, slide=slide.name,
                              slide_path=str(slide))  # the attributes `mstar-hf extract` writes
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    return {"root": root, "folder": folder, "model": model, "processor": processor, "slide": slide, "h5": h5}


def test_save_pretrained_and_push_carry_the_pipelines(multimodal, tmp_path):
    folder = multimodal["folder"]
    config = json.loads((folder / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {"wsi-zero-shot", "wsi-feature-extraction"}
    assert config["custom_pipelines"]["wsi-zero-shot"] == {"impl": "zero_shot.WSIZeroShotPipeline", "pt": ["AutoModel"],
                                                            "type": "multimodal"}
    for name in ("zero_shot.py", "feature_extraction.py", "inputs.py", "prompts.py", "few_shot.py", "extraction.py",
                 "slide.py", "tiling.py", "segmentation.py", "errors.py", "features.py", "modeling_mstar.py"):
        assert (folder / name).is_file(), name
    # every relative import of a travelling file is a file of the folder (what remote code loading needs)
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    for py in folder.glob("*.py"):
        for needed in get_relative_imports(py):
            assert (folder / f"{needed}.py").is_file(), f"{py.name} imports .{needed}"
        assert "mstar_hf" not in get_imports(py), py.name  # only inside try blocks (the installed-package branch)
    # a folder without them (an older save) gets them in the push commit only
    bare = tmp_path / "bare"
    bare.mkdir()
    stripped = {k: v for k, v in config.items() if k != "custom_pipelines"}
    (bare / "config.json").write_text(json.dumps(stripped))
    files = custom_pipeline_files(bare)
    assert json.loads(files["config.json"])["custom_pipelines"] == config["custom_pipelines"]
    assert not (bare / "zero_shot.py").exists()
    assert add_custom_pipelines(bare) == sorted(files) and (bare / "zero_shot.py").is_file()


def test_multimodal_pipelines_and_auto_classes_without_the_package(hub_server, multimodal):  # noqa: F811
    model, processor, slide, h5 = (multimodal[k] for k in ("model", "processor", "slide", "h5"))
    prompts = multimodal["root"] / "prompts.json"
    repo_id = "mstar-tester/mstar-package-free"
    push_folder(multimodal["folder"], repo_id)

    zs = pipeline("wsi-zero-shot", model=model, processor=processor, device="cpu")
    fe = pipeline("wsi-feature-extraction", model=model, processor=processor, device="cpu")
    want = {
        "h5": zs(str(h5), candidate_labels=str(prompts), return_patch_scores=True),
        "slide": zs(str(slide), candidate_labels=PROMPTS, extraction_workers=0),
        "fe": fe(str(h5))["slide_embedding"].tolist(),
    }
    code = f"""
        import json, sys
        import torch
        from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer,
                                  pipeline)
        repo = {repo_id!r}
        model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
        auto = [type(AutoConfig.from_pretrained(repo, trust_remote_code=True)).__name__, type(model).__name__,
                type(processor).__name__, type(image_processor).__name__,
                type(AutoTokenizer.from_pretrained(repo)).__name__]
        with torch.no_grad():
            bag = torch.linspace(-1, 1, 320).reshape(1, 5, 64)
            slide_features = model.get_slide_features(bag, normalize=False).tolist()
        tokens = processor(text=["adenocarcinoma with gland formation"])["input_ids"].tolist()
        pixels = image_processor(torch.zeros(3, 256, 256, dtype=torch.uint8), return_tensors="pt")["pixel_values"]
        zs = pipeline("wsi-zero-shot", model=repo, trust_remote_code=True, device="cpu")
        fe = pipeline("wsi-feature-extraction", model=repo, trust_remote_code=True, device="cpu")
        h5 = zs({str(h5)!r}, candidate_labels={str(prompts)!r}, return_patch_scores=True)
        out = {{
            "auto": auto, "slide_features": slide_features, "tokens": tokens, "pixels": list(pixels.shape),
            "h5": [{{"label": d["label"], "score": d["score"], "patch_scores": d["patch_scores"].tolist(),
                    "slide_path": d["slide_path"]}} for d in h5],
            "slide": zs({str(slide)!r}, candidate_labels={PROMPTS!r}, extraction_workers=0),
            "fe": fe({str(h5)!r})["slide_embedding"].tolist(),
            "modules": sorted({{type(zs).__module__.split(".")[0], type(zs.model).__module__.split(".")[0]}}),
            "mstar_hf_loaded": any(m.split(".")[0] == "mstar_hf" for m in sys.modules),
        }}
        print("RESULT", json.dumps(out))
    """
    got = _run_without_package(code, hub_server.env)
    assert got["auto"] == ["MStarConfig", "MStarModel", "MStarProcessor", "MStarImageProcessor",
                           "TokenizersBackend"]
    assert got["modules"] == ["transformers_modules"] and not got["mstar_hf_loaded"]
    with torch.no_grad():  # the Auto classes run as the installed ones do
        want_slide = model.get_slide_features(torch.linspace(-1, 1, 320).reshape(1, 5, 64), normalize=False)
    np.testing.assert_allclose(got["slide_features"], want_slide.numpy(), rtol=1e-5, atol=1e-6)
    assert got["tokens"] == processor(text=["adenocarcinoma with gland formation"])["input_ids"].tolist()
    assert got["pixels"] == [1, 3, 224, 224]
    for key in ("h5", "slide"):
        assert [d["label"] for d in got[key]] == [d["label"] for d in want[key]], key
        np.testing.assert_allclose([d["score"] for d in got[key]], [d["score"] for d in want[key]], rtol=1e-4,
                                   atol=1e-6)
    for g, w in zip(got["h5"], want["h5"]):
        np.testing.assert_allclose(g["patch_scores"], w["patch_scores"], rtol=1e-4, atol=1e-6)
        assert g["slide_path"] == str(slide)  # the h5's recorded slide, found beside the features folder
    np.testing.assert_allclose(got["fe"], want["fe"], rtol=1e-4, atol=1e-6)


def test_report_generation_without_the_package(hub_server, tmp_path):  # noqa: F811
    from report_generation_fixtures import grid_coords, load_training_script, overfit, tiny_report_config

    from mstar_hf import MStarForReportGeneration
    from mstar_hf.modeling.modeling_mstar_report import build_report_labels

    tokenizer = load_training_script().train_bpe_tokenizer(REPORTS * 3, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = MStarForReportGeneration(tiny_report_config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    feats = torch.randn(3, 12, 16)
    coords = torch.from_numpy(grid_coords(12))[None].expand(3, -1, -1).contiguous()
    overfit(model, {"patch_features": feats, "patch_coords": coords,
                    "labels": build_report_labels(tokenizer, REPORTS, max_length=64)}, steps=30)
    folder = tmp_path / "reports"
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert set(json.loads((folder / "config.json").read_text())["custom_pipelines"]) == {"wsi-report-generation"}
    h5 = write_slide_features(tmp_path / "r.h5", feats[1].numpy(), coords[1].numpy())
    repo_id = "mstar-tester/report-package-free"
    push_folder(folder, repo_id)
    reporter = pipeline("wsi-report-generation", model=model, tokenizer=tokenizer, device="cpu")
    want = reporter(str(h5), max_new_tokens=20, num_beams=1)
    code = f"""
        import json
        from transformers import AutoModelForImageTextToText, pipeline
        model = AutoModelForImageTextToText.from_pretrained({repo_id!r}, trust_remote_code=True)
        reporter = pipeline("wsi-report-generation", model={repo_id!r}, trust_remote_code=True, device="cpu")
        out = reporter({str(h5)!r}, max_new_tokens=20, num_beams=1)
        print("RESULT", json.dumps({{"auto": type(model).__name__, "out": out}}))
    """
    got = _run_without_package(code, hub_server.env)
    assert got["auto"] == "MStarForReportGeneration"
    assert got["out"] == want and want[0]["generated_text"]
