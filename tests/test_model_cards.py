"""Model cards: metadata that points the Hub at pipelines that work, and snippets that run as pasted.

Tiny real mSTAR models (patch encoder, aggregator, multimodal Stage 1 model, report generator, gene encoder)
are saved to temporary folders; their rendered cards' ```python blocks are run in a fresh process, once with
`mstar_hf` importable and imported and once with it blocked (only the code the folders carry may be used),
in a working folder where `slide.svs` is the real test slide.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from mstar_hf import (MStarForReportGeneration, MStarGeneEncoder, MStarImageProcessor, MStarModel, MStarPatchModel,
                      MStarSlideAggregator)
from mstar_hf.data import MStarProcessor, train_report_tokenizer
from mstar_hf.hub import render_model_card
from mstar_hf.hub.card import extract_python_snippet
from mstar_hf.presets import aggregator_config, gene_config, mstar_config, patch_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_fixtures import hub_server  # noqa: E402,F401  (pytest fixture)

REPORTS = ["adenocarcinoma with gland formation", "squamous cell carcinoma with keratin pearls",
           "clear cell carcinoma with clear cytoplasm"]
STAGE1_ARGS = {"patch_model_name_or_path": "mstar-org/mstar-patch", "text_model_name_or_path": "dmis-lab/biobert-base-cased-v1.2",
               "manifest": "/data/tcga-pairs/manifest.csv", "eval_split": "val", "learning_rate": 1e-4}
# eval_results.json as the training scripts write it: the dataset is the manifest's folder, no split
STAGE1_RESULTS = [{"task": "retrieval", "metric": "recall@1", "name": "slide->report R@1", "value": 0.5,
                   "dataset": "tcga-pairs"}]


def python_blocks(card_text: str) -> list[str]:
    blocks = []
    while True:
        try:
            blocks.append(extract_python_snippet(card_text, len(blocks)))
        except ValueError:
            return blocks


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{kind: saved folder} of tiny models, each with what its card's snippets load."""
    from report_generation_fixtures import load_training_script, tiny_report_config

    root = tmp_path_factory.mktemp("cards")
    torch.manual_seed(0)
    out = {}

    patch = MStarPatchModel(patch_config("tiny")).eval()
    out["patch"] = root / "mstar-patch-tiny"
    patch.save_pretrained(out["patch"])
    MStarImageProcessor().save_pretrained(out["patch"])
    (out["patch"] / "training_args.json").write_text(json.dumps(
        {"stage1_model": "mstar-org/mstar-stage1", "manifest": "/data/tcga-pairs/manifest.csv", "eval_split": "val,test"}))

    out["aggregator"] = root / "mstar-aggregator-tiny"
    MStarSlideAggregator(aggregator_config("tiny", input_dim=64)).save_pretrained(out["aggregator"])

    tokenizer = train_report_tokenizer(REPORTS * 4, vocab_size=64)
    out["mstar"] = root / "mstar-tiny"
    MStarModel(mstar_config("tiny", num_genes=12, vocab_size=len(tokenizer))).eval().save_pretrained(out["mstar"])
    MStarProcessor(image_processor=MStarImageProcessor(), tokenizer=tokenizer,
                   gene_vocab=[f"G{i}" for i in range(12)]).save_pretrained(out["mstar"])
    (out["mstar"] / "training_args.json").write_text(json.dumps(STAGE1_ARGS))
    (out["mstar"] / "eval_results.json").write_text(json.dumps(STAGE1_RESULTS))

    bpe = load_training_script().train_bpe_tokenizer(REPORTS * 3, vocab_size=300, min_frequency=1)
    config = tiny_report_config(input_dim=64, vocab_size=len(bpe), bos_token_id=bpe.bos_token_id,
                                eos_token_id=bpe.eos_token_id, pad_token_id=bpe.pad_token_id)
    reporter = MStarForReportGeneration(config).attach_patch_model(MStarPatchModel(patch_config("tiny"))).eval()
    out["report"] = root / "mstar-report-tiny"
    reporter.save_pretrained(out["report"])
    bpe.save_pretrained(out["report"])
    MStarImageProcessor().save_pretrained(out["report"])

    # a generator without a patch encoder reads features only: its card's snippet says so
    out["report_features"] = root / "mstar-report-features-tiny"
    config = tiny_report_config(input_dim=64, vocab_size=len(bpe), bos_token_id=bpe.bos_token_id,
                                eos_token_id=bpe.eos_token_id, pad_token_id=bpe.pad_token_id)  # attach_patch_model set the other's
    MStarForReportGeneration(config).eval().save_pretrained(out["report_features"])
    bpe.save_pretrained(out["report_features"])

    out["gene"] = root / "mstar-gene-tiny"
    MStarGeneEncoder(gene_config("tiny", num_genes=12)).save_pretrained(out["gene"])
    return out


@pytest.fixture(scope="module")
def cards(folders):
    """{kind: rendered card}; the snippets load the folder itself (a local path is a valid model id)."""
    kwargs = {"mstar": {"datasets": "mstar-org/tcga-pairs"}, "patch": {"datasets": ["mstar-org/tcga-pairs"]}}
    return {kind: ModelCard(str(render_model_card(folder, repo_id=str(folder), **kwargs.get(kind, {}))))
            for kind, folder in folders.items()}


