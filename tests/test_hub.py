"""Publishing to the Hub: push -> download -> load round trips, model cards and bad input, against the local
Hub in tests/hub_server.py. Client side everything is the real huggingface_hub / transformers.

The model pushed here is a tiny BERT whose config class carries an mSTAR model_type, so these tests need
nothing from the mSTAR modelling code; loading goes through the explicit class (or, in the card-snippet
test, through an Auto registration made in the subprocess).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hub_fixtures/hub_server, whatever the import mode
SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)

from hub_fixtures import hub_server  # noqa: E402,F401  (pytest fixture)

from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download  # noqa: E402

from mstar_hf.hub import (  # noqa: E402
    PushError,
    PushInputError,
    extract_python_snippet,
    push_folder,
    render_model_card,
)

# Defined as source so that subprocesses build exactly the same classes.
TINY_MODEL_SRC = '''
from transformers import BertConfig, BertModel

class TinyPatchConfig(BertConfig):
    model_type = "mstar_patch"

class TinyPatchModel(BertModel):
    config_class = TinyPatchConfig
'''
_ns: dict = {}
exec(TINY_MODEL_SRC, _ns)
TinyPatchConfig, TinyPatchModel = _ns["TinyPatchConfig"], _ns["TinyPatchModel"]

EVAL_RESULTS = [
    {"task": "retrieval", "metric": "recall@1", "name": "slide->report R@1", "value": 0.8, "dataset": "TCGA-BRCA", "split": "test"},
    {"task": "retrieval", "metric": "recall@5", "value": 0.95, "dataset": "TCGA-BRCA", "split": "test"},
    {"task": "zero-shot", "metric": "balanced_accuracy", "value": 0.71, "dataset": "TCGA-NSCLC"},
    {"task": "report-generation", "metric": "BLEU-4", "value": 0.12, "dataset": "TCGA reports"},
    {"task": "report-generation", "metric": "METEOR", "value": 0.16, "dataset": "TCGA reports"},
    {"task": "report-generation", "metric": "ROUGE-L", "value": 0.31, "dataset": "TCGA reports"},
]


def _subprocess_env(server, **extra):
    env = {**server.env, "PYTHONPATH": os.pathsep.join([SRC, server.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.update(extra)
    return env


@pytest.fixture
def tiny_folder(tmp_path):
    torch.manual_seed(0)
    config = TinyPatchConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=16)
    model = TinyPatchModel(config).eval()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    (folder / "training_args.json").write_text(json.dumps(
        {"learning_rate": 1e-4, "num_train_epochs": 2, "model_name_or_path": "MahmoodLab/UNI", "hub_token": "hf_secret"}))
    (folder / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    return folder


def _push(folder, repo_id="mstar-tester/tiny-patch", **kwargs):
    kwargs.setdefault("card_kwargs", {"datasets": ["mstar-org/tcga-pairs"]})
    return push_folder(folder, repo_id, **kwargs)


def test_push_download_load_roundtrip(hub_server, tiny_folder):
    info = _push(tiny_folder)
    repo_id = "mstar-tester/tiny-patch"
    assert info.repo_url.repo_id == repo_id and len(info.oid) == 40

    # One commit on top of the repo's initial one, holding every file of the folder plus the rendered card.
    repo = hub_server.repo(repo_id)
    head = repo.commits[repo.branches["main"]]
    assert head.oid == info.oid and repo.commits[head.parent].parent is None
    local = {p.name for p in tiny_folder.iterdir()}
    assert set(head.files) == local | {"README.md", ".gitattributes"}
    assert head.files["model.safetensors"].lfs_sha256  # weights went through the LFS protocol
    assert head.files["config.json"].lfs_sha256 is None  # small text files are regular uploads

    model_info = HfApi().model_info(repo_id, files_metadata=True)
    assert model_info.sha == info.oid
    assert {s.rfilename for s in model_info.siblings} == set(head.files)
    assert model_info.pipeline_tag == "image-feature-extraction" and model_info.library_name == "transformers"

    path = Path(snapshot_download(repo_id))
    for name in local:
        assert (path / name).read_bytes() == (tiny_folder / name).read_bytes(), name

    original = TinyPatchModel.from_pretrained(tiny_folder).eval()
    loaded = TinyPatchModel.from_pretrained(repo_id).eval()
    ref, got = original.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).pooler_output, loaded(input_ids=ids).pooler_output)


def test_load_from_cache_offline_in_subprocess(hub_server, tiny_folder):
    repo_id = "mstar-tester/tiny-patch"
    _push(tiny_folder)
    snapshot = snapshot_download(repo_id)
    hub_server.stop()  # nothing may reach the network from here on
    code = TINY_MODEL_SRC + f'''
import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
assert snapshot_download({repo_id!r}) == {snapshot!r}
model = TinyPatchModel.from_pretrained({repo_id!r})
reference = load_file({str(tiny_folder / "model.safetensors")!r})
state = model.state_dict()
assert all(torch.equal(state[k], v) for k, v in reference.items()), "weights differ"
print("offline-ok", len(reference))
'''
    result = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(hub_server, HF_HUB_OFFLINE="1"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offline-ok" in result.stdout


def test_card_metadata_and_snippet_runs_against_downloaded_repo(hub_server, tiny_folder):
    repo_id = "mstar-tester/tiny-patch"
    _push(tiny_folder)
    card = ModelCard.load(hf_hub_download(repo_id, "README.md"))
    data = card.data
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-feature-extraction"  # the standard pipeline that runs a patch encoder
    assert {"pathology", "histology", "whole-slide-image", "multimodal", "mstar"} <= set(data.tags)
    assert data.base_model == "MahmoodLab/UNI"  # from training_args.json
    assert data.datasets == ["mstar-org/tcga-pairs"]
    assert data.model_name == "tiny-patch"
    by_name = {r.metric_name: r for r in data.eval_results}
    assert by_name["slide->report R@1"].metric_value == 0.8 and by_name["slide->report R@1"].metric_args == {"k": 1}
    assert by_name["R@5"].dataset_split == "test"
    assert by_name["Balanced accuracy"].task_type == "zero-shot-image-classification"
    assert {"BLEU-4", "METEOR", "ROUGE-L"} <= set(by_name)
    assert by_name["ROUGE-L"].task_type == "image-to-text"
    text = card.text
    for needle in ("20x", "0.5 um per pixel", "256 x 256", "224", "1024-d", "level-0 pixels", "Research use only",
                   "Not for diagnosis", "2407.15362", "Nature Communications", "mstar-hf extract", "learning_rate"):
        assert needle in text, needle
    assert "hf_secret" not in card.content  # secrets of the run never reach the card

    # The snippets load the pushed repo id; tests/test_model_cards.py runs them against real tiny models.
    snippets = "\n".join(extract_python_snippet(card.content, i) for i in range(2))
    assert f'pipeline("image-feature-extraction", model="{repo_id}", trust_remote_code=True)' in snippets
    assert f'AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)' in snippets


@pytest.mark.parametrize(
    "model_type, pipeline_tag, heading",
    [
        ("mstar_patch", "image-feature-extraction", "mSTAR patch encoder"),
        ("mstar_aggregator", None, "mSTAR slide aggregator"),
        ("mstar", None, "mSTAR multimodal whole-slide model"),
        ("mstar_report_generation", None, "mSTAR pathology report generator"),
        ("mstar_gene", None, "mSTAR RNA-Seq gene encoder"),
    ],
)
def test_template_per_model_type_validates_on_hub(hub_server, tmp_path, model_type, pipeline_tag, heading):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    card = render_model_card(tmp_path, repo_id="someone/model-x", license="cc-by-nc-4.0")
    card.validate()  # the Hub's validate-yaml route (local server) accepts the metadata
    parsed = ModelCard(str(card))
    assert parsed.data.pipeline_tag == pipeline_tag and parsed.data.license == "cc-by-nc-4.0"
    assert heading in parsed.text and "model-index" not in parsed.data.to_dict()
    assert 'model="someone/model-x", trust_remote_code=True)' in parsed.content \
        or 'from_pretrained("someone/model-x", trust_remote_code=True)' in parsed.content
    if model_type == "mstar":
        assert 'pipeline("wsi-zero-shot", model="someone/model-x", trust_remote_code=True)' in parsed.text
        assert {"wsi-zero-shot", "wsi-feature-extraction"} <= set(parsed.data.tags)
    if model_type == "mstar_report_generation":
        assert 'pipeline("wsi-report-generation", model="someone/model-x", trust_remote_code=True)' in parsed.text


def test_cli_push_in_subprocess_with_env_endpoint(hub_server, tiny_folder):
    (tiny_folder / "checkpoint-10").mkdir()
    (tiny_folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"\0" * 10)
    (tiny_folder / "README.md").write_text("---\nlicense: mit\n---\n# My own card\n")
    result = subprocess.run(
        [sys.executable, "-m", "mstar_hf.cli", "push", str(tiny_folder), "--repo-id", "mstar-tester/cli-model",
         "--private", "--commit-message", "first release"],
        env=_subprocess_env(hub_server), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub_server.repo("mstar-tester/cli-model")
    head = repo.commits[repo.branches["main"]]
    assert repo.private and head.title == "first release" and head.oid in result.stdout
    assert not any(p.startswith("checkpoint-") for p in head.files)  # training state stays local
    assert hub_server.files("mstar-tester/cli-model")["README.md"] == (tiny_folder / "README.md").read_bytes()


@pytest.mark.parametrize("hub_server", [{"lfs": False}], indirect=True)
def test_push_with_regular_uploads_only(hub_server, tiny_folder):
    # A Hub that takes every file inline in the commit (no LFS): same result for the client.
    info = _push(tiny_folder)
    head = hub_server.repo("mstar-tester/tiny-patch").commits[info.oid]
    assert all(entry.lfs_sha256 is None for entry in head.files.values())
    assert not any("/info/lfs/" in path for _, path, _ in hub_server.requests)
    path = Path(snapshot_download("mstar-tester/tiny-patch"))
    assert load_file(path / "model.safetensors").keys() == load_file(tiny_folder / "model.safetensors").keys()
    assert (path / "model.safetensors").read_bytes() == (tiny_folder / "model.safetensors").read_bytes()


def test_push_to_branch_leaves_main_untouched(hub_server, tiny_folder):
    info = _push(tiny_folder, revision="dev")
    api = HfApi()
    assert api.list_repo_files("mstar-tester/tiny-patch") == [".gitattributes"]
    assert "model.safetensors" in api.list_repo_files("mstar-tester/tiny-patch", revision="dev")
    assert api.model_info("mstar-tester/tiny-patch", revision="dev").sha == info.oid


# ---------------------------------------------------------------- bad input


def test_folder_without_weights_is_refused_before_any_request(hub_server, tiny_folder):
    weights = tiny_folder / "model.safetensors"
    weights.rename(tiny_folder / "pytorch_model.bin")
    with pytest.raises(PushInputError, match=r"no \*\.safetensors weights.*pytorch_model\.bin"):
        _push(tiny_folder)
    assert hub_server.requests == []


def test_truncated_weights_are_refused(hub_server, tiny_folder):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(PushInputError, match="not a valid safetensors file.*truncated"):
        _push(tiny_folder)
    assert hub_server.requests == []


@pytest.mark.parametrize("model_type", ["bert", None])
def test_config_of_another_model_type_is_refused(hub_server, tiny_folder, model_type):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["model_type"] = model_type
    (tiny_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PushInputError, match="not an mSTAR model.*mstar_patch"):
        _push(tiny_folder)
    assert hub_server.requests == []


def test_missing_config_is_refused(hub_server, tiny_folder):
    (tiny_folder / "config.json").unlink()
    with pytest.raises(PushInputError, match="no config.json"):
        _push(tiny_folder)


@pytest.mark.parametrize("repo_id", ["bad repo id", "a/b/c", "ns/x--y", "", "ns/name.git"])
def test_invalid_repo_id_is_refused_before_any_request(hub_server, tiny_folder, repo_id):
    with pytest.raises(PushInputError, match="Invalid repo id"):
        _push(tiny_folder, repo_id=repo_id)
    assert hub_server.requests == []


def test_malformed_eval_results_are_refused_before_any_request(hub_server, tiny_folder):
    (tiny_folder / "eval_results.json").write_text(json.dumps([{"task": "retrieval", "metric": "recall@1", "value": "high"}]))
    with pytest.raises(PushInputError, match="entry 0 is missing dataset"):
        _push(tiny_folder)
    assert hub_server.requests == []


def test_missing_token_is_refused_before_any_request(hub_server, tiny_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PushInputError, match="No Hugging Face token"):
        _push(tiny_folder)
    assert hub_server.requests == []


def test_rejected_token_401_publishes_nothing(hub_server, tiny_folder):
    with pytest.raises(PushError, match=r"HTTP 401.*Nothing was published") as excinfo:
        _push(tiny_folder, token="hf_not_a_valid_token")
    assert excinfo.value.status_code == 401 and not excinfo.value.published and not excinfo.value.repo_exists
    assert hub_server.repo("mstar-tester/tiny-patch") is None


def test_server_error_500_on_commit_publishes_nothing(hub_server, tiny_folder):
    hub_server.fail_commit_status = 500
    with pytest.raises(PushError, match=r"HTTP 500.*create_repo succeeded.*none of the files") as excinfo:
        _push(tiny_folder)
    error = excinfo.value
    assert error.status_code == 500 and error.repo_exists and not error.published
    # The repo was created, but it holds nothing from the failed push: no half-uploaded files.
    assert HfApi().list_repo_files("mstar-tester/tiny-patch") == [".gitattributes"]
    assert len(hub_server.repo("mstar-tester/tiny-patch").commits) == 1

    hub_server.fail_commit_status = None  # the same push succeeds once the Hub recovers
    info = _push(tiny_folder)
    assert "model.safetensors" in HfApi().list_repo_files("mstar-tester/tiny-patch", revision=info.oid)


def test_private_push_into_existing_public_repo_is_refused(hub_server, tiny_folder):
    hub_server.create_repo("mstar-tester/tiny-patch", private=False)
    with pytest.raises(PushError, match="is public; refusing a --private push"):
        _push(tiny_folder, private=True)
    assert HfApi().list_repo_files("mstar-tester/tiny-patch") == [".gitattributes"]


def test_cli_reports_bad_input_with_exit_code(hub_server, tiny_folder, capsys):
    from mstar_hf.cli import main

    assert main(["push", str(tiny_folder), "--repo-id", "not//valid"]) == 2
    assert "Invalid repo id" in capsys.readouterr().err
    hub_server.fail_commit_status = 500
    assert main(["push", str(tiny_folder), "--repo-id", "mstar-tester/x"]) == 1
    assert "none of the files of this push were published" in capsys.readouterr().err
