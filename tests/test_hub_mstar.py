"""Push a trained tiny MStarModel to the local Hub -> download -> AutoModel -> pipeline; then offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_fixtures import hub_server  # noqa: F401  (fixture)
from huggingface_hub import ModelCard, snapshot_download
from transformers import AutoModel

from mstar_hf import MStarImageProcessor, MStarModel
from mstar_hf.data import MStarProcessor, train_report_tokenizer
from mstar_hf.hub import push_folder
from mstar_hf.pipelines import load_pipeline
from mstar_hf.presets import mstar_config

SRC = str(Path(__file__).resolve().parents[1] / "src")
REPORTS = ["adenocarcinoma with gland formation", "squamous cell carcinoma with keratin pearls",
           "clear cell carcinoma with clear cytoplasm"]
LABELS = {"adenocarcinoma": ["adenocarcinoma"], "squamous": ["squamous cell carcinoma"]}


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = train_report_tokenizer(REPORTS * 4, vocab_size=64)
    model = MStarModel(mstar_config("tiny", num_genes=12, vocab_size=len(tokenizer)))
    processor = MStarProcessor(image_processor=MStarImageProcessor(), tokenizer=tokenizer,
                               gene_vocab=[f"G{i}" for i in range(12)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    text = processor(text=REPORTS * 2)
    for _ in range(3):  # a few real Stage 1 steps: the pushed weights are trained ones
        out = model(patch_features=torch.randn(6, 20, 64), input_ids=text["input_ids"],
                    attention_mask=text["attention_mask"], cancer_type=torch.tensor([0, 1, 2] * 2), return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("mstar_tiny")
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "eval_results.json").write_text(json.dumps(
        [{"task": "retrieval", "metric": "recall@1", "name": "slide->report R@1", "value": 0.5, "dataset": "synthetic"}]))
    return folder


def test_push_download_load_pipeline_then_offline(hub_server, trained_folder):  # noqa: F811
    repo_id = "mstar-tester/mstar-tiny"
    push_folder(trained_folder, repo_id)
    snapshot = Path(snapshot_download(repo_id))
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json",
                 "modeling_mstar.py", "README.md"):
        assert (snapshot / name).is_file(), name
    card = ModelCard.load(snapshot / "README.md")
    assert card.data.library_name == "transformers" and "pathology" in card.data.tags
    # no standard pipeline runs it: no pipeline_tag; the custom tasks are tags
    assert card.data.pipeline_tag is None and "wsi-zero-shot" in card.data.tags

    local = MStarModel.from_pretrained(trained_folder).eval()
    hub = AutoModel.from_pretrained(repo_id).eval()
    assert isinstance(hub, MStarModel)
    for key, value in local.state_dict().items():
        assert torch.equal(hub.state_dict()[key], value), key
    feats = torch.randn(1, 30, 64)
    with torch.no_grad():
        assert torch.equal(local.get_slide_features(feats).pooler_output, hub.get_slide_features(feats).pooler_output)

    # the repo carries the pipeline code (custom_pipelines); in-process, the installed code serves it
    classifier = load_pipeline("wsi-zero-shot", repo_id)
    result = classifier(feats[0], candidate_labels=LABELS, mode="slide")
    assert [r["label"] for r in result] and abs(sum(r["score"] for r in result) - 1) < 1e-5

    hub_server.stop()  # from here on only the cache may be used
    code = f"""
import torch, mstar_hf
from transformers import AutoModel, pipeline
model = AutoModel.from_pretrained({repo_id!r})
out = pipeline("wsi-zero-shot", model={repo_id!r}, trust_remote_code=True)(torch.zeros(5, 64) + 0.1,
                                                                         candidate_labels={LABELS!r}, mode="slide")
assert len(out) == 2, out
print("offline-ok", type(model).__name__)
"""
    env = {**hub_server.env, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([SRC, hub_server.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "offline-ok MStarModel" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


def test_report_generator_push_download_load_pipeline(hub_server, tmp_path):  # noqa: F811
    from report_generation_fixtures import grid_coords, load_training_script, overfit, tiny_report_config
    from transformers import AutoModelForImageTextToText

    from mstar_hf import MStarForReportGeneration
    from mstar_hf.modeling.modeling_mstar_report import build_report_labels

    tokenizer = load_training_script().train_bpe_tokenizer(REPORTS * 3, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    config = tiny_report_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = MStarForReportGeneration(config)
    feats = torch.randn(3, 12, 16)
    coords = torch.from_numpy(grid_coords(12))[None].expand(3, -1, -1).contiguous()
    batch = {"patch_features": feats, "patch_coords": coords,
             "labels": build_report_labels(tokenizer, REPORTS, max_length=64)}
    overfit(model, batch, steps=10)  # a trained, not freshly initialised, generator
    folder = tmp_path / "reports"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    push_folder(folder, "mstar-tester/report-tiny")
    assert (Path(snapshot_download("mstar-tester/report-tiny")) / "README.md").is_file()
    hub = AutoModelForImageTextToText.from_pretrained("mstar-tester/report-tiny").eval()
    for key, value in model.state_dict().items():
        assert torch.equal(hub.state_dict()[key], value), key
    inputs = {"patch_features": feats[:1], "patch_coords": coords[:1]}
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, num_beams=1),
                       hub.generate(**inputs, max_new_tokens=8, num_beams=1))
    generator = load_pipeline("wsi-report-generation", "mstar-tester/report-tiny")
    out = generator({"features": feats[0], "coords": coords[0]}, max_new_tokens=8)
    assert isinstance(out[0]["generated_text"], str)
