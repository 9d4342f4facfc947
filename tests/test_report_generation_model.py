"""MStarForReportGeneration: regions, forward, generate (greedy / beam / sampling), overfitting a few
reports, save/load through the Auto classes, Stage 1 initialisation, bad input."""

import json

import numpy as np
import pytest
import torch
from report_generation_fixtures import (
    FEATURE_DIM,
    grid_coords,
    load_training_script,
    one_thread,
    overfit,
    tiny_report_config,
    type_features,
)
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoTokenizer

import mstar_hf
from mstar_hf import MStarForReportGeneration, MStarReportGenerationConfig, build_report_labels
from mstar_hf.evaluation.caption_metrics import compute_caption_metrics
from mstar_hf.modeling.modeling_mstar_report import assign_regions, hilbert_index


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _slides(num: int, seed: int = 0, sizes=None):
    rng = np.random.default_rng(seed)
    sizes = sizes or [int(rng.integers(10, 30)) for _ in range(num)]
    feats = [torch.from_numpy(type_features(i % 3, n, rng)) for i, n in enumerate(sizes)]
    coords = [torch.from_numpy(grid_coords(n, columns=5)) for n in sizes]
    longest = max(sizes)
    batch = {"patch_features": torch.zeros(num, longest, FEATURE_DIM),
             "patch_attention_mask": torch.zeros(num, longest, dtype=torch.bool),
             "patch_coords": torch.zeros(num, longest, 2, dtype=torch.long)}
    for i, n in enumerate(sizes):
        batch["patch_features"][i, :n] = feats[i]
        batch["patch_attention_mask"][i, :n] = True
        batch["patch_coords"][i, :n] = coords[i]
    return batch


def test_hilbert_order_visits_neighbours():
    side = 8
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    d = hilbert_index(x.flatten(), y.flatten())
    assert sorted(d.tolist()) == list(range(side * side))
    order = torch.argsort(d)
    path = torch.stack([x.flatten()[order], y.flatten()[order]], 1)
    steps = (path[1:] - path[:-1]).abs().sum(1)
    assert bool((steps == 1).all()), "consecutive Hilbert positions must be neighbouring cells"


def test_regions_are_compact_balanced_and_order_free():
    coords = torch.from_numpy(grid_coords(900, columns=30, step=256))
    regions = assign_regions(coords, 900, num_regions=10)
    assert torch.bincount(regions).tolist() == [90] * 10

    def spread(assignment):  # mean distance of a region's patches to its centre, in patches
        cells = coords.float() / 256
        return float(sum((cells[assignment == r] - cells[assignment == r].mean(0)).norm(dim=1).mean()
                         for r in range(10)) / 10)

    # Hilbert regions are compact blocks; cutting the row-major patch list gives 3-row strips
    compact, strips = spread(regions), spread(assign_regions(None, 900, num_regions=10))
    assert compact < 0.7 * strips, (compact, strips)
    coords, regions = coords[:100], assign_regions(coords[:100], 100, num_regions=4)
    # the grouping depends on where patches are, not on their order in the input
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    shuffled = assign_regions(coords[perm], 100, num_regions=4)
    assert torch.equal(shuffled, regions[perm])
    # without coords: runs of consecutive patches (HistGen), sizes differing by at most one
    plain = assign_regions(None, 10, num_regions=3)
    assert plain.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_config_defaults_and_validation():
    config = MStarReportGenerationConfig()
    assert config.region_size == 96 and config.text_config.model_type == "gpt2"
    assert config.text_config.n_layer == 3 and config.text_config.add_cross_attention
    assert config.is_encoder_decoder and config.decoder_start_token_id == config.bos_token_id
    bert = MStarReportGenerationConfig(text_config={"model_type": "bert", "num_hidden_layers": 3, "vocab_size": 100})
    assert bert.text_config.is_decoder and bert.text_config.add_cross_attention
    with pytest.raises(ValueError, match="region_pooling"):
        MStarReportGenerationConfig(region_pooling="max")
    with pytest.raises(ValueError, match="region_size"):
        MStarReportGenerationConfig(region_size=0)


