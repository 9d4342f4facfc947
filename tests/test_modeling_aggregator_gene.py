import pytest
import torch
from nystrom_attention import NystromAttention
from transformers import AutoModel

from mstar_hf import MStarGeneEncoder, MStarSlideAggregator
from mstar_hf.modeling.modeling_mstar_aggregator import MStarNystromAttention
from mstar_hf.presets import aggregator_config, gene_config


def test_attention_equals_the_nystrom_attention_package():
    """Chunked attention (any chunk size) == the package TransMIL uses, on unpadded and padded lengths."""
    config = aggregator_config("tiny", input_dim=64)
    config.chunk_size = 50
    ours = MStarNystromAttention(config).eval()
    reference = NystromAttention(dim=32, dim_head=16, heads=2, num_landmarks=16, pinv_iterations=6, residual=True).eval()
    reference.load_state_dict(ours.state_dict())
    for n in (3, 16, 130, 517):
        x = torch.randn(1, n, 32)
        with torch.no_grad():
            assert torch.allclose(ours(x), reference(x), atol=1e-5), n


def test_batched_equals_alone_for_unequal_lengths():
    torch.manual_seed(0)
    model = MStarSlideAggregator(aggregator_config("tiny", input_dim=64)).eval()
    lengths = [120, 37, 64, 37]
    feats = torch.randn(4, 120, 64)
    mask = torch.arange(120)[None] < torch.tensor(lengths)[:, None]
    feats[~mask] = 1e6  # padding content must not matter
    with torch.no_grad():
        batched = model(feats, mask)
        for i, n in enumerate(lengths):
            alone = model(feats[i : i + 1, :n])
            assert torch.allclose(batched.slide_embeds[i], alone.slide_embeds[0], atol=1e-4)
            assert torch.allclose(batched.patch_embeds[i, :n], alone.patch_embeds[0], atol=1e-4)
            assert torch.all(batched.patch_embeds[i, n:] == 0)
    assert batched.slide_embeds.shape == (4, 32) and batched.patch_embeds.shape == (4, 120, 32)
    assert torch.equal(batched.attention_mask, mask)


def test_aggregator_bad_inputs():
    model = MStarSlideAggregator(aggregator_config("tiny", input_dim=64))
    with pytest.raises(ValueError, match="expected 64-d patch features, got 1024-d"):
        model(torch.randn(1, 10, 1024))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(1, 0, 64))
    with pytest.raises(ValueError, match=r"empty bag: slides at batch index \[1\]"):
        model(torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool))
    bad = torch.randn(3, 5, 64)
    bad[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf .* batch index \[2\]"):
        model(bad)
    bad[2, 1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(bad)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(5,\)"):
        model(torch.randn(1, 5, 64), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, N, 64\]"):
        model(torch.randn(5, 64))


def test_aggregator_round_trip_and_checkpointing(tmp_path):
    torch.manual_seed(0)
    model = MStarSlideAggregator(aggregator_config("tiny", input_dim=64)).train()
    model.input_proj[2].p = 0.0
    for layer in model.layers:
        layer.attn.to_out[1].p = 0.0
    x = torch.randn(2, 50, 64)
    model(x).slide_embeds.square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(x).slide_embeds.square().sum().backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain[name], atol=1e-5), name
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(x).slide_embeds, loaded(x).slide_embeds)


def test_gene_encoder_runs_full_vocabulary_batch():
    """8 profiles x 17,425 genes forward on CPU: memory is linear in genes (FAVOR+, chunked)."""
    torch.manual_seed(0)
    model = MStarGeneEncoder(gene_config("small", num_genes=17425)).eval()
    bins = torch.randint(0, 8, (8, 17425))
    mask = torch.rand(8, 17425) > 0.2
    with torch.inference_mode():
        out = model(bins, mask)
        alone = model(bins[5:6], mask[5:6])
        bins_changed = bins.clone()
        bins_changed[~mask] = 7  # unmeasured genes are not attended to
        changed = model(bins_changed[5:6], mask[5:6])
    assert out.pooler_output.shape == (8, 64) and out.last_hidden_state.shape == (8, 17426, 64)
    assert torch.isfinite(out.pooler_output).all()
    assert torch.allclose(alone.pooler_output, out.pooler_output[5], atol=1e-5)
    assert torch.allclose(changed.pooler_output, alone.pooler_output, atol=1e-5)


