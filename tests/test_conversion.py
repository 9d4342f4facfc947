import os
import pickle

import numpy as np
import pytest
import timm
import torch
from nystrom_attention import NystromAttention
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModel

from mstar_hf import MStarSlideAggregator
from mstar_hf.cli import main as cli_main
from mstar_hf.conversion import ConversionError, convert_aggregator_checkpoint, convert_patch_checkpoint
from mstar_hf.presets import aggregator_config, patch_config

TINY_TIMM = dict(num_classes=0, depth=2, embed_dim=64, num_heads=2, init_values=1e-5, dynamic_img_size=True)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_timm_checkpoint_converts_to_identical_model(tmp_path, suffix):
    torch.manual_seed(1)
    reference = timm.create_model("vit_tiny_patch16_224", **TINY_TIMM).eval()
    # perturb LayerScale so the check is not dominated by the 1e-5 init
    with torch.no_grad():
        for block in reference.blocks:
            block.ls1.gamma.normal_()
            block.ls2.gamma.normal_()
    path = tmp_path / f"mSTAR{suffix}"
    state = reference.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    convert_patch_checkpoint(path, tmp_path / "hf", patch_config("tiny"))
    model = AutoModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        diff = (model(x).pooler_output - reference(x)).abs().max().item()
    assert diff <= 1e-5
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()


def test_convert_cli(tmp_path, capsys):
    reference = timm.create_model("vit_tiny_patch16_224", **TINY_TIMM)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    code = cli_main(["convert", str(tmp_path / "w.pth"), "--out", str(tmp_path / "out"), "--architecture",
                     "vit_tiny_patch16_224", "--timm-kwargs",
                     '{"depth": 2, "embed_dim": 64, "num_heads": 2, "init_values": 1e-5, "dynamic_img_size": true}'])
    assert code == 0 and "MStarPatchModel" in capsys.readouterr().out
    assert (tmp_path / "out" / "config.json").is_file()
    # the same checkpoint against the wrong architecture: a clear error listing keys, exit code 1
    code = cli_main(["convert", str(tmp_path / "w.pth"), "--out", str(tmp_path / "bad"), "--architecture",
                     "vit_tiny_patch16_224", "--timm-kwargs", '{"depth": 3, "embed_dim": 64, "num_heads": 2}'])
    assert code == 1 and "missing keys ['blocks.2." in capsys.readouterr().out


def test_bad_checkpoints(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_224", **TINY_TIMM)
    state = reference.state_dict()
    state.pop("blocks.1.mlp.fc2.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ConversionError) as err:
        convert_patch_checkpoint(tmp_path / "partial.pth", tmp_path / "o", patch_config("tiny"))
    assert "partial.pth" in str(err.value)
    assert "missing keys ['blocks.1.mlp.fc2.bias']" in str(err.value)
    assert "unexpected keys ['extra.weight']" in str(err.value)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConversionError, match="junk.bin: cannot read"):
        convert_patch_checkpoint(tmp_path / "junk.bin", tmp_path / "o", patch_config("tiny"))
    with pytest.raises(ConversionError, match="no such checkpoint"):
        convert_patch_checkpoint(tmp_path / "nope.pth", tmp_path / "o", patch_config("tiny"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_pickles_are_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"w": _Evil()}, handle)
    with pytest.raises(ConversionError, match="evil.pth"):
        convert_patch_checkpoint(tmp_path / "evil.pth", tmp_path / "o", patch_config("tiny"))
    assert not (tmp_path / "pwned_by_pickle").exists()


# ---- the TransMIL reference (github.com/szc19990412/TransMIL), as mSTAR's aggregator uses it ----
class _TransLayer(nn.Module):
    def __init__(self, dim, heads, landmarks):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, dim_head=dim // heads, heads=heads, num_landmarks=landmarks,
                                     pinv_iterations=6, residual=True, dropout=0.1)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class _PPEG(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, H, W):
        B, _, C = x.shape
        cls_token, feat_token = x[:, 0], x[:, 1:]
        cnn_feat = feat_token.transpose(1, 2).view(B, C, H, W)
        x = self.proj(cnn_feat) + cnn_feat + self.proj1(cnn_feat) + self.proj2(cnn_feat)
        x = x.flatten(2).transpose(1, 2)
        return torch.cat((cls_token.unsqueeze(1), x), dim=1)


