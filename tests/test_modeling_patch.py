import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

import mstar_hf
from mstar_hf import MStarImageProcessor, MStarPatchConfig, MStarPatchModel
from mstar_hf.presets import patch_config


def test_init_is_timms_and_outputs_are_the_class_token():
    torch.manual_seed(0)
    config = MStarPatchConfig(architecture="vit_tiny_patch16_224", timm_kwargs={
        "depth": 2, "embed_dim": 64, "num_heads": 2, "init_values": 1e-5, "dynamic_img_size": True})
    model = MStarPatchModel(config).eval()
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=2, embed_dim=64, num_heads=2,
                                  init_values=1e-5, dynamic_img_size=True).eval()
    # post_init must not re-initialise the timm backbone (LayerScale stays 1e-5, etc.)
    for (name, ours), theirs in zip(model.backbone.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert torch.allclose(model.backbone.blocks[0].ls1.gamma, torch.full((64,), 1e-5))
    x = torch.randn(2, 3, 224, 224)
    out = model(pixel_values=x)
    assert out.pooler_output.shape == (2, 64)
    assert out.last_hidden_state.shape == (2, 197, 64)
    assert torch.allclose(out.pooler_output, reference(x), atol=1e-6)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    # dynamic image size: 256 px patches run without resizing
    assert model(torch.randn(1, 3, 256, 256)).last_hidden_state.shape == (1, 257, 64)


def test_auto_round_trip(tmp_path):
    model = MStarPatchModel(patch_config("tiny")).eval()
    processor = MStarImageProcessor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "preprocessor_config.json").is_file()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MStarPatchConfig) and config.hidden_size == 64
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MStarPatchModel) and loaded.dtype == torch.float32
    loaded_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded_processor, MStarImageProcessor)
    image = (torch.rand(3, 256, 256) * 255).to(torch.uint8)
    pixels = loaded_processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    expected = (torch.nn.functional.interpolate(image[None].float() / 255, size=224, mode="bilinear", antialias=True)
                - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(pixels, expected, atol=2e-2)
    with torch.no_grad():
        assert torch.equal(model(pixels).pooler_output, loaded(pixels).pooler_output)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = MStarPatchModel(patch_config("tiny")).train()
    model.backbone.pos_drop.p = 0.0
    x = torch.randn(2, 3, 224, 224)
    model(x).pooler_output.square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.gradient_checkpointing and model.backbone.grad_checkpointing
    model(x).pooler_output.square().sum().backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain[name], atol=1e-6), name
    model.activation_checkpointing_disable()
    assert not model.backbone.grad_checkpointing


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="unknown timm architecture 'vit_does_not_exist'"):
        MStarPatchModel(MStarPatchConfig(architecture="vit_does_not_exist"))
    with pytest.raises(ValueError, match="hidden_size=999"):
        MStarPatchModel(MStarPatchConfig(**{**patch_config("tiny").to_dict(), "hidden_size": 999}))
    with pytest.raises(ValueError, match="num_classes"):
        MStarPatchConfig(timm_kwargs={"num_classes": 3})
    model = MStarPatchModel(patch_config("tiny"))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 224, 224))


def test_trust_remote_code_without_the_package(tmp_path):
    """A saved folder carries auto_map + code; it loads where `mstar_hf` cannot be imported."""
    from mstar_hf.presets import mstar_config
    from mstar_hf import MStarModel

    torch.manual_seed(0)
    model = MStarModel(mstar_config("tiny", num_genes=20, vocab_size=50)).eval()
    model.save_pretrained(tmp_path / "model")
    MStarImageProcessor().save_pretrained(tmp_path / "model")
    feats = torch.randn(2, 9, 64)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        out = model(patch_features=feats, input_ids=ids, rna_bins=torch.ones(2, 20, dtype=torch.long))
    torch.save({"feats": feats, "ids": ids, "slide": out.slide_embeds, "text": out.text_embeds,
                "rna": out.rna_embeds}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["mstar_hf"] = None  # block the package: only the saved code may be used
        import torch
        from transformers import AutoModel, AutoImageProcessor
        try:
            import mstar_hf
            raise SystemExit("package import was not blocked")
        except ImportError:
            pass
        path = {str(tmp_path / "model")!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        proc = AutoImageProcessor.from_pretrained(path, trust_remote_code=True)
        assert type(proc).__name__ == "MStarImageProcessor", type(proc)
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        with torch.no_grad():
            out = model(patch_features=io["feats"], input_ids=io["ids"], rna_bins=torch.ones(2, 20, dtype=torch.long))
        for name, got in (("slide", out.slide_embeds), ("text", out.text_embeds), ("rna", out.rna_embeds)):
            assert torch.allclose(got, io[name], atol=1e-6), name
        print("REMOTE_OK")
    """)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "REMOTE_OK" in result.stdout, result.stdout + result.stderr