def test_gene_encoder_bad_inputs(tmp_path):
    model = MStarGeneEncoder(gene_config("tiny", num_genes=30))
    with pytest.raises(ValueError, match="expected 30 genes"):
        model(torch.zeros(2, 29, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rna_bins must lie in \[0, 8\)"):
        model(torch.full((2, 30), 8))
    with pytest.raises(ValueError, match=r"no measured gene"):
        model(torch.zeros(2, 30, dtype=torch.long), torch.zeros(2, 30, dtype=torch.bool))
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    bins = torch.randint(0, 8, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(bins).pooler_output, loaded(bins).pooler_output)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gradients_equal_plain(use_reentrant):
    """Reentrant checkpointing runs the forward without grad: the layers must not add in place there."""
    torch.manual_seed(0)
    model = MStarSlideAggregator(aggregator_config("tiny", input_dim=64)).train()
    model.input_proj[2].p = 0.0
    for layer in model.layers:
        layer.attn.to_out[1].p = 0.0
    x = torch.randn(2, 50, 64)

    def grads():
        model.zero_grad()
        out = model(x)
        (out.slide_embeds.square().sum() + out.patch_embeds.sin().sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in model.layers)
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # inference keeps the in-place path and gives the same output as a training-mode forward without grad
    model.activation_checkpointing_disable()
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(x).slide_embeds, model.train()(x).slide_embeds.detach())


@pytest.mark.parametrize("n", [1, 37, 300])
def test_inference_path_equals_the_autograd_path(n):
    """The chunked in-place inference layer computes the same function as the differentiable one."""
    torch.manual_seed(n)
    config = aggregator_config("tiny", input_dim=64)
    config.chunk_size = 64  # several chunks, a conv halo across chunk borders, a partial last chunk
    model = MStarSlideAggregator(config).eval()
    x = torch.randn(2, n, 64)
    with torch.enable_grad():
        expected = model(x)
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got.slide_embeds, expected.slide_embeds.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.patch_embeds, expected.patch_embeds.detach(), rtol=1e-5, atol=1e-5)


def test_hidden_states_are_each_stage_in_the_layout_of_patch_embeds():
    """`output_hidden_states`: four stages of patch rows; the last one, normed, is `patch_embeds`; batched
    slides of unequal length get each their own rows (zeros where padded); the in-place inference layers
    do not overwrite a stage already returned."""
    torch.manual_seed(0)
    config = aggregator_config("tiny", input_dim=64)
    config.chunk_size = 16
    model = MStarSlideAggregator(config).eval()
    lengths = [50, 21, 50]
    feats = torch.randn(3, 50, 64)
    mask = torch.arange(50)[None] < torch.tensor(lengths)[:, None]
    with torch.enable_grad():
        reference = model(feats, mask, output_hidden_states=True)
    with torch.inference_mode():
        out = model(feats, mask, output_hidden_states=True)
        plain = model(feats, mask)
    assert plain.hidden_states is None and len(out.hidden_states) == 4
    for got, want in zip(out.hidden_states, reference.hidden_states):
        assert got.shape == (3, 50, 32)
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.patch_embeds, plain.patch_embeds)
    with torch.no_grad():
        torch.testing.assert_close(model.final_norm(out.hidden_states[-1])[mask], out.patch_embeds[mask])
        torch.testing.assert_close(out.hidden_states[0][mask], model.input_proj(feats)[mask])
        alone = model(feats[1:2, :21], output_hidden_states=True)
    for got, want in zip(out.hidden_states, alone.hidden_states):
        torch.testing.assert_close(got[1, :21], want[0], rtol=1e-4, atol=1e-4)
        assert torch.all(got[1, 21:] == 0)
    # the stages differ: each one is a different function of the slide
    assert all(not torch.allclose(a, b) for a, b in zip(out.hidden_states, out.hidden_states[1:]))
    assert len(model(feats, return_dict=False)) == 3
    assert len(model(feats, return_dict=False, output_hidden_states=True)) == 4