class _TransMIL(nn.Module):
    def __init__(self, in_dim, dim, heads, landmarks, n_classes=2):
        super().__init__()
        self.pos_layer = _PPEG(dim)
        self._fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(0.25))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = _TransLayer(dim, heads, landmarks)
        self.layer2 = _TransLayer(dim, heads, landmarks)
        self.norm = nn.LayerNorm(dim)
        self._fc2 = nn.Linear(dim, n_classes)

    def forward(self, data):
        h = self._fc1(data.float())
        H = h.shape[1]
        _H = _W = int(np.ceil(np.sqrt(H)))
        h = torch.cat([h, h[:, : _H * _W - H, :]], dim=1)
        h = torch.cat((self.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
        h = self.layer1(h)
        h = self.pos_layer(h, _H, _W)
        h = self.layer2(h)
        return self.norm(h)


@pytest.mark.parametrize("prefix", ["", "vision_encoder."])
def test_transmil_layout_converts(tmp_path, prefix):
    torch.manual_seed(0)
    reference = _TransMIL(in_dim=64, dim=32, heads=2, landmarks=16).eval()
    state = {prefix + k: v for k, v in reference.state_dict().items()}
    if prefix:
        state["text_encoder.whatever"] = torch.zeros(1)  # other towers of a multimodal checkpoint are ignored
    torch.save(state, tmp_path / "agg.pth")
    convert_aggregator_checkpoint(tmp_path / "agg.pth", tmp_path / "hf", aggregator_config("tiny", input_dim=64))
    model = AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(model, MStarSlideAggregator)
    for n in (5, 37, 100):
        x = torch.randn(1, n, 64)
        with torch.no_grad():
            expected = reference(x)
            out = model(x)
        assert torch.allclose(out.slide_embeds, expected[:, 0], atol=1e-5)
        assert torch.allclose(out.patch_embeds, expected[:, 1 : n + 1], atol=1e-5)


def test_transmil_bad_keys(tmp_path):
    reference = _TransMIL(in_dim=64, dim=32, heads=2, landmarks=16)
    state = reference.state_dict()
    state.pop("layer2.attn.res_conv.weight")
    state["layer3.attn.to_qkv.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "agg.pth")
    with pytest.raises(ConversionError, match=r"unexpected keys for a TransMIL aggregator \['layer3.attn.to_qkv.weight'\]"):
        convert_aggregator_checkpoint(tmp_path / "agg.pth", tmp_path / "hf", aggregator_config("tiny", input_dim=64))
    state.pop("layer3.attn.to_qkv.weight")
    torch.save(state, tmp_path / "agg.pth")
    with pytest.raises(ConversionError, match=r"missing keys \['layers.1.attn.res_conv.weight'\]"):
        convert_aggregator_checkpoint(tmp_path / "agg.pth", tmp_path / "hf", aggregator_config("tiny", input_dim=64))


class _TransMILPre(nn.Module):
    """The layout of the authors' downstream TransMIL_Pre: the pretrained aggregator as `vision_encoder`
    and a linear `classifier` on its class token."""

    def __init__(self, in_dim, dim, heads, landmarks, n_classes=3):
        super().__init__()
        self.vision_encoder = _TransMIL(in_dim, dim, heads, landmarks)
        del self.vision_encoder._fc2
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, data):
        return self.classifier(self.vision_encoder(data)[:, 0])


def _transmil_pre_checkpoint(path):
    """Saved as the authors' training loop does: DDP `module.` on the encoder keys only, in a wrapper dict."""
    torch.manual_seed(3)
    reference = _TransMILPre(in_dim=64, dim=32, heads=2, landmarks=16).eval()
    state = {("module." + k if k.startswith("vision_encoder.") else k): v for k, v in reference.state_dict().items()}
    torch.save({"model_state_dict": state, "epoch": 7}, path)
    return reference


def test_transmil_pre_head_kept_gives_the_reference_logits(tmp_path):
    from mstar_hf import MStarForSlideClassification

    reference = _transmil_pre_checkpoint(tmp_path / "pre.pth")
    convert_aggregator_checkpoint(tmp_path / "pre.pth", tmp_path / "hf", aggregator_config("tiny", input_dim=64),
                                  head="keep")
    model = MStarForSlideClassification.from_pretrained(tmp_path / "hf").eval()
    assert model.config.num_labels == 3
    for n in (7, 50):
        x = torch.randn(1, n, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, reference(x), atol=1e-5, rtol=1e-5)


def test_transmil_pre_head_dropped_with_a_log_line(tmp_path, capsys):
    reference = _transmil_pre_checkpoint(tmp_path / "pre.pth")
    # heads, head width and input width are read from the weights; the landmark count is not in them
    assert cli_main(["convert", str(tmp_path / "pre.pth"), "--kind", "aggregator", "--out", str(tmp_path / "agg"),
                     "--num-landmarks", "16"]) == 0
    out = capsys.readouterr().out
    assert "dropped the classification head ['classifier.bias', 'classifier.weight']" in out and "--head keep" in out
    model = AutoModel.from_pretrained(tmp_path / "agg").eval()
    assert isinstance(model, MStarSlideAggregator)
    x = torch.randn(1, 20, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).slide_embeds, reference.vision_encoder(x)[:, 0], atol=1e-5, rtol=1e-5)
    # keys that collide once `module.` is removed are an error, not a silent pick
    torch.save({"module.cls_token": torch.zeros(1, 1, 32), "cls_token": torch.ones(1, 1, 32)}, tmp_path / "dup.pth")
    with pytest.raises(ConversionError, match="both name 'cls_token'"):
        convert_aggregator_checkpoint(tmp_path / "dup.pth", tmp_path / "o")


def test_timm_hub_name_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli_main(["convert", "hf-hub:Wangyh/mSTAR", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 1 and "hf-hub:Wangyh/mSTAR" in out and "network" in out and "mSTAR.pth" in out
    assert not (tmp_path / "o").exists()


def _official_transform():
    """The authors' preprocessing: torchvision on a PIL image."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def test_official_weights_and_preprocessing_give_official_features_on_real_tiles(tmp_path, real_slide):
    """mSTAR.pth (timm ViT-L family, here 2 narrow blocks) converted + our extraction == timm + torchvision
    on 256 px tiles of the real CMU-1 slide; the tensor resize (`fast_resize`) does not reach that bar."""
    import openslide

    from mstar_hf import MStarImageProcessor
    from mstar_hf.wsi.extraction import extract_slide_features

    torch.manual_seed(5)
    kwargs = dict(depth=2, embed_dim=64, num_heads=2, init_values=1.0, dynamic_img_size=True)
    official = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, **kwargs).eval()
    torch.save(official.state_dict(), tmp_path / "mSTAR.pth")
    assert cli_main(["convert", str(tmp_path / "mSTAR.pth"), "--out", str(tmp_path / "hf"),
                     "--timm-kwargs", '{"depth": 2, "embed_dim": 64, "num_heads": 2, "init_values": 1.0, '
                                      '"dynamic_img_size": true}']) == 0
    model = AutoModel.from_pretrained(tmp_path / "hf").eval()
    processor = MStarImageProcessor.from_pretrained(tmp_path / "hf")

    coords = np.array([[x, y] for y in (256, 768, 1280) for x in (256, 1024, 1536)])
    osr = openslide.OpenSlide(str(real_slide))
    tiles = [osr.read_region((int(x), int(y)), 0, (256, 256)).convert("RGB") for x, y in coords]
    osr.close()
    with torch.no_grad():
        expected = official(torch.stack([_official_transform()(t) for t in tiles])).numpy()
        from_processor = model(**processor(tiles, return_tensors="pt")).pooler_output.numpy()
    _, extracted = extract_slide_features(real_slide, model, processor, coords=coords, num_workers=0, progress=False)
    np.testing.assert_allclose(from_processor, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(extracted, expected, rtol=0, atol=1e-5)
    fast = MStarImageProcessor(fast_resize=True)
    _, fast_features = extract_slide_features(real_slide, model, fast, coords=coords, num_workers=0, progress=False)
    assert np.abs(fast_features - expected).max() > 1e-4  # so the bar above tells the two resizes apart
