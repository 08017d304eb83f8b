"""The CLIP model against open_clip (the reference implementation) on identical weights, plus checks of
single details against hand-written computations."""

import gc
import math
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clipsearch.model
from clipsearch.configs import get_config, list_configs
from clipsearch.errors import ModelLoadError
from clipsearch.model import (
    CLIP,
    AttentionPool2d,
    Bottleneck,
    LayerNorm,
    ModifiedResNet,
    MultiheadSelfAttention,
    QuickGELU,
    VisionTransformer,
    build_model,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "clipsearch" / "configs"
for _path in sorted(CONFIG_DIR.glob("*.json")):
    if _path.stem not in open_clip.list_models():
        open_clip.add_model_config(_path)  # so open_clip can build our small test/demo models too

TEXTS = [
    "a dog on a beach",
    "a photo of a small red bicycle leaning against a brick wall, taken at dusk in the old town",
]


def _roughen(model: nn.Module, seed: int = 1) -> None:
    """Give parameters that start constant (biases, LayerNorm/BatchNorm weights, BatchNorm running
    stats, ResNet bn3 at zero) random values, so no detail can hide behind a zero or a one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.c_fc.bias"):
                # Spread the MLP inputs over GELU's curved region, where QuickGELU differs from it.
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.c_proj.weight"):
                p.mul_(4.0)  # MLP outputs as large as in trained models, not drowned by the residual
            elif p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def _pair(name: str, cfg: dict, skip_init: bool = False, **create_kwargs):
    """(open_clip model, our model) in eval mode holding the same weights. ``skip_init`` builds ours on
    the meta device and assigns open_clip's tensors (saving a full-size random init, as checkpoint
    loading does); only the derived causal mask then needs rebuilding."""
    torch.manual_seed(0)
    ref = open_clip.create_model(name, pretrained=None, **create_kwargs).eval()
    _roughen(ref)
    if skip_init:
        with torch.device("meta"):
            ours = build_model(cfg).eval()
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
        ours.attn_mask = ours.build_attention_mask()
    else:
        ours = build_model(cfg).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _assert_close_rows(a: torch.Tensor, b: torch.Tensor, cos_min: float = 0.99999, rel: float = 1e-4):
    assert a.shape == b.shape
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1)
    assert cos.min().item() >= cos_min, cos
    assert (a - b).abs().max().item() <= rel * a.abs().max().item()


PARITY = [
    pytest.param("ViT-B-32-quickgelu", "ViT-B-32-quickgelu", None, marks=pytest.mark.slow),
    pytest.param("ViT-B-16-quickgelu", "ViT-B-16-quickgelu", None, marks=pytest.mark.slow),
    pytest.param("RN50-quickgelu", "RN50-quickgelu", None, marks=pytest.mark.slow),
    # OpenCLIP-style: GELU, and an image size the OpenAI releases never used.
    pytest.param("ViT-B-16", "ViT-B-16", 256, marks=pytest.mark.slow),
    ("tiny-vit", "tiny-vit", None),
    ("tiny-rn", "tiny-rn", None),
]


@pytest.mark.parametrize("ref_name,our_name,image_size", PARITY)
def test_features_match_open_clip(ref_name, our_name, image_size):
    cfg = get_config(our_name)
    kwargs = {}
    if image_size:
        cfg["vision_cfg"]["image_size"] = image_size
        kwargs["force_image_size"] = image_size
    ref, ours = _pair(ref_name, cfg, skip_init="tiny" not in our_name, **kwargs)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    tokens = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        _assert_close_rows(ref.encode_image(images), ours.encode_image(images))
        _assert_close_rows(ref.encode_text(tokens), ours.encode_text(tokens))
        if size <= 64:  # forward() too, where that costs little
            ref_img, ref_txt, ref_scale = ref(images, tokens)
            img, txt, scale = ours(images, tokens)
            _assert_close_rows(ref_img, img)
            _assert_close_rows(ref_txt, txt)
            assert scale.item() == pytest.approx(ref_scale.item())
    del ref, ours
    gc.collect()


def test_activation_choice_is_visible_in_features():
    """Swapping GELU for QuickGELU must break parity: the check above can see the activation."""
    ref, _ = _pair("tiny-vit", get_config("tiny-vit"))
    wrong = build_model({**get_config("tiny-vit"), "quick_gelu": True}).eval()
    wrong.load_state_dict(ref.state_dict(), strict=True)
    tokens = open_clip.tokenize(TEXTS)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cos_txt = F.cosine_similarity(ref.encode_text(tokens), wrong.encode_text(tokens))
        cos_img = F.cosine_similarity(ref.encode_image(images), wrong.encode_image(images))
    assert cos_txt.min() < 0.99999 and cos_img.min() < 0.99999


def test_quick_gelu_formula_and_placement():
    x = torch.linspace(-6, 6, 101)
    assert torch.allclose(QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)), atol=1e-6)
    quick = build_model(get_config("tiny-vit") | {"quick_gelu": True})
    plain = build_model(get_config("tiny-vit"))
    for model, act in ((quick, QuickGELU), (plain, nn.GELU)):
        blocks = [*model.transformer.resblocks, *model.visual.transformer.resblocks]
        assert all(type(b.mlp.gelu) is act for b in blocks)
    assert plain.transformer.resblocks[0].mlp.gelu.approximate == "none"  # exact erf GELU as OpenCLIP


def _torch_attention_pool(pool: AttentionPool2d, x: torch.Tensor, query_index: int | None) -> torch.Tensor:
    """torch's own multi-head attention over the grid plus a prepended mean token; the query is the
    mean token (query_index None) or one spatial token."""
    tokens = x.flatten(2).permute(2, 0, 1)  # [HW, B, C], torch's sequence-first layout
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens]) + pool.positional_embedding[:, None, :]
    q = tokens[:1] if query_index is None else tokens[1 + query_index : 2 + query_index]
    out, _ = F.multi_head_attention_forward(
        query=q,
        key=tokens,
        value=tokens,
        embed_dim_to_check=x.shape[1],
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    return out[0]  # [B, output_dim]


def test_attention_pool_uses_mean_token_as_query():
    torch.manual_seed(3)
    pool = AttentionPool2d(spacial_dim=3, embed_dim=16, num_heads=4, output_dim=8).eval()
    _roughen(pool)
    x = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        out = pool(x)
        mean_query = _torch_attention_pool(pool, x, None)
        first_query = _torch_attention_pool(pool, x, 0)
    assert out.shape == (2, 8)
    assert torch.allclose(out, mean_query, atol=1e-5)
    assert not torch.allclose(out, first_query, atol=1e-3)  # the comparison can tell the queries apart


def test_bottleneck_pools_before_its_strided_path():
    """Anti-aliased downsampling: stride-1 convs, a 2x2 average pool after conv2 and before the 1x1
    conv of the shortcut; no convolution strides."""
    torch.manual_seed(4)
    block = Bottleneck(8, 4, stride=2).eval()
    _roughen(block)
    x = torch.randn(2, 8, 6, 6)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    b = block
    with torch.no_grad():
        out = F.relu(bn(F.conv2d(x, b.conv1.weight), b.bn1))
        out = F.relu(bn(F.conv2d(out, b.conv2.weight, padding=1), b.bn2))
        out = bn(F.conv2d(F.avg_pool2d(out, 2), b.conv3.weight), b.bn3)
        short = bn(
            F.conv2d(F.avg_pool2d(x, 2), b.downsample.get_submodule("0").weight),
            b.downsample.get_submodule("1"),
        )
        expected = F.relu(out + short)
        got = block(x)
    assert got.shape == (2, 16, 3, 3)
    assert torch.allclose(got, expected, atol=1e-5)

    resnet = ModifiedResNet([1, 1, 1, 1], output_dim=8, heads=4, input_resolution=64, width=16)
    strided = [n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strided == ["conv1"]  # only the stem's first conv strides; everything else pools
    assert isinstance(resnet.avgpool, nn.AvgPool2d)  # the stem ends in an average pool, not a max pool


def test_vit_structure_details():
    model = build_model(get_config("tiny-vit"))
    v = model.visual
    assert isinstance(v, VisionTransformer)
    assert v.conv1.bias is None and v.conv1.stride == (16, 16)
    assert v.positional_embedding.shape == ((64 // 16) ** 2 + 1, 64)
    assert v.transformer.resblocks[0].attn.num_heads == 2  # width 64 / head_width 32
    assert model.transformer.resblocks[0].attn.num_heads == 4
    assert v.transformer.resblocks[0].mlp.c_fc.out_features == 256  # MLP ratio 4


def _eot_positions_seen(model: CLIP, tokens: torch.Tensor, cut: bool) -> tuple[torch.Tensor, int]:
    seen = []
    handle = model.transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append(args[0].shape[1]), with_kwargs=True
    )
    model._eot_cut = cut
    try:
        with torch.no_grad():
            feats = model.encode_text(tokens)
    finally:
        model._eot_cut = True
        handle.remove()
    return feats, seen[0]


@pytest.mark.parametrize("name", ["tiny-vit", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_eot_cut_gives_the_uncut_features(name):
    torch.manual_seed(5)
    cfg = get_config(name)
    cfg["vision_cfg"] = get_config("tiny-vit")["vision_cfg"]  # only the text tower matters here
    model = build_model(cfg).eval()
    _roughen(model)
    tokens = open_clip.tokenize(TEXTS + ["cat", ""])
    last_eot = int(tokens.argmax(dim=-1).max())
    cut, cut_len = _eot_positions_seen(model, tokens, cut=True)
    full, full_len = _eot_positions_seen(model, tokens, cut=False)
    assert (cut_len, full_len) == (last_eot + 1, 77)
    _assert_close_rows(full, cut, cos_min=0.999999, rel=1e-5)
    # Per row it matches encoding that row alone (which cuts even shorter).
    for i in range(tokens.shape[0]):
        alone, alone_len = _eot_positions_seen(model, tokens[i : i + 1], cut=True)
        assert alone_len == int(tokens[i].argmax()) + 1
        _assert_close_rows(full[i : i + 1], alone, cos_min=0.999999, rel=1e-5)
    del model
    gc.collect()


def _last_block_rows(model: CLIP, images: torch.Tensor, class_token_only: bool):
    """(image features, the rows the last ViT block's MLP computed, grads of every image-tower weight)."""
    rows = []
    handle = model.visual.transformer.resblocks[-1].mlp.register_forward_pre_hook(
        lambda m, args: rows.append(args[0].shape[1])
    )
    model.visual._class_token_only = class_token_only
    try:
        model.zero_grad()
        feats = model.encode_image(images)
        feats.square().sum().backward()
    finally:
        model.visual._class_token_only = True
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.visual.named_parameters()}
    return feats.detach(), rows[0], grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_class_token_only_last_block_gives_the_full_features_and_gradients(checkpointing):
    torch.manual_seed(9)
    model = build_model(get_config("tiny-vit"))
    _roughen(model)
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(3, 3, 64, 64)
    cut, cut_rows, cut_grads = _last_block_rows(model, images, class_token_only=True)
    full, full_rows, full_grads = _last_block_rows(model, images, class_token_only=False)
    assert (cut_rows, full_rows) == (1, (64 // 16) ** 2 + 1)  # the saving is real
    _assert_close_rows(full, cut, cos_min=0.999999, rel=1e-5)
    assert cut_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():  # training sees the same gradients, every weight included
        torch.testing.assert_close(cut_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_first_only_attention_is_the_first_row_of_the_full_attention_with_a_mask():
    # the text tower never asks for it, but the mask path must still be right: row 0 of the mask
    torch.manual_seed(3)
    attention = MultiheadSelfAttention(32, 4)
    x = torch.randn(2, 7, 32)
    mask = torch.full((7, 7), float("-inf")).triu_(1)
    with torch.no_grad():
        full = attention(x, attn_mask=mask)
        first = attention(x, attn_mask=mask, first_only=True)
    assert first.shape == (2, 1, 32)
    torch.testing.assert_close(first, full[:, :1], atol=1e-6, rtol=1e-5)


def test_eot_cut_shortens_only_to_the_batch_maximum():
    model = build_model(get_config("tiny-vit")).eval()
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[0, :3] = torch.tensor([49406, 320, 49407])
    tokens[1, :6] = torch.tensor([49406, 320, 1929, 525, 320, 49407])
    _, length = _eot_positions_seen(model, tokens, cut=True)
    assert length == 6


def test_layernorm_computes_in_fp32(monkeypatch):
    seen = []
    real = F.layer_norm

    def spy(x, *args, **kwargs):
        seen.append((x.dtype, *(a.dtype for a in args[1:3] if a is not None)))
        return real(x, *args, **kwargs)

    torch.manual_seed(6)
    ln = LayerNorm(32)
    _roughen(ln)
    x = (3 + torch.randn(4, 32) * 0.01).to(torch.bfloat16)
    expected = real(x.float(), (32,), ln.weight.float(), ln.bias.float(), 1e-5).to(torch.bfloat16)
    monkeypatch.setattr(F, "layer_norm", spy)
    assert torch.equal(ln(x), expected)  # fp32 weights, bf16 input
    ln16 = LayerNorm(32).to(torch.bfloat16)
    ln16.load_state_dict(ln.state_dict())
    out = ln16(x)
    assert out.dtype == torch.bfloat16
    ref16 = real(x.float(), (32,), ln16.weight.float(), ln16.bias.float(), 1e-5).to(torch.bfloat16)
    assert torch.equal(out, ref16)

    # A whole model, both on bf16 weights and under bf16 autocast: every LayerNorm ran in fp32.
    model = build_model(get_config("tiny-vit")).eval()
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(TEXTS)
    with torch.no_grad():
        ref_txt = model.encode_text(tokens)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto_txt = model.encode_text(tokens)
            model.encode_image(images)
        assert seen and all(d == torch.float32 for entry in seen for d in entry)
        model.to(torch.bfloat16)
        assert model.dtype == torch.bfloat16
        seen.clear()
        bf16_txt = model.encode_text(tokens)
        model.encode_image(images)
    assert seen and all(d == torch.float32 for entry in seen for d in entry)
    assert F.cosine_similarity(ref_txt, auto_txt.float()).min() > 0.99
    assert F.cosine_similarity(ref_txt, bf16_txt.float()).min() > 0.99


def _state_shapes(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list_configs())
def test_state_dict_keys_equal_open_clip(name):
    """Every named config has exactly open_clip's parameter and buffer names and shapes (built on the
    meta device: shapes without memory or initialisation cost)."""
    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, device="meta")
        ours = build_model(get_config(name))
    assert _state_shapes(ours) == _state_shapes(ref)
    assert "attn_mask" not in ours.state_dict()  # derived, non-persistent, as in OpenAI/OpenCLIP
    assert ours.config == get_config(name)


def _clip_loss(model: CLIP, images, tokens) -> torch.Tensor:
    img, txt, scale = model(images, tokens)
    logits = scale * img @ txt.T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_grad_checkpointing_gives_the_same_gradients(name, monkeypatch):
    torch.manual_seed(7)
    model = build_model(get_config(name))
    _roughen(model)
    model.train()
    images, tokens = torch.randn(3, 3, 64, 64), open_clip.tokenize(TEXTS + ["a cat"])

    def grads():
        model.zero_grad()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        loss = _clip_loss(model, images, tokens)
        loss.backward()
        model.load_state_dict(state)  # undo BatchNorm running-stat updates between the two runs
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, plain = grads()
    model.set_grad_checkpointing(True)
    calls = []
    real = clipsearch.model.checkpoint
    monkeypatch.setattr(clipsearch.model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss_b, ckpt = grads()
    assert len(calls) == 2 + (2 if name == "tiny-vit" else 0)  # one per transformer block
    model.set_grad_checkpointing(False)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("unlocked", [0, 1, 2, 3])
def test_lock_image_tower_matches_open_clip(unlocked):
    ref, ours = _pair("tiny-vit", get_config("tiny-vit"))
    ref.lock_image_tower(unlocked_groups=unlocked)
    ours.lock_image_tower(unlocked_groups=unlocked)
    got = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert got == {n: p.requires_grad for n, p in ref.named_parameters()}
    assert all(got[n] for n in got if not n.startswith("visual."))
    assert got["visual.proj"] == (unlocked > 0)
    assert got["visual.ln_post.weight"] == (unlocked > 1)


def test_lock_resnet_tower():
    """open_clip locks a ResNet only whole; partial unlocking here goes by stage, attnpool last."""
    ref, ours = _pair("tiny-rn", get_config("tiny-rn"))
    ref.lock_image_tower(unlocked_groups=0)
    ours.lock_image_tower(unlocked_groups=0)
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == {
        n: p.requires_grad for n, p in ref.named_parameters()
    }
    ours.lock_image_tower(unlocked_groups=2)
    trainable = {n.split(".")[1] for n, p in ours.visual.named_parameters(prefix="visual") if p.requires_grad}
    assert trainable == {"layer4", "attnpool"}
    ours.lock_image_tower(unlocked_groups=99)  # more groups than there are: nothing stays locked
    assert all(p.requires_grad for p in ours.parameters())
    with pytest.raises(ValueError):
        ours.lock_image_tower(unlocked_groups=-1)


def test_lock_image_tower_can_freeze_batchnorm_stats():
    ours = build_model(get_config("tiny-rn"))
    ours.lock_image_tower(unlocked_groups=1, freeze_bn_stats=True)  # attnpool trainable, no BN in it
    ours.train()
    before = {k: v.clone() for k, v in ours.state_dict().items() if "running" in k}
    ours.encode_image(torch.randn(2, 3, 64, 64))
    after = {k: v for k, v in ours.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ours.transformer.training  # only the locked BatchNorms stay in eval mode

    unfrozen = build_model(get_config("tiny-rn"))
    unfrozen.lock_image_tower(unlocked_groups=0)
    unfrozen.train()
    unfrozen.encode_image(torch.randn(2, 3, 64, 64))
    assert not torch.equal(unfrozen.visual.bn1.running_mean, torch.zeros(8))


def test_initialisation_follows_openai():
    torch.manual_seed(8)
    model = build_model(get_config("RN50") | {"text_cfg": get_config("tiny-vit")["text_cfg"]})
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.text_projection.std().item() == pytest.approx(64**-0.5, rel=0.1)
    block = model.transformer.resblocks[0]
    assert block.attn.in_proj_weight.std().item() == pytest.approx(64**-0.5, rel=0.1)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(128**-0.5, rel=0.1)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(64**-0.5 * 4**-0.5, rel=0.1)
    pool = model.visual.attnpool
    assert pool.q_proj.weight.std().item() == pytest.approx(2048**-0.5, rel=0.02)
    bn3 = [m.bn3.weight for layer in (model.visual.layer1, model.visual.layer4) for m in layer]
    assert all(torch.count_nonzero(w) == 0 for w in bn3)


def test_forward_normalises_and_accepts_one_side():
    model = build_model(get_config("tiny-rn")).eval()
    images, tokens = torch.randn(2, 3, 64, 64), open_clip.tokenize(TEXTS)
    with torch.no_grad():
        img, txt, scale = model(images, tokens)
        only_img = model(images, None)
        only_txt = model(text=tokens)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    assert torch.allclose(img, F.normalize(model.encode_image(images).detach(), dim=-1))
    assert only_img[1] is None and torch.allclose(only_img[0], img)
    assert only_txt[0] is None and torch.allclose(only_txt[1], txt)
    assert scale.item() == pytest.approx(1 / 0.07)
    assert img.shape == (2, 32)


def test_wrong_input_shapes_are_reported():
    model = build_model(get_config("tiny-vit")).eval()
    with pytest.raises(ValueError, match="patches"):
        model.encode_image(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="L <= 77"):
        model.encode_text(torch.zeros(1, 78, dtype=torch.long))
    resnet = build_model(get_config("tiny-rn")).eval()
    with pytest.raises(ValueError, match="feature grid"):
        resnet.encode_image(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.pop("text_cfg"), "missing"),
        (lambda c: c["vision_cfg"].pop("width"), "missing"),
        (lambda c: c.update(vision_cfg=[64]), "must be an object"),
        (lambda c: c["vision_cfg"].update(layers=[1, 1, 1]), "4 stage"),
        (lambda c: c["vision_cfg"].update(patch_size=None), "patch_size"),
        (lambda c: c["vision_cfg"].update(image_size=[64, 64]), "one integer"),
        (lambda c: c["vision_cfg"].update(timm_model_name="convnext_base"), "timm_model_name"),
        (lambda c: c["text_cfg"].update(hf_model_name="roberta-base"), "hf_model_name"),
        (lambda c: c["text_cfg"].update(pool_type="last"), "pool_type"),
        (lambda c: c.update(custom_text=True), "custom_text"),
        (lambda c: c["text_cfg"].update(heads=5), "divisible"),
    ],
)
def test_build_model_rejects_what_it_cannot_build(change, message):
    cfg = get_config("tiny-vit")
    change(cfg)
    with pytest.raises(ModelLoadError, match=message):
        build_model(cfg)


def test_build_model_accepts_openclip_defaults_spelled_out():
    cfg = get_config("tiny-vit")
    cfg["vision_cfg"].update(pool_type="tok", patch_dropout=0.0, timm_model_name=None)
    cfg["text_cfg"].update(pool_type="argmax", proj_type="linear", hf_tokenizer_name=None)
    assert isinstance(build_model(cfg), CLIP)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_initialisation_statistics_match_open_clip(name):
    """Fresh models: every parameter has open_clip's init scale (std within 15% where there are enough
    values to tell) and constant-initialised ones (biases, norms, bn3) the same constants."""
    torch.manual_seed(9)
    ref = open_clip.create_model(name, pretrained=None)
    ours = build_model(get_config(name))
    theirs = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        q = theirs[n].detach()
        if q.numel() == 1 or q.min() == q.max():
            assert torch.equal(p.detach(), q), n
        elif q.numel() >= 256:
            assert p.std().item() == pytest.approx(q.std().item(), rel=0.15), n
            assert abs(p.mean().item()) < 3 * q.std().item() / q.numel() ** 0.5 + 1e-3, n


def test_loading_builds_on_meta_without_importing_dynamo(tmp_path):
    """Loading a model folder builds the architecture on the meta device; arithmetic on meta tensors
    would import torch._dynamo first (seconds at every `clipsearch index`). Guarded in a fresh process,
    and the loaded model must still hold exactly the saved weights and a real causal mask."""
    import subprocess
    import sys

    from clipsearch.checkpoints import save_model
    from clipsearch.configs import get_config
    from clipsearch.model import build_model
    from clipsearch.tokenizer import Tokenizer
    from clipsearch.transform import PreprocessConfig

    torch.manual_seed(0)
    model = build_model(get_config("tiny-rn"))
    save_model(tmp_path / "m", model, PreprocessConfig(64), Tokenizer())
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from clipsearch.checkpoints import load_bundle\n"
        f"m = load_bundle({str(tmp_path / 'm')!r}).model\n"
        "assert 'torch._dynamo' not in sys.modules, 'meta build imported torch._dynamo'\n"
        f"want = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)\n"
        "got = m.state_dict()\n"
        "assert all(torch.equal(got[k], want[k]) for k in want) and got.keys() == want.keys()\n"
        "L = m.context_length\n"
        "assert torch.equal(m.attn_mask, torch.full((L, L), float('-inf')).triu_(1))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
