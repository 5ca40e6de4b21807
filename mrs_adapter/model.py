"""CLIP's architecture: a ViT image tower and a causal text transformer (docs/method.md §1).

Radford et al. 2021, the backbone the paper adapts.
- Parameter names are OpenAI's checkpoint names: the official weights load with strict=True.
- `build_model` reads the architecture off a state dict's tensor shapes.
- The MLP activation (QuickGELU or GELU) cannot be read off the tensors: the caller says which.
- Attention is batch-first, through `F.scaled_dot_product_attention`.
- `feature_dropout` is the paper's feature-dropout view (docs/method.md §3):
  dropout on the embeddings that enter the first block.
  `encode_*_views` return the clean and the dropped view from one batched pass.
Imports only torch and the standard library (downloads and archives are in clip.py),
so this file can be copied into another project on its own.
"""
from collections import OrderedDict
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("quickgelu", "gelu")


class LayerNorm(nn.LayerNorm):
    """(*, D) -> (*, D) in the input's dtype, computed in fp32, as OpenAI's CLIP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELUFunction(torch.autograd.Function):
    """x -> x * sigmoid(1.702 x), same shape; keeps only x for backward, recomputes the sigmoid.

    Written as three autograd ops it would keep x, the sigmoid and more:
    (B, L, 4D) tensors in every block, the largest activations of a training step.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.mul(1.702).sigmoid_().mul_(x)  # in place: one (B, L, 4D) buffer instead of three

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = x.mul(1.702).sigmoid_()
        # d/dx [x s(1.702 x)] = s + 1.702 x s (1 - s)
        return (1 - s).mul_(s).mul_(x).mul_(1.702).add_(s).mul_(grad)


class QuickGELU(nn.Module):
    """x -> x * sigmoid(1.702 x), same shape: OpenAI's MLP activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuickGELUFunction.apply(x)


def pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, L, D), index (B,) -> (B, 1, D): row b's token index[b]."""
    return x[torch.arange(x.shape[0], device=x.device), index][:, None]


