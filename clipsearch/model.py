"""The CLIP model (Radford et al. 2021) in OpenAI's layout, small blocks first and ``CLIP`` last.

Parameter and buffer names equal OpenAI's and OpenCLIP's, so their state dicts load with
``load_state_dict(strict=True)``. Sequences are batch-first throughout (``[B, L, D]``).
"""

import contextlib
import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipsearch.configs import ModelConfig
from clipsearch.errors import ModelLoadError


class Bottleneck(nn.Module):
    """ResNet bottleneck block with anti-aliased striding: an average pool does the downsampling,
    so every convolution has stride 1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        self.stride = stride
        if stride > 1 or inplanes != planes * self.expansion:
            # The "-1" key is OpenAI's: the pool comes before the 1x1 conv and so has no parameters.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.avgpool(out)
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu3(out + identity)


def _randn(*shape: int, scale: float = 1.0, divisor: float = 1.0) -> torch.Tensor:
    """``torch.randn(*shape) * scale / divisor``; on the meta device (a model about to receive loaded
    weights) just an empty tensor, because arithmetic on meta tensors first imports torch._dynamo
    (seconds)."""
    if torch.empty(0).is_meta:
        return torch.empty(*shape)
    return torch.randn(*shape) * scale / divisor


class AttentionPool2d(nn.Module):
    """One multi-head attention step over the spatial grid, with the mean of the grid as the only query."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            _randn(spacial_dim**2 + 1, embed_dim, divisor=embed_dim**0.5)
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if H * W + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"image gives a {H}x{W} feature grid but the model expects "
                f"{self.positional_embedding.shape[0] - 1} cells; resize images to the model's size"
            )
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, HW+1, C]
        x = x + self.positional_embedding.to(x.dtype)  # [B, HW+1, C]
        heads, head_dim = self.num_heads, C // self.num_heads
        q = self.q_proj(x[:, :1]).view(B, 1, heads, head_dim).transpose(1, 2)  # [B, h, 1, C/h]
        k = self.k_proj(x).view(B, -1, heads, head_dim).transpose(1, 2)  # [B, h, HW+1, C/h]
        v = self.v_proj(x).view(B, -1, heads, head_dim).transpose(1, 2)  # [B, h, HW+1, C/h]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, 1, C/h]
        out = out.transpose(1, 2).reshape(B, C)  # [B, C]
        return self.c_proj(out)  # [B, output_dim]


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: a 3-conv stem with an average pool instead of a max pool, anti-aliased strided
    blocks, and attention pooling instead of global average pooling."""

    def __init__(self, layers, output_dim: int, heads: int, input_resolution: int = 224, width: int = 64):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width  # mutated by _make_layer as the blocks are built
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)

        embed_dim = width * 32  # the ResNet feature dimension
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)  # [B, 3, H, W]
        x = self.stem(x)  # [B, width, H/4, W/4]
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)  # [B, width*32, H/32, W/32]
        return self.attnpool(x)  # [B, output_dim]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input, weight or autocast precision; the result is cast
    back to the input's dtype. Half-precision statistics visibly shift CLIP's features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        # A device type without autocast (meta, some accelerators) has nothing to switch off.
        has_autocast = torch.amp.is_autocast_available(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if has_autocast else contextlib.nullcontext():
            out = F.layer_norm(
                x.float(),
                self.normalized_shape,
                self.weight.float() if self.weight is not None else None,
                self.bias.float() if self.bias is not None else None,
                self.eps,
            )
        return out.to(orig_type)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter names (packed ``in_proj_weight``) and
    initialisation, computed with ``scaled_dot_product_attention`` on batch-first input."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        if d_model % n_head:
            raise ModelLoadError(f"width {d_model} is not divisible by {n_head} heads; fix the model config")
        self.num_heads = n_head
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, first_only: bool = False
    ) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]; with ``first_only``, the first position's output alone: [B, 1, D]
        (every position is still a key and value; only the one query is computed)."""
        B, L, D = x.shape
        h = self.num_heads
        packed = self._modules.get("in_proj")  # an int8 copy's quantised projection (clipsearch.backends)
        if packed is not None:
            qkv = packed(x)  # [B, L, 3D]
        else:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        qkv = qkv.view(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4)  # [3, B, h, L, D/h]
        q, k, v = qkv.unbind(0)
        if first_only:
            q = q[:, :, :1]  # [B, h, 1, D/h]
            attn_mask = attn_mask[:1] if attn_mask is not None else None
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants an additive mask in the query's dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, h, Lq, D/h]
        out = out.transpose(1, 2).reshape(B, q.shape[2], D)  # [B, Lq, D]
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: float = 4.0, act_layer=nn.GELU):
        super().__init__()
        self.ln_1 = LayerNorm(d_model)
        self.attn = MultiheadSelfAttention(d_model, n_head)
        self.ln_2 = LayerNorm(d_model)
        mlp_width = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, mlp_width)),
                    ("gelu", act_layer()),
                    ("c_proj", nn.Linear(mlp_width, d_model)),
                ]
            )
        )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, first_only: bool = False
    ) -> torch.Tensor:
        """[B, L, W] -> [B, L, W], or the first position's output alone with ``first_only``: [B, 1, W]."""
        attended = self.attn(self.ln_1(x), attn_mask=attn_mask, first_only=first_only)  # [B, Lq, W]
        x = (x[:, :1] if first_only else x) + attended
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act_layer=nn.GELU):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers)]
        )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, first_only: bool = False
    ) -> torch.Tensor:
        """[B, L, W] -> [B, L, W]; with ``first_only`` the last block computes the first position's
        output alone ([B, 1, W]): what a ViT reads from its class token, for less work (exactly)."""
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            first = first_only and i == last
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Trade compute for memory: activations inside the block are recomputed on backward.
                x = checkpoint(block, x, attn_mask, first, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, first_only=first)
        return x