def test_forward_shapes_masks_and_batch_independence():
    torch.manual_seed(0)
    model = MStarForReportGeneration(tiny_report_config()).eval()
    batch = _slides(3, sizes=[9, 25, 17])
    labels = torch.randint(3, 64, (3, 7))
    labels[0, 5:] = -100
    with torch.no_grad():
        out = model(**batch, labels=labels)
        enc = model.encoder(**batch)
    assert out.logits.shape == (3, 7, 64) and torch.isfinite(out.loss)
    # regions of 8 patches: 2, 4 and 3 regions, plus the slide token
    assert enc.last_hidden_state.shape == (3, 5, 32)
    assert enc.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert (enc.region_ids[0, 9:] == -1).all() and enc.region_ids[0, :9].max() == 1
    # a slide gives the same tokens and logits alone as in a padded batch
    with torch.no_grad():
        alone = model(patch_features=batch["patch_features"][:1, :9], patch_coords=batch["patch_coords"][:1, :9],
                      labels=labels[:1])
    torch.testing.assert_close(alone.encoder_last_hidden_state[0], enc.last_hidden_state[0, :3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.logits[0], out.logits[0], atol=1e-5, rtol=1e-4)


def test_mean_pooling_and_no_region_layers():
    model = MStarForReportGeneration(tiny_report_config(region_pooling="mean", num_region_layers=0)).eval()
    batch = _slides(2)
    with torch.no_grad():
        seqs = model.generate(**batch, max_new_tokens=4, num_beams=1)
    assert seqs.shape[0] == 2 and seqs.shape[1] <= 5


def test_generate_modes():
    torch.manual_seed(0)
    model = MStarForReportGeneration(tiny_report_config()).eval()
    assert model.generation_config.num_beams == 3 and model.generation_config.max_new_tokens == 100
    batch = _slides(2)
    start = model.config.decoder_start_token_id
    greedy = model.generate(**batch, num_beams=1, max_new_tokens=6)
    beam = model.generate(**batch, max_new_tokens=6)  # num_beams=3 from the generation config
    nocache = model.generate(**batch, num_beams=1, max_new_tokens=6, use_cache=False)
    torch.manual_seed(1)
    sampled = model.generate(**batch, do_sample=True, top_k=10, max_new_tokens=6, num_return_sequences=2)
    for seqs, rows in ((greedy, 2), (beam, 2), (sampled, 4)):
        assert seqs.shape[0] == rows and seqs.shape[1] <= 7 and bool((seqs[:, 0] == start).all())
    assert torch.equal(greedy, nocache), "the cross-attention cache must not change greedy decoding"


def test_overfits_a_handful_of_reports():
    """The model learns to write four reports from their slides: BLEU-4 on them close to 1."""
    from mstar_hf.data import cancer_type_keys, write_report

    rng = np.random.default_rng(0)
    keys = cancer_type_keys(3)
    reports = [write_report(keys[i % 3], rng) for i in range(4)]
    tokenizer = load_training_script().train_bpe_tokenizer(reports, vocab_size=1000, min_frequency=1)
    torch.manual_seed(0)
    config = tiny_report_config(vocab_size=len(tokenizer), text={"n_positions": 256, "n_embd": 64},
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    model = MStarForReportGeneration(config)
    batch = _slides(4, seed=1)
    batch["labels"] = build_report_labels(tokenizer, reports, max_length=250)
    losses = overfit(model, batch, steps=120, lr=3e-3)
    assert losses[-1] < 0.05 * losses[0], losses[::20]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    scores = {}
    for name, kwargs in (("greedy", {"num_beams": 1}), ("beam", {"num_beams": 3})):
        texts = tokenizer.batch_decode(model.generate(**inputs, max_new_tokens=150, **kwargs), skip_special_tokens=True)
        scores[name] = compute_caption_metrics(texts, reports)
    print("overfit losses", [round(x, 3) for x in losses[::30]], "BLEU-4 greedy / beam:",
          round(scores["greedy"]["BLEU-4"], 4), round(scores["beam"]["BLEU-4"], 4))
    assert scores["greedy"]["BLEU-4"] > 0.9 and scores["beam"]["BLEU-4"] > 0.9
    assert scores["beam"]["ROUGE-L"] > 0.9


def test_save_load_round_trip_through_auto_classes(tmp_path):
    tokenizer = load_training_script().train_bpe_tokenizer(["Tumor cells are present. Grade 2."] * 3, vocab_size=280)
    model = MStarForReportGeneration(tiny_report_config(vocab_size=len(tokenizer))).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mstar_report_generation"
    assert set(saved["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    for code in ("configuration_mstar_report.py", "modeling_mstar_report.py", "modeling_mstar_aggregator.py"):
        assert (tmp_path / code).is_file(), f"{code} must be copied for trust_remote_code"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MStarReportGenerationConfig)
    batch = _slides(2)
    expected = model.generate(**batch, max_new_tokens=8)
    for auto in (AutoModel, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(tmp_path)
        assert isinstance(loaded, MStarForReportGeneration)
        assert loaded.generation_config.num_beams == 3
        assert torch.equal(loaded.generate(**batch, max_new_tokens=8), expected)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.decode(reloaded("Grade 2.", add_special_tokens=False)["input_ids"]) == "Grade 2."


def test_init_aggregator_from_stage1_model(tmp_path):
    from mstar_hf.presets import mstar_config

    stage1 = AutoModel.from_config(mstar_config("tiny", num_genes=8, vocab_size=50))
    config = tiny_report_config(input_dim=stage1.config.aggregator_config.input_dim)
    model = MStarForReportGeneration(config).init_aggregator_from(stage1)
    for name, value in stage1.aggregator.state_dict().items():
        assert torch.equal(model.aggregator.state_dict()[name], value)
    stage1.save_pretrained(tmp_path)
    MStarForReportGeneration(config).init_aggregator_from(str(tmp_path))  # from a folder too
    with pytest.raises(ValueError, match="input_dim"):
        MStarForReportGeneration(tiny_report_config(input_dim=8)).init_aggregator_from(stage1)


def test_bad_input():
    model = MStarForReportGeneration(tiny_report_config()).eval()
    with pytest.raises(ValueError, match=f"expected {FEATURE_DIM}-d patch features, got 8-d"):
        model.generate(torch.randn(1, 10, 8), max_new_tokens=2)
    with pytest.raises(ValueError, match="patch_coords must have shape"):
        model.generate(torch.randn(1, 10, FEATURE_DIM), patch_coords=torch.zeros(1, 9, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(1, 4, FEATURE_DIM), torch.zeros(1, 4, dtype=torch.bool), labels=torch.ones(1, 3, dtype=torch.long))
    from mstar_hf import MStarPatchModel
    from mstar_hf.presets import patch_config

    with pytest.raises(ValueError, match="wrong feature width"):
        model.attach_patch_model(MStarPatchModel(patch_config("tiny")))  # 64-d encoder, 16-d aggregator


def test_build_report_labels():
    tokenizer = load_training_script().train_bpe_tokenizer(["alpha beta gamma delta"] * 3, vocab_size=270)
    labels = build_report_labels(tokenizer, ["alpha beta", "alpha beta gamma delta"], max_length=4)
    eos = tokenizer.eos_token_id
    assert labels.shape[0] == 2 and labels.shape[1] <= 4
    for row in labels:
        real = row[row != -100]
        assert real[-1] == eos and (real[:-1] != eos).all()
    with pytest.raises(ValueError, match="empty report list"):
        build_report_labels(tokenizer, [], max_length=8)
    with pytest.raises(ValueError, match=r"index \[1\]"):
        build_report_labels(tokenizer, ["ok", "  "], max_length=8)
    assert mstar_hf.build_report_labels is build_report_labels