class Attention(nn.Module):
    """(B, L, D) -> (B, L, D): multi-head self-attention, batch-first.

    Parameter names are nn.MultiheadAttention's, as in OpenAI's checkpoints.
    """

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by {heads} heads"
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.held = None  # (keys, query_index) while Transformer.pooled runs; else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D)."""
        if self.held is not None:
            return self.attend_held(x, *self.held)
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D)
        qkv = qkv.view(B, L, 3, self.heads, D // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, L, D/H)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
        x = x.transpose(1, 2).reshape(B, L, D)  # (B, H, L, D/H) -> (B, L, D)
        return self.out_proj(x)

    # ---- speed only; skip on a first reading (Transformer.pooled sets self.held) ----

    def attend_held(self, x: torch.Tensor, keys: torch.Tensor,
                    query_index: torch.Tensor) -> torch.Tensor:
        """x (B, 1, D), keys (B, L, D), query_index (B,) -> (B, 1, D): one query per row.

        Speed only (Transformer.pooled). The query is the token at query_index of `keys`,
        which also give the keys and values.
        x is the block's ln_1 of that same token. The query is read from `keys` (equal values)
        so that the backward sums the gradients in the order it always has:
        a change of order moves the demo's pre-training, and with it the demo's figures,
        in the last bits.
        """
        B, L, D = keys.shape
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(pick(keys, query_index), w[:D], b[:D])  # (B, 1, D)
        kv = F.linear(keys, w[D:], b[D:]).view(B, L, 2, self.heads, D // self.heads)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2, B, H, L, D/H)
        mask = None
        if self.causal:  # the query at position p sees positions <= p
            seen = torch.arange(L, device=x.device) <= query_index[:, None]  # (B, L)
            mask = seen[:, None, None, :]  # (B, 1, 1, L)
        q = q.view(B, 1, self.heads, D // self.heads).transpose(1, 2)  # (B, H, 1, D/H)
        x = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)
        return self.out_proj(x.transpose(1, 2).reshape(B, 1, D))


def mlp_activation(name: str) -> nn.Module:
    """"quickgelu" | "gelu" -> the MLP's nonlinearity: OpenAI's QuickGELU, or the exact (erf) GELU.

    GELU: CLIPs trained with open_clip's GELU configs (e.g. from LAION weights).
    It cannot be read off the tensors.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown CLIP MLP activation {name!r}; expected one of {ACTIVATIONS}")
    return QuickGELU() if name == "quickgelu" else nn.GELU()


class ResidualAttentionBlock(nn.Module):
    """(B, L, D) -> (B, L, D): CLIP's pre-LN transformer block.

        x = x + attn(ln_1(x))
        x = x + mlp(ln_2(x))
    """

    per_token_but_attention = True  # see Transformer.pooled

    def __init__(self, width: int, heads: int, causal: bool = False, activation: str = "quickgelu"):
        super().__init__()
        self.attn = Attention(width, heads, causal)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", mlp_activation(activation)),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """(B, L, width) -> (B, L, width): `layers` residual attention blocks in a row."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False,
                 activation: str = "quickgelu"):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal, activation)
                                         for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)

    # ---- speed only; skip on a first reading: pooled() equals pick(forward(x), query_index) ----

    def pooled(self, x: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
        """(B, L, D), query_index (B,) -> (B, 1, D): the output at token query_index[b] of row b.

        Exact, and about 1/12 of a ViT-B forward saved (docs/method.md §1):
        - the heads read one token per row ([CLS], or the end-of-text token),
          so the last block need compute no other;
        - in that block only `attn(ln_1(x))` mixes tokens: the block runs on the pooled token
          alone, its attention taking keys and values from every token's ln_1(x), held for
          that one call.
        A block opts in with `per_token_but_attention = True`: it calls `attn(ln_1(x))` on its
        input as it came, and every other step acts on each token alone.
        A wrapper holds CLIP's block as `self.block` (adapter.py's `AdaptedBlock`).
        Other blocks (e.g. prompt wrappers) run in full, then we pick.
        """
        *body, last = self.resblocks
        for block in body:
            x = block(x)
        if not getattr(last, "per_token_but_attention", False):
            return pick(last(x), query_index)
        clip_block = getattr(last, "block", last)  # what a wrapper wraps, or CLIP's block itself
        attn = clip_block.attn
        attn.held = (clip_block.ln_1(x), query_index)  # keys and values: all tokens (B, L, D)
        try:
            return last(pick(x, query_index))  # (B, 1, D) in, (B, 1, D) out
        finally:
            attn.held = None


class VisionTransformer(nn.Module):
    """Images (B, 3, H, W) -> embeddings (B, output_dim): CLIP's ViT, read at [CLS]."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, activation: str = "quickgelu"):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        tokens = (input_resolution // patch_size) ** 2 + 1  # the patches and [CLS]
        self.positional_embedding = nn.Parameter(scale * torch.randn(tokens, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation=activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the tokens entering the first block (B, 1 + grid ** 2, width)."""
        x = self.conv1(x)  # shape = [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # shape = [B, grid ** 2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # shape = [B, grid ** 2 + 1, width]
        x = x + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded tokens (B, L, width) -> image embedding (B, output_dim) from the [CLS] token."""
        cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # [CLS] is token 0
        x = self.transformer.pooled(x, cls)  # = self.transformer(x)[:, :1]
        return self.ln_post(x[:, 0, :]) @ self.proj  # (B, 1, width) -> (B, output_dim)

    def forward(self, x: torch.Tensor, feature_dropout: float = 0.0) -> torch.Tensor:
        """(B, 3, H, W) -> (B, output_dim); `feature_dropout` on the tokens entering block 0."""
        return self.encode(F.dropout(self.embed(x), feature_dropout, self.training))


class CLIP(nn.Module):
    """Images (B, 3, H, W), token ids (B, L) -> embeddings (B, embed_dim): OpenAI's ViT CLIP."""

    def __init__(self, embed_dim: int,
                 # vision
                 image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int,
                 # text
                 context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int,
                 vision_heads: int = None, activation: str = "quickgelu"):
        super().__init__()
        self.context_length = context_length
        self.activation = activation  # the MLPs' nonlinearity, recorded with every run (train.py)
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width,
                                        vision_layers, vision_heads or vision_width // 64,
                                        embed_dim, activation)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads,
                                       causal=True, activation=activation)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation, for models trained from scratch (tests, the demo backbone)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.transformer, self.visual.transformer):
            proj_std = (tower.width ** -0.5) * ((2 * tower.layers) ** -0.5)
            attn_std, fc_std = tower.width ** -0.5, (2 * tower.width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor, feature_dropout: float = 0.0) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim), not normalised."""
        return self.visual(image.type(self.dtype), feature_dropout)

    @staticmethod
    def trim(text: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> (B, L'): drop the columns after the batch's last end token.

        Exact: attention is causal, so no position up to an end token ever sees a later one.
        RS captions use ~20-30 of the 77 positions, so the text tower does ~3x less work.
        """
        return text[:, :int(text.argmax(dim=-1).max()) + 1]

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> token + positional embeddings (B, L, width)."""
        position = self.positional_embedding[:text.shape[1]]
        return self.token_embedding(text).type(self.dtype) + position.type(self.dtype)

    def text_head(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Embedded tokens (B, L, width), ids (B, L) -> (B, embed_dim) at the end-of-text token.

        The end token has the largest id, hence argmax.
        """
        x = self.transformer.pooled(x, text.argmax(dim=-1))  # (B, 1, width) at the end token
        return self.ln_final(x[:, 0]) @ self.text_projection

    def encode_text(self, text: torch.Tensor, feature_dropout: float = 0.0,
                    trim: bool = True) -> torch.Tensor:
        """Token ids (B, L) -> (B, embed_dim), not normalised.

        trim=False when `text` is trimmed already:
        trimming reads the ids, which on a GPU waits for the device.
        """
        text = self.trim(text) if trim else text
        x = F.dropout(self.embed_text(text), feature_dropout, self.training)
        return self.text_head(x, text)

    def encode_image_views(self, image: torch.Tensor,
                           feature_dropout: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> (clean (B, E), feature-dropout view (B, E)), one pass.

        The patch embedding is computed once; the clean and the dropped tokens are stacked
        on the batch axis and go through the blocks together.
        Every random draw inside the blocks stays independent per row,
        so the result has the distribution of two separate `encode_image` calls.
        """
        x = self.visual.embed(image.type(self.dtype))
        x = torch.cat([x, F.dropout(x, feature_dropout, self.training)])  # (2B, L, width)
        return self.visual.encode(x).chunk(2)

    def encode_text_views(self, text: torch.Tensor, feature_dropout: float,
                          trim: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) -> (clean (B, E), dropped (B, E)): `encode_image_views` for text."""
        text = self.trim(text) if trim else text
        x = self.embed_text(text)
        x = torch.cat([x, F.dropout(x, feature_dropout, self.training)])  # (2B, L, width)
        return self.text_head(x, text.repeat(2, 1)).chunk(2)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B_img, 3, H, W), (B_txt, L) -> logits (B_img, B_txt) and their transpose.

        Cosine similarities scaled by exp(logit_scale).
        """
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


def unwrap(state_dict: dict) -> dict:
    """Checkpoint dict -> its plain state dict, without a DDP model's `module.` prefix.

    A training dict {"state_dict": ..., "epoch", ...} (open_clip's, SkyCLIP's) gives its
    "state_dict"; a plain state dict is itself.
    """
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _check_shapes(state_dict: dict, expected: dict) -> None:
    """One line naming the tensors whose shapes differ from the model's (torch gives a line per
    tensor)."""
    wrong = [f"{k} is {tuple(v.shape)}, not {tuple(expected[k].shape)}"
             for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise ValueError(f"{len(wrong)} tensor(s) do not fit the ViT CLIP that the other tensors' "
                         f"shapes imply: {'; '.join(wrong[:3])}{more} (a damaged file, or not a "
                         f"CLIP)")


def build_model(state_dict: dict, activation: str = "quickgelu") -> CLIP:
    """State dict -> a ViT CLIP, its architecture read off the tensor shapes; strict, fp32, eval.

    `activation`: the MLPs' "quickgelu" (OpenAI's) or "gelu"; the tensors do not tell.
    """
    mlp_activation(activation)  # an unknown name fails here, before any work
    state_dict = {k: v for k, v in unwrap(state_dict).items()
                  if k not in ("input_resolution", "context_length", "vocab_size")}
    required = ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                "visual.proj", "token_embedding.weight", "positional_embedding", "text_projection",
                "ln_final.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        hint = " (this looks like a ResNet CLIP; only ViT CLIPs are supported)" \
            if any(k.startswith("visual.layer1.") for k in state_dict) else ""
        raise ValueError(f"not a ViT CLIP state dict{hint}: missing keys {missing}; "
                         f"found {len(state_dict)} keys, e.g. {sorted(state_dict)[:5]}")
    vision_width = state_dict["visual.conv1.weight"].shape[0]
    vision_patch_size = state_dict["visual.conv1.weight"].shape[-1]
    vision_layers = len([k for k in state_dict
                         if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    transformer_width = state_dict["ln_final.weight"].shape[0]
    with torch.device("meta"):  # no memory and no random init for tensors the state dict replaces
        model = CLIP(
            embed_dim=state_dict["text_projection"].shape[1],
            image_resolution=vision_patch_size * grid, vision_layers=vision_layers,
            vision_width=vision_width, vision_patch_size=vision_patch_size,
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=transformer_width,
            transformer_heads=max(1, transformer_width // 64),
            transformer_layers=len([k for k in state_dict if k.startswith("transformer.resblocks.")
                                    and k.endswith(".attn.in_proj_weight")]),
            vision_heads=max(1, vision_width // 64), activation=activation)
    _check_shapes(state_dict, model.state_dict())
    # copies, so the model never shares memory with (and never trains) the caller's tensors
    copies = {k: v.to(torch.float32, copy=True) for k, v in state_dict.items()}
    result = model.load_state_dict(copies, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"state dict does not match a ViT CLIP of the shapes it implies: "
                         f"missing keys {result.missing_keys}, "
                         f"unexpected keys {result.unexpected_keys}")
    return model.float().eval()