class VisionTransformer(nn.Module):
    """ViT: patch conv without bias, class token, positional embedding, ln_pre, transformer, ln_post
    on the class token, projection."""

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        mlp_ratio: float = 4.0,
        act_layer=nn.GELU,
    ):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(_randn(width, scale=scale))
        self.positional_embedding = nn.Parameter(_randn(grid**2 + 1, width, scale=scale))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(_randn(width, output_dim, scale=scale))
        # Only the class token's output is read: the last block computes it alone (its attention has
        # one query, its MLP one row), ~6% of ViT-B/32's image work. Tests turn it off to compare.
        self._class_token_only = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        if x.shape[1] + 1 != self.positional_embedding.shape[0]:
            raise ValueError(
                f"image gives {x.shape[1]} patches but the model expects "
                f"{self.positional_embedding.shape[0] - 1} ({self.input_resolution}px)"
            )
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, g*g+1, W]
        x = self.ln_pre(x)
        x = self.transformer(x, first_only=self._class_token_only)  # [B, 1 or g*g+1, W]
        x = self.ln_post(x[:, 0, :])  # [B, W]
        return x @ self.proj  # [B, output_dim]


class CLIP(nn.Module):
    """Image and text towers projecting into one embedding space, with a learned temperature.

    ``cfg`` is the typed config it was built from; ``config`` the OpenCLIP-schema dict it was parsed
    from, as given (what model files record).
    """

    def __init__(self, cfg: ModelConfig, config: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.config = copy.deepcopy(config) if config is not None else cfg.to_dict()
        vision_cfg, text_cfg, embed_dim = cfg.vision, cfg.text, cfg.embed_dim
        act_layer = QuickGELU if cfg.quick_gelu else nn.GELU
        self.context_length = text_cfg.context_length
        self.vocab_size = text_cfg.vocab_size
        self._eot_cut = True  # tests turn it off to compare against the full-length path

        if vision_cfg.is_resnet:
            self.visual = ModifiedResNet(
                layers=vision_cfg.layers,
                output_dim=embed_dim,
                heads=vision_cfg.width * 32 // vision_cfg.head_width,
                input_resolution=vision_cfg.image_size,
                width=vision_cfg.width,
            )
        else:
            self.visual = VisionTransformer(
                input_resolution=vision_cfg.image_size,
                patch_size=vision_cfg.patch_size,
                width=vision_cfg.width,
                layers=vision_cfg.layers,
                heads=vision_cfg.width // vision_cfg.head_width,
                output_dim=embed_dim,
                mlp_ratio=vision_cfg.mlp_ratio,
                act_layer=act_layer,
            )

        width = text_cfg.width
        self.transformer = Transformer(width, text_cfg.layers, text_cfg.heads, text_cfg.mlp_ratio, act_layer)
        # nn.Embedding's own N(0, 1) draw, made through _randn so that a meta build stays cheap
        self.token_embedding = nn.Embedding(self.vocab_size, width, _weight=_randn(self.vocab_size, width))
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.full([], math.log(1 / 0.07)))
        # Derived from context_length, so not saved: OpenAI's and OpenCLIP's state dicts omit it too.
        self.register_buffer("attn_mask", self.build_attention_mask(), persistent=False)
        self._locked_bn: list[nn.BatchNorm2d] = []  # kept in eval mode by train(); see lock_image_tower
        self.initialize_parameters()

    def build_attention_mask(self) -> torch.Tensor:
        """Additive causal mask [L, L]: 0 on and below the diagonal, -inf above it."""
        if torch.empty(0).is_meta:  # rebuilt on the real device once weights are loaded
            return torch.empty(self.context_length, self.context_length)
        return torch.full((self.context_length, self.context_length), float("-inf")).triu_(1)

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation: scaled normals for the text tower and the attention pool, and the
        last BatchNorm of each ResNet block at zero so every block starts as the identity."""
        if self.positional_embedding.is_meta:  # built to receive loaded weights: nothing to draw
            return
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(linear.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in stage.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)

        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (inputs are cast to it)."""
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        """The device of the weights: where inputs must go. The one place callers look this up."""
        return self.visual.conv1.weight.device

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer activations on backward to save memory. The ResNet tower is not
        checkpointed: recomputing its BatchNorm in training mode would update the running stats twice."""
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    def _image_groups(self) -> list[list]:
        """The image tower's parameter groups, input to output, for lock_image_tower."""
        v = self.visual
        if isinstance(v, ModifiedResNet):
            return [
                [v.conv1, v.bn1, v.conv2, v.bn2, v.conv3, v.bn3],
                [v.layer1],
                [v.layer2],
                [v.layer3],
                [v.layer4],
                [v.attnpool],
            ]
        blocks = list(v.transformer.resblocks)
        return [
            [v.conv1, v.class_embedding, v.positional_embedding, v.ln_pre],
            *[[b] for b in blocks[:-1]],
            [blocks[-1], v.ln_post],
            [v.proj],
        ]

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the image tower (LiT-style), leaving its last ``unlocked_groups`` groups trainable.

        With ``freeze_bn_stats`` the BatchNorm layers of the locked groups stay in eval mode (running
        statistics unchanged) even when the model is put in training mode.
        """
        if unlocked_groups < 0:
            raise ValueError(f"unlocked_groups must be >= 0, got {unlocked_groups}")
        groups = self._image_groups()
        locked = groups[: max(0, len(groups) - unlocked_groups)]
        for p in self.visual.parameters():
            p.requires_grad = True
        self._locked_bn = []
        for group in locked:
            for item in group:
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for p in params:
                    p.requires_grad = False
                if freeze_bn_stats and isinstance(item, nn.Module):
                    self._locked_bn += [m for m in item.modules() if isinstance(m, nn.BatchNorm2d)]
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for bn in self._locked_bn:
            bn.eval()
        return self

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image features [B, embed_dim], unnormalised, from a preprocessed batch [B, 3, H, W]."""
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text features [B, embed_dim], unnormalised, from token ids [B, L] (L <= context_length).

        The features are read at the end-of-text token, the highest id in each row. Because the mask is
        causal, nothing after the batch's last end-of-text token can change them, so the sequence is cut
        there before the transformer: short queries cost a fraction of the full 77 positions.
        """
        if text.ndim != 2 or text.shape[1] > self.context_length:
            raise ValueError(f"tokens must be [B, L] with L <= {self.context_length}, got {list(text.shape)}")
        eot = text.argmax(dim=-1)  # [B]
        if self._eot_cut and text.shape[0] > 0:
            text = text[:, : int(eot.max()) + 1]  # [B, n]
        n = text.shape[1]
        x = self.token_embedding(text).to(self.dtype)  # [B, n, W]
        x = x + self.positional_embedding[:n].to(self.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])  # [B, n, W]
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, W]
        return x @ self.text_projection  # [B, embed_dim]

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """(normalised image features or None, normalised text features or None, logit_scale.exp())."""
        image_features = F.normalize(self.encode_image(image), dim=-1) if image is not None else None
        text_features = F.normalize(self.encode_text(text), dim=-1) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


def build_model(cfg: dict | ModelConfig) -> CLIP:
    """Build a randomly initialised CLIP from an OpenCLIP-schema config dict (or a parsed one).

    The dict needs ``embed_dim``, ``vision_cfg`` {image_size, layers (int: ViT; 4 ints: ResNet), width,
    patch_size (ViT), optional head_width=64, mlp_ratio=4} and ``text_cfg`` {context_length,
    vocab_size, width, heads, layers}; ``quick_gelu`` selects OpenAI's activation. Options that change
    the architecture away from OpenAI's raise ``ModelLoadError`` naming them
    (:meth:`clipsearch.configs.ModelConfig.from_dict`).
    """
    return CLIP(ModelConfig.from_dict(cfg), cfg if isinstance(cfg, dict) else None)