def test_pipeline_tag_only_where_the_standard_pipeline_works(cards):
    assert cards["patch"].data.pipeline_tag == "image-feature-extraction"
    for kind in ("aggregator", "mstar", "report", "report_features", "gene"):
        assert cards[kind].data.pipeline_tag is None, kind  # no standard pipeline runs a slide-level model
    assert {"wsi-zero-shot", "wsi-feature-extraction"} <= set(cards["mstar"].data.tags)
    assert "wsi-report-generation" in cards["report"].data.tags
    for kind, card in cards.items():
        blocks = "\n".join(python_blocks(card.content))
        assert "import mstar_hf" not in blocks and "trust_remote_code=True" in blocks, kind
        for task in ("feature-extraction", "zero-shot-image-classification", "image-to-text"):
            assert f'pipeline("{task}"' not in blocks, (kind, task)
    assert '"slide.svs"' in cards["report"].content and '"slide.svs"' not in cards["report_features"].content
    assert 'pipeline("wsi-zero-shot"' in cards["mstar"].content
    assert "candidate_labels=" in cards["mstar"].content and "hypothesis_template=" in cards["mstar"].content


def test_base_model_and_model_index(cards):
    data = cards["mstar"].data
    # a Stage 1 model is built from its patch encoder and its text encoder
    assert data.base_model == ["mstar-org/mstar-patch", "dmis-lab/biobert-base-cased-v1.2"]
    assert cards["patch"].data.base_model == "mstar-org/mstar-stage1"  # Stage 2: from the Stage 1 model
    (result,) = data.eval_results
    # the manifest's folder is the Hub dataset the card names; the split is the run's eval_split
    assert result.dataset_type == "mstar-org/tcga-pairs" and result.dataset_split == "val"
    assert result.metric_value == 0.5 and result.metric_args == {"k": 1}
    assert cards["aggregator"].data.base_model is None and cards["aggregator"].data.eval_results is None


SNIPPET_RUNNER = textwrap.dedent("""
    import json, os, sys, traceback
    mode, plan = sys.argv[1], json.loads(sys.argv[2])
    if mode == "without":
        sys.modules["mstar_hf"] = None  # as on a machine without the package: only the repos' code may run
    else:
        import mstar_hf  # noqa: F401
    for kind, workdir, blocks in plan:
        os.chdir(workdir)
        for i, block in enumerate(blocks):
            print(f"=== {kind} {i}", flush=True)
            try:
                exec(compile(block, f"<{kind} card, python block {i}>", "exec"), {"__name__": "__main__"})
            except Exception:
                traceback.print_exc(file=sys.stdout)
                print(f"!!! FAILED {kind} {i}", flush=True)
    if mode == "without":
        leaked = sorted(k for k in sys.modules if k.startswith("mstar_hf."))
        assert sys.modules["mstar_hf"] is None and not leaked, leaked
    print("=== done", flush=True)
""")


@pytest.mark.parametrize("mode", ["without", "with"])
def test_every_card_snippet_runs_as_pasted(cards, real_slide, tmp_path, mode):
    plan = []
    for kind, card in cards.items():
        workdir = tmp_path / kind
        workdir.mkdir()
        shutil.copyfile(real_slide, workdir / "slide.svs")  # the snippets' "slide.svs"
        plan.append((kind, str(workdir), python_blocks(card.content)))
    assert sum(len(blocks) for _, _, blocks in plan) >= 8
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", SNIPPET_RUNNER, mode, json.dumps(plan)], capture_output=True,
                            text=True, timeout=600, env=env)
    out = result.stdout
    assert result.returncode == 0 and "=== done" in out, out[-6000:] + result.stderr[-3000:]
    sections = {}  # "kind i" -> what that snippet printed
    for chunk in ("\n" + out).split("\n=== ")[1:]:
        head, _, body = chunk.partition("\n")
        sections[head] = body
    failed = sorted(k for k, v in sections.items() if "!!! FAILED" in v)
    assert not failed and "!!! FAILED" not in out, f"snippets that failed {mode} the package: {failed}\n{out[-6000:]}"
    # what the snippets printed: real results of the tiny models
    assert "'label': 'lung adenocarcinoma'" in out and "'label': 'lung squamous cell carcinoma'" in out
    assert "MStarPatchModel (1, 64)" in out  # the patch encoder's class token per tile
    assert "1 (1, 64)" in out  # the image-feature-extraction pipeline: one [1, 64] feature per tile


def test_patch_encoder_card_snippets_run_against_the_hub_without_the_package(hub_server, folders, tmp_path):  # noqa: F811
    """Pushed with `push_folder` (the card rendered for the repo id), downloaded as a user would."""
    from huggingface_hub import hf_hub_download

    from mstar_hf.hub import push_folder

    repo_id = "mstar-tester/mstar-patch-tiny"
    push_folder(folders["patch"], repo_id, card_kwargs={"datasets": ["mstar-org/tcga-pairs"]})
    card = ModelCard.load(hf_hub_download(repo_id, "README.md"))
    assert card.data.pipeline_tag == "image-feature-extraction" and card.data.base_model == "mstar-org/mstar-stage1"
    plan = [("patch", str(tmp_path), python_blocks(card.content))]
    assert all(repo_id in block for block in plan[0][2])
    env = {**hub_server.env, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", SNIPPET_RUNNER, "without", json.dumps(plan)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0 and "=== done" in result.stdout and "!!! FAILED" not in result.stdout, \
        result.stdout[-4000:] + result.stderr[-3000:]
    assert "1 (1, 64)" in result.stdout and "MStarPatchModel (1, 64)" in result.stdout
