"""transformers habits on the mSTAR models: `attn_implementation`, inputs cast to the model dtype (bf16 end to
end, from a slide through the pipeline), and `get_*_features` with transformers 5 CLIP's conventions."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, CLIPConfig, CLIPModel, pipeline
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mstar_hf import MStarImageProcessor, MStarModel, MStarPatchModel
from mstar_hf.data import MStarProcessor, train_report_tokenizer
from mstar_hf.presets import mstar_config, patch_config

REPORTS = ["adenocarcinoma with gland formation", "squamous cell carcinoma with keratin pearls"]


@pytest.fixture(scope="module")
def saved_mstar(tmp_path_factory):
    """A tiny MStarModel folder with its processor (image processor + report tokenizer + gene vocabulary)."""
    torch.manual_seed(0)
    tokenizer = train_report_tokenizer(REPORTS * 4, vocab_size=64)
    model = MStarModel(mstar_config("tiny", num_genes=12, vocab_size=len(tokenizer))).eval()
    folder = tmp_path_factory.mktemp("mstar_conventions")
    model.save_pretrained(folder)
    MStarProcessor(image_processor=MStarImageProcessor(), tokenizer=tokenizer,
                   gene_vocab=[f"G{i}" for i in range(12)]).save_pretrained(folder)
    return folder


def _count_sdpa_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_attn_implementation_reaches_text_and_patch_encoders(saved_mstar, monkeypatch):
    eager = AutoModel.from_pretrained(saved_mstar, attn_implementation="eager").eval()
    sdpa = AutoModel.from_pretrained(saved_mstar, attn_implementation="sdpa").eval()
    default = AutoModel.from_pretrained(saved_mstar).eval()
    for model, want in ((eager, "eager"), (sdpa, "sdpa"), (default, "sdpa")):
        assert model.text_model.config._attn_implementation == want
        assert model.patch_model.config._attn_implementation == want
        # Nystrom / FAVOR+ attention have no backend to choose
        assert model.aggregator.config._attn_implementation == "eager" == model.rna_model.config._attn_implementation

    pixels, ids = torch.randn(2, 3, 224, 224), torch.randint(0, 14, (2, 6))
    calls = _count_sdpa_calls(monkeypatch)
    with torch.no_grad():
        ref_patch = eager.get_patch_features(pixel_values=pixels).pooler_output
        ref_text = eager.get_text_features(ids).pooler_output
        assert not calls  # eager really runs the explicit attention in timm and BERT
        got_patch = sdpa.get_patch_features(pixel_values=pixels).pooler_output
        assert calls  # timm's fused path
        n = len(calls)
        got_text = sdpa.get_text_features(ids).pooler_output
        assert len(calls) > n
    torch.testing.assert_close(got_patch, ref_patch, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_text, ref_text, atol=1e-5, rtol=1e-4)

    # switching after loading also reaches timm's blocks
    sdpa.set_attn_implementation("eager")
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(sdpa.get_patch_features(pixel_values=pixels).pooler_output, ref_patch)
    assert not calls and sdpa.text_model.config._attn_implementation == "eager"


def test_patch_model_attn_implementation_standalone(tmp_path):
    torch.manual_seed(0)
    MStarPatchModel(patch_config("tiny")).save_pretrained(tmp_path)
    pixels = torch.randn(1, 3, 224, 224)
    eager = MStarPatchModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = MStarPatchModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        a, b = eager(pixels).pooler_output, sdpa(pixels).pooler_output
    assert all(not blk.attn.fused_attn for blk in eager.backbone.blocks)
    assert all(blk.attn.fused_attn for blk in sdpa.backbone.blocks)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _cos(a, b):
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=-1)


def test_bf16_models_take_float32_inputs(saved_mstar):
    ref = MStarModel.from_pretrained(saved_mstar).eval()
    half = MStarModel.from_pretrained(saved_mstar, dtype=torch.bfloat16).eval()
    assert half.dtype == torch.bfloat16
    torch.manual_seed(1)
    feats, pixels = torch.randn(2, 30, 64), torch.randn(2, 3, 224, 224)  # float32, as readers and processors give
    ids, bins = torch.randint(0, 14, (2, 6)), torch.randint(0, 5, (2, 12))
    with torch.no_grad():
        for name, call in (
            ("slide", lambda m: m.get_slide_features(feats).pooler_output),
            ("text", lambda m: m.get_text_features(ids).pooler_output),
            ("rna", lambda m: m.get_rna_features(bins).pooler_output),
            ("patch", lambda m: m.get_patch_features(pixel_values=pixels).pooler_output),
            ("patch encoder", lambda m: m.patch_model(pixels).pooler_output),
        ):
            got, want = call(half), call(ref)
            assert got.dtype == torch.bfloat16, name
            assert (_cos(got, want) > 0.98).all(), (name, _cos(got, want))
        out = half(patch_features=feats, input_ids=ids, rna_bins=bins, return_loss=True)
    assert out.slide_embeds.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_bf16_pipeline_from_a_slide(saved_mstar, real_slide):
    # the folder carries its pipeline code (`custom_pipelines`), which transformers runs only when trusted
    fp32 = pipeline("wsi-feature-extraction", model=str(saved_mstar), device="cpu", trust_remote_code=True)
    bf16 = pipeline("wsi-feature-extraction", model=str(saved_mstar), device="cpu", dtype=torch.bfloat16,
                    trust_remote_code=True)
    assert bf16.model.dtype == torch.bfloat16
    want = fp32(str(real_slide), extraction_workers=0)
    got = bf16(str(real_slide), extraction_workers=0)
    assert got["num_patches"] == want["num_patches"] > 10
    a, b = torch.as_tensor(got["slide_embedding"]).float(), torch.as_tensor(want["slide_embedding"]).float()
    assert F.cosine_similarity(a, b, dim=0) > 0.98


def test_get_features_follow_transformers5_clip(saved_mstar):
    # the reference: what the installed transformers' CLIP returns
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=50, max_position_embeddings=16),
                                vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=16),
                                projection_dim=8)).eval()
    with torch.no_grad():
        clip_text = clip.get_text_features(input_ids=torch.randint(0, 50, (2, 5)))
        clip_tuple = clip.get_text_features(input_ids=torch.randint(0, 50, (2, 5)), return_dict=False)
    assert isinstance(clip_text, BaseModelOutputWithPooling) and clip_text.pooler_output.shape == (2, 8)
    assert isinstance(clip_tuple, tuple)

    model = MStarModel.from_pretrained(saved_mstar).eval()
    torch.manual_seed(2)
    feats, ids, bins = torch.randn(2, 20, 64), torch.randint(0, 14, (2, 6)), torch.randint(0, 5, (2, 12))
    mask = torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids, attention_mask=mask)
        slide = model.get_slide_features(feats)
        rna = model.get_rna_features(bins)
        # same type and fields as CLIP; pooler_output is projected and NOT normalised (as CLIP's)
        for out in (text, slide, rna):
            assert type(out) is type(clip_text) and out.pooler_output.shape == (2, model.config.projection_dim)
            assert not torch.allclose(out.pooler_output.norm(dim=-1), torch.ones(2))
        # hand-computed: projection of the last layer's [CLS] / of the aggregator's class token
        cls = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(text.pooler_output, model.text_projection(cls[:, 0]))
        torch.testing.assert_close(text.last_hidden_state, cls)
        agg = model.aggregator(feats)
        torch.testing.assert_close(slide.pooler_output, model.slide_projection(agg.slide_embeds))
        torch.testing.assert_close(slide.last_hidden_state, agg.patch_embeds)
        torch.testing.assert_close(rna.pooler_output, model.rna_projection(model.rna_model(bins).pooler_output))
        # return_dict=False -> a tuple, (last_hidden_state, pooler_output) as CLIP's
        as_tuple = model.get_slide_features(feats, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], slide.pooler_output)
        # hidden states pass through to the text encoder
        layers = model.config.text_config.num_hidden_layers
        assert len(model.get_text_features(ids, output_hidden_states=True).hidden_states) == layers + 1
        # the earlier call form stays: normalize=True/False returns the embedding tensor
        legacy = model.get_slide_features(feats, normalize=True)
        torch.testing.assert_close(legacy, F.normalize(slide.pooler_output, dim=-1))
        torch.testing.assert_close(model.get_text_features(ids, mask, normalize=False), text.pooler_output)
