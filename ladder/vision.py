"""Vision-and-language LST: the frozen vision encoder, and the side networks that read its tokens.

As in the paper's CLIP-T5 experiments: the vision encoder is frozen; its visual tokens go through
a trainable projection to the side width and are placed *before* the text in the side network's
input, with attention over both; the text backbone sees the text alone, so its states (the
ladders) are added to the text positions only. No gradient reaches the vision encoder or the
backbone. Encoder-only backbones: ``VisualSideNetwork``; T5: ``VisualT5SideNetwork`` (the visual
tokens before the text of the side encoder; the side decoder cross-attends to both).

Vision encoders: any Hugging Face CLIP (``CLIPVisionModel``, or the vision tower of a full CLIP
checkpoint), SigLIP (vision tower) or ViT model by name or local folder, preprocessed by its own
image processor; and ``random-vit``, a packaged short name for a frozen, seeded, randomly
initialised ViT (``ViTConfig(image_size=64, patch_size=8, hidden_size=192, 4 layers, 3 heads,
intermediate_size=768)``, ``torch.manual_seed(0)``) with a fixed preprocessing (RGB, bilinear
resize to 64x64, scale to [0, 1], normalise with mean 0.5 and std 0.5). ``random-vit`` only checks
the pipeline where no pretrained weights can be downloaded: it is not a pretrained model.

Features per image: ``grid`` = the last hidden state [n_tokens, d_v] (patches and the class token)
and ``pooled`` [d_v] (the model's pooler output; the class token where it has none).

Pooling the grid (``pool="4x4"``, config ``backbone.vision_pool``): the patch tokens, a square
grid of g x g, are average-pooled to a k x k grid (adaptive average pooling, so g need not be a
multiple of k), and the leading tokens (the class token; SigLIP has none) are kept before them:
``random-vit``'s 65 tokens become 1 + 16 = 17, which cuts a side network's step cost about 4x.
It is applied when the features are computed (stage one), so it is part of the cache key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from ladder.attention import mask_bias
from ladder.backbones import resolve_backbone
from ladder.errors import LadderError
from ladder.families import T5_TYPES
from ladder.ladders import ladder_linear
from ladder.shared import RMSNorm, backbone_dims, init_weights
from ladder.side import EncoderSideNetwork, SideConfig, T5SideNetwork

VISION_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model", "vit")
RANDOM_VIT = "random-vit"
RANDOM_VIT_SIZE = 64  # input side in pixels
RANDOM_VIT_PREPROCESS = "rgb-bilinear-64x64-scale-1/255-mean-0.5-std-0.5"
# how the visual tokens enter the side stream: "ladder" (ours, the default): before every side
# block, as the backbone's states do for the text; "input" (the authors'): once, at the input
VISUAL_FUSIONS = ("ladder", "input")
# what the head of an encoder-only VL side network reads: "text" (the default), the first text
# token's side state; "text+visual", that state plus a pooling over the visual positions' final
# side states (``VisualSideNetwork``: its readout starts at zero, so the network starts as "text")
VISUAL_READOUTS = ("text", "text+visual")


def parse_pool(pool: str | None) -> int | None:
    """``"KxK"`` -> K (the side of the pooled patch grid); None -> None (no pooling)."""
    if pool is None:
        return None
    a, sep, b = str(pool).lower().partition("x")
    if not sep or not a.isdigit() or a != b or int(a) < 1:
        raise LadderError(f"vision pool {pool!r}; allowed: KxK (a square grid, K >= 1), or none")
    return int(a)


def pool_grid(grid: Tensor, k: int) -> Tensor:
    """[B, n_lead + g*g, d] -> [B, n_lead + k*k, d]: the g x g patch tokens average-pooled to k x k
    (row-major, as the patches), the n_lead leading tokens (class token) kept in front."""
    B, n, d = grid.shape
    g = math.isqrt(n)
    lead = n - g * g
    if g < 1 or lead > 1 or k > g:
        raise LadderError(
            f"cannot pool {n} visual tokens to a {k}x{k} grid; allowed: a square grid of patches "
            f"(and at most a class token in front) with a side >= {k}"
        )
    patches = grid[:, lead:].reshape(B, g, g, d).permute(0, 3, 1, 2)  # [B, d, g, g]
    pooled = torch.nn.functional.adaptive_avg_pool2d(patches, k)  # [B, d, k, k]
    return torch.cat([grid[:, :lead], pooled.flatten(2).transpose(1, 2)], 1)


@dataclass
class VisionEncoder:
    """A frozen vision encoder (eval mode, no grad) and the preprocessing it is fed with."""

    name: str  # what the user asked for
    model: nn.Module
    config: Any
    revision: str | None
    weights_digest: str
    preprocess: Callable[[list[Any]], Tensor]  # PIL images -> pixel values [B, 3, H, W]
    preprocessing: str  # what the preprocessing is (or a digest of the image processor's config)
    pool: str | None = None  # "KxK": the patch grid average-pooled to K x K (``pool_grid``)

    @property
    def d(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()  # not inference_mode: the features may feed a side network's autograd
    def features(self, images: list[Any]) -> tuple[Tensor, Tensor]:
        """(grid [B, n_tokens, d_v], pooled [B, d_v]) in float32 on the CPU, for PIL images."""
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(images).to(self.device, dtype)
        out = self.model(pixel_values=pixels)
        grid = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = grid[:, 0]
        k = parse_pool(self.pool)
        if k is not None:
            grid = pool_grid(grid.float(), k)
        return grid.float().cpu(), pooled.float().cpu()

    def key_inputs(self) -> dict[str, Any]:
        """What changes the stored image features (part of the cache key)."""
        return {
            "name": self.name,
            "model_type": self.config.model_type,
            "revision": self.revision,
            "weights": self.weights_digest,
            "preprocessing": self.preprocessing,
            **({"pool": self.pool} if self.pool is not None else {}),  # unpooled: key as before
        }


def _state_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _files_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def random_vit_preprocess(images: list[Any]) -> Tensor:
    """``random-vit``'s fixed preprocessing: RGB, bilinear 64x64, [0, 1], mean 0.5, std 0.5."""
    from PIL import Image

    arrays = [
        np.asarray(
            im.convert("RGB").resize((RANDOM_VIT_SIZE, RANDOM_VIT_SIZE), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
        for im in images
    ]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # [B, 3, H, W]
    return (x - 0.5) / 0.5


def random_vit() -> VisionEncoder:
    """The packaged ``random-vit``: seeded random weights, for checking the pipeline only."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        image_size=RANDOM_VIT_SIZE,
        patch_size=8,
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = ViTModel(cfg, add_pooling_layer=False)
    finally:
        torch.random.set_rng_state(state)
    return vision_from_model(RANDOM_VIT, model, random_vit_preprocess, RANDOM_VIT_PREPROCESS)


def processor_preprocess(processor: Any) -> tuple[Callable[[list[Any]], Tensor], str]:
    """A Hugging Face image processor as a preprocessing function, and a digest of its config."""
    described = json.dumps(processor.to_dict(), sort_keys=True, default=str)
    digest = f"{type(processor).__name__}-{hashlib.sha256(described.encode()).hexdigest()[:16]}"

    def preprocess(images: list[Any]) -> Tensor:
        rgb = [im.convert("RGB") for im in images]
        return processor(images=rgb, return_tensors="pt")["pixel_values"]

    return preprocess, digest


def vision_from_model(
    name: str,
    model: nn.Module,
    preprocess: Callable[[list[Any]], Tensor] | Any,
    preprocessing: str | None = None,
    *,
    path: str = "",
    revision: str | None = None,
) -> VisionEncoder:
    """Wrap a built vision model (tests build tiny ones from configs); ``preprocess`` is a
    function of PIL images or a Hugging Face image processor."""
    mt = getattr(model.config, "model_type", None)
    if mt not in VISION_TYPES:
        raise _not_vision(name, mt)
    if not callable(preprocess) or hasattr(preprocess, "to_dict"):
        preprocess, preprocessing = processor_preprocess(preprocess)
    folder = Path(path) if path and os.path.isdir(path) else None
    weights = _files_digest(folder) if folder is not None else _state_digest(model)
    model.eval().requires_grad_(False)
    return VisionEncoder(
        name=name,
        model=model,
        config=model.config,
        revision=revision or getattr(model.config, "_commit_hash", None),
        weights_digest=weights,
        preprocess=preprocess,
        preprocessing=preprocessing or "custom",
    )


def _not_vision(name: str, model_type: object) -> LadderError:
    return LadderError(
        f"vision encoder {name!r} is a {model_type!r} model, not a vision encoder; allowed: a "
        f"CLIP, SigLIP or ViT model (model_type {', '.join(VISION_TYPES)}) or {RANDOM_VIT!r}"
    )


def load_vision_encoder(
    name: str,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    pool: str | None = None,
) -> VisionEncoder:
    """``random-vit``, or a CLIP/SigLIP/ViT model by Hugging Face name or local folder; a text
    model, or a name that is none of these, is one line. ``pool`` ("KxK"): the grid features
    average-pooled to K x K patch tokens (``pool_grid``)."""
    parse_pool(pool)  # a bad value is one line before any model is loaded
    encoder = _load_vision_encoder(name, revision=revision, device=device)
    encoder.pool = pool
    return encoder


def _load_vision_encoder(
    name: str, *, revision: str | None, device: str | torch.device
) -> VisionEncoder:
    if name == RANDOM_VIT:
        return random_vit()
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        CLIPVisionModel,
        SiglipVisionModel,
        ViTModel,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_backbone(name)  # a packaged text model named here is refused below
    try:
        config = AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise LadderError(
            f"unknown vision encoder {name!r}: not {RANDOM_VIT!r}, a local model folder, or a "
            f"Hugging Face model reachable from here ({first})"
        ) from None
    if config.model_type not in VISION_TYPES:
        raise _not_vision(name, config.model_type)
    cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "vit": ViTModel}[
        config.model_type.removesuffix("_vision_model")
    ]
    try:
        model = cls.from_pretrained(path, revision=revision)
        processor = AutoImageProcessor.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise LadderError(f"vision encoder {name!r} cannot be loaded ({first})") from None
    model.to(device)
    return vision_from_model(name, model, processor, path=path, revision=revision)


# --------------------------------------------------------------------------- the side networks


def _check_one_of(what: str, value: str, allowed: tuple[str, ...]) -> None:
    """``value`` is one of ``allowed``; anything else is one line naming ``what`` it is."""
    if value not in allowed:
        raise LadderError(f"{what} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def check_visual_fusion(visual_fusion: str) -> None:
    """A visual fusion is one of ``VISUAL_FUSIONS``; anything else is one line."""
    _check_one_of("visual fusion", visual_fusion, VISUAL_FUSIONS)


def check_visual_readout(visual_readout: str) -> None:
    """A visual readout is one of ``VISUAL_READOUTS``; anything else is one line."""
    _check_one_of("visual readout", visual_readout, VISUAL_READOUTS)


class VisualInput(nn.Module):
    """The visual part every VL side network shares (encoder-only and T5): the frozen vision
    encoder's tokens standardised, projected to the side width, told apart by image, normed,
    and gated in again before every side block after the first (the visual ladder).

    :meth:`build_visual` creates, in this order (the state-dict order and what a seed draws):
    ``visual_proj`` (d_v -> d/r), ``visual_ln`` (the norm the network passes), the buffers
    ``visual_mean``/``visual_std`` (0 and 1 until :meth:`set_visual_stats`), ``image_embed``
    (only with ``n_images`` > 1) and ``visual_gates`` (fusion "ladder" only: one alpha per side
    block after the first). :meth:`visual_tokens` maps (B, T_v, d_v) tokens to (B, T_v, d/r) and
    :meth:`visual_ladder` is the gate before side block j.
    """

    d_visual: int
    n_images: int
    tokens_per_image: int | None = None  # set_tokens_per_image: batches of 1 .. n_images images
    visual_fusion: str
    visual_gates: nn.Parameter | None
    visual_readout: str = "text"  # VisualSideNetwork may read the visual positions too

    def build_visual(
        self,
        d_visual: int,
        n_images: int,
        visual_fusion: str,
        d_side: int,
        norm: nn.Module,
        n_blocks: int,
        gate_alpha: float,
    ) -> None:
        """Create the visual parameters and buffers (see the class); ``norm`` acts at width
        ``d_side`` on the projected tokens; ``n_blocks``: the side blocks the tokens enter."""
        check_visual_fusion(visual_fusion)
        if isinstance(d_visual, bool) or not isinstance(d_visual, int) or d_visual < 1:
            raise LadderError(f"d_visual={d_visual!r}; allowed: the vision encoder's width (>= 1)")
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise LadderError(f"n_images={n_images!r}; allowed: images per example (>= 1)")
        self.d_visual = d_visual
        self.n_images = n_images
        self.visual_fusion = visual_fusion
        self.visual_proj = nn.Linear(d_visual, d_side)
        self.visual_ln = norm
        init_weights(self.visual_proj)
        # per-feature standardisation of the frozen encoder's tokens (``set_visual_stats``):
        # buffers, not trained, saved with the network; 0 and 1 (identity) until set
        self.register_buffer("visual_mean", torch.zeros(d_visual))
        self.register_buffer("visual_std", torch.ones(d_visual))
        if n_images > 1:  # created last: the one-image network's draws stay as they were
            self.image_embed = nn.Embedding(n_images, d_side)
            nn.init.normal_(self.image_embed.weight, mean=0.0, std=0.01)
        # one alpha per side block after the first (no random draw: seeds give the same weights)
        self.visual_gates = (
            nn.Parameter(torch.full((n_blocks - 1,), float(gate_alpha)))
            if visual_fusion == "ladder"
            else None
        )

    def set_visual_stats(self, mean: Tensor, std: Tensor) -> None:
        """The per-feature mean and std [d_v] the visual tokens are standardised with."""
        if mean.shape != (self.d_visual,) or std.shape != (self.d_visual,) or (std <= 0).any():
            raise LadderError(
                f"visual stats of shapes {tuple(mean.shape)}, {tuple(std.shape)}; allowed: "
                f"({self.d_visual},) each, std > 0"
            )
        self.visual_mean.copy_(mean)
        self.visual_std.copy_(std)

    def set_tokens_per_image(self, n_tokens: int | None) -> None:
        """Let batches hold 1 .. ``n_images`` images per example, told apart by their token
        count, ``n_tokens`` per image (a task list mixing one-image tasks and NLVR2: the
        one-image tasks' tokens take image index 0, as VL-T5's image ids); None: every batch
        holds ``n_images`` images (the default)."""
        if n_tokens is not None and (isinstance(n_tokens, bool) or n_tokens < 1):
            raise LadderError(f"tokens per image {n_tokens!r}; allowed: an int >= 1, or None")
        self.tokens_per_image = n_tokens

    def images_in(self, n_tokens: int) -> int:
        """How many images ``n_tokens`` visual tokens of an example hold (one after the other)."""
        if self.tokens_per_image is None:
            if n_tokens % self.n_images:
                raise LadderError(
                    f"{n_tokens} visual tokens for {self.n_images} images per example; allowed: "
                    f"a multiple of {self.n_images} (the images' tokens one image after the other)"
                )
            return self.n_images
        n, rest = divmod(n_tokens, self.tokens_per_image)
        if rest or not 1 <= n <= self.n_images:
            raise LadderError(
                f"{n_tokens} visual tokens per example; allowed: 1 to {self.n_images} images of "
                f"{self.tokens_per_image} tokens each"
            )
        return n

    def visual_tokens(self, visual: Tensor | None, drop: nn.Module) -> Tensor:
        """(B, T_v, d_v) visual tokens -> (B, T_v, d/r): standardised, projected, image index
        added (several images), normed, then ``drop`` (the stream's input dropout)."""
        name = type(self).__name__
        if visual is None:
            raise LadderError(f"{name} needs visual tokens (B, T_v, d_v); got None")
        if visual.dim() != 3 or visual.shape[-1] != self.d_visual:
            raise LadderError(
                f"visual tokens of shape {tuple(visual.shape)}; allowed: (B, T_v, {self.d_visual})"
            )
        n = self.images_in(visual.shape[1])
        mean, std = self.visual_mean, self.visual_std
        visual = (visual.to(mean.dtype) - mean) / std  # (B, T_v, d_v), standardised
        v = ladder_linear(self.visual_proj, visual)  # (B, T_v, d/r)
        if self.n_images > 1:  # which image each block of tokens comes from
            B, Tv, d = v.shape
            per = v.reshape(B, n, Tv // n, d)  # (B, n, T_i, d/r)
            index = self.image_embed.weight[:n]  # (n, d/r): image 0, 1, ...
            v = (per + index[None, :, None, :].to(v.dtype)).reshape(B, Tv, d)
        return drop(self.visual_ln(v))  # (B, T_v, d/r)

    def visual_ladder(self, xv: Tensor, v: Tensor, j: int, gate_T: float) -> Tensor:
        """The visual positions (B, T_v, d/r) of the input of the j-th side block (0-based, in
        stream order): from block 1 on, with fusion "ladder", ``g * xv + (1 - g) * v``,
        ``g = sigmoid(visual_gates[j - 1] / gate_T)``; else ``xv`` as it is."""
        if self.visual_gates is None or j == 0:
            return xv
        g = torch.sigmoid(self.visual_gates[j - 1] / gate_T)
        return g * xv + (1 - g) * v.to(xv.dtype)


class VisualSideNetwork(VisualInput, EncoderSideNetwork):
    """The encoder-only side network with visual tokens before the text.

    ``visual_proj`` (d_v -> d/r) and ``visual_ln`` map the frozen vision encoder's tokens to the
    side width; they are concatenated before the side stream's text positions and every side
    block attends over both. Ladders (and late fusion) add the backbone's states to the text
    positions only. The head reads the first text token ([CLS]; BART: the last real token).
    Built after the text part, so a seed gives the text part the same weights as
    ``EncoderSideNetwork``; the visual part's keys are not canonical side-init keys.

    Several images per example (``n_images`` > 1, NLVR2's left and right image): the visual
    tokens come image after image (``n_images`` blocks of equal length), and a learned
    image-index embedding ``image_embed`` (as VL-T5's image order ids) is added to each block's
    projected tokens before the layer norm, so the network can tell the images apart. With one
    image there is no such parameter: the network (its parameters for a seed, its logits) is the
    one-image network it was before the embedding existed.

    ``visual_fusion`` "ladder" (the default) feeds the projected visual tokens in again before
    every side block after the first, through a gate per block like the text ladders'
    (``x_v = g * x_v + (1 - g) * v``, ``g = sigmoid(visual_gates[j - 1] / T)`` before block j >= 1, alpha starting at
    ``side.gate_alpha``): the visual positions of the side stream are laddered from the frozen
    vision encoder as the text positions are from the frozen backbone. "input" is the authors'
    CLIP-T5 recipe: the visual tokens enter once, at the input. Measured on easy-VQA (README):
    with "input" the pruned side network's post-LN blocks wash the image out of the visual
    positions within the first 20 optimizer steps (the logits stop depending on the image), and
    it never learns even a colour question; with "ladder" it does.

    ``visual_readout`` "text" (the default): the head reads the first text token's side state.
    "text+visual": that state plus a readout of the visual positions' final side states, a
    set pooling as a probe's: ``readout_token`` (d/r -> d/r, then GELU) on every visual token,
    their mean and max over the visual tokens concatenated (B, 2 d/r), and ``readout_out``
    (2 d/r -> d/r, weight and bias zero at init) added to the text token's state, so the head's
    input keeps its width and the network starts as the "text" one (same seed, same logits).
    Created after everything else: a seed gives every other parameter the same weights.

    The visual tokens are standardised per feature before the projection, with the mean and std
    of the training images' tokens (buffers ``visual_mean``, ``visual_std``, set by
    ``set_visual_stats``, saved with the weights). A frozen encoder's tokens share a large
    constant part (``random-vit``: about 85% of their second moment is the same for every
    image); after the projection and its layer norm that part would swamp what differs between
    images, and the side network would have to learn to cancel it first.
    """

    def __init__(
        self,
        backbone_config: PretrainedConfig,
        side: SideConfig,
        d_visual: int,
        n_images: int = 1,
        visual_fusion: str = "ladder",
        visual_readout: str = "text",
    ) -> None:
        check_visual_fusion(visual_fusion)
        check_visual_readout(visual_readout)
        if side.fusion == "xladder":
            raise LadderError(
                "side.fusion='xladder' with visual tokens is not built yet; allowed: 'ladder', "
                "'late', 'none'"
            )
        super().__init__(backbone_config, side)
        dims = backbone_dims(backbone_config, side)
        norm = nn.LayerNorm(self.d_side, eps=dims.ln_eps)
        self.build_visual(
            d_visual, n_images, visual_fusion, self.d_side, norm, len(self.kept), side.gate_alpha
        )
        self.visual_readout = visual_readout
        if visual_readout == "text+visual":  # last: the draws before it stay as they were
            self.readout_token = nn.Linear(self.d_side, self.d_side)
            init_weights(self.readout_token)
            self.readout_out = nn.Linear(2 * self.d_side, self.d_side)
            nn.init.zeros_(self.readout_out.weight)  # starts as the "text" readout
            nn.init.zeros_(self.readout_out.bias)

    def forward(  # type: ignore[override]
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        visual: Tensor | None = None,
        pool_index: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, num_labels). visual: (B, T_v, d_v) visual tokens (every one attended)."""
        if visual is None:
            raise LadderError("VisualSideNetwork needs visual tokens (B, T_v, d_v); got None")
        return self.head(self.pooled(hiddens, attention_mask, pool_index, visual=visual))

    def pooled(
        self,
        hiddens: Mapping[int, Tensor],
        attention_mask: Tensor,
        pool_index: Tensor | None = None,
        visual: Tensor | None = None,
    ) -> Tensor:
        """The side state (B, d/r) the head reads: the first text token (BART: the last real
        one) after every block, with the visual tokens (B, T_v, d_v) before the text (readout
        "text+visual": plus the readout of the visual positions); without them (a text task of
        a multi-task run) the same blocks on the text alone."""
        if visual is None:
            return super().pooled(hiddens, attention_mask, pool_index)
        text = self.side_input(hiddens)  # (B, T, d/r); first: the dropout draws as they were
        v = self.visual_tokens(visual, self.drop)  # (B, T_v, d/r)
        B, Tv = v.shape[:2]
        x = torch.cat([v.to(text.dtype), text], 1)  # (B, T_v + T, d/r)
        ones = torch.ones(B, Tv, dtype=torch.bool, device=x.device)
        full = torch.cat([ones, attention_mask.bool().to(x.device)], 1)  # (B, T_v + T)
        mask = mask_bias(full[:, None, None, :], x.dtype)  # (B, 1, 1, T_v + T)
        for j, i in enumerate(self.kept):
            xv = self.visual_ladder(x[:, :Tv], v, j, self.side.gate_T)  # (B, T_v, d/r)
            xt = x[:, Tv:]  # the backbone saw the text only: its ladders reach text positions
            x = torch.cat(
                [xv, self.before_block(xt, i, hiddens) if self.fusion == "ladder" else xt], 1
            )
            x = self.layers[str(i)](x, mask)  # (B, T_v + T, d/r)
        if self.fusion == "late":
            x = torch.cat([x[:, :Tv], self.after_blocks(x[:, Tv:], hiddens)], 1)
        if self.final_ln is not None:
            x = self.final_ln(x)
        if pool_index is None:
            pool_index = (
                attention_mask.long().sum(1) - 1
                if self.pool_last
                else torch.zeros(B, dtype=torch.long)
            )
        rows = torch.arange(B, device=x.device)
        pooled = x[rows, Tv + pool_index.to(x.device)]  # (B, d/r): the first text token
        if self.visual_readout == "text+visual":
            tokens = nn.functional.gelu(self.readout_token(x[:, :Tv]))  # (B, T_v, d/r)
            pooled = pooled + self.readout_out(torch.cat([tokens.mean(1), tokens.amax(1)], -1))
        return pooled


class VisualT5SideNetwork(VisualInput, T5SideNetwork):
    """The T5 side network (side encoder, side decoder, frozen LM head) with visual tokens
    before the text of the side *encoder* stream, as the paper's CLIP-T5: the T5 backbone sees
    the text alone, the visual tokens reach the side network only.

    The visual part is :class:`VisualInput`'s, as for :class:`VisualSideNetwork` (standardised
    tokens, ``visual_proj`` d_v -> d/r, ``image_embed`` for several images, visual ladders
    with ``visual_fusion`` "ladder", the default, or once at the input with "input"), except
    the norm: ``visual_ln`` is the family's RMSNorm (scale only, no bias), since T5's side stream
    has no LayerNorm anywhere; the tokens are standardised per feature before the projection,
    so a centring norm would add little.

    Side encoder: the stream is ``[visual (T_v) ; text (T)]``; every side encoder block attends
    over both; the backbone's encoder ladders (and late fusion) reach the text positions only,
    the visual ladder the visual positions. The relative position bias covers the whole
    ``T_v + T`` stream as one sequence (visual tokens at positions 0 .. T_v - 1, image after
    image, the text after them; bidirectional buckets): text-to-text biases are T5's (they
    depend on distances only), and the visual tokens get theirs from the same learned table
    rather than none. Side decoder: unchanged, its cross-attention reads the whole side encoder output
    (visual positions always allowed, text positions as ``enc_mask``).

    Built after the text part, so a seed gives the T5 part the weights ``T5SideNetwork`` has;
    ``load_side_init`` loads the same canonical keys; the visual keys are none of them.
    """

    def __init__(
        self,
        backbone_config: PretrainedConfig,
        side: SideConfig,
        lm_head: Tensor,
        d_visual: int,
        n_images: int = 1,
        visual_fusion: str = "ladder",
    ) -> None:
        check_visual_fusion(visual_fusion)
        super().__init__(backbone_config, side, lm_head)
        dims = backbone_dims(backbone_config, side)
        norm = RMSNorm(self.d_side, dims.ln_eps)
        n_blocks = len(self.enc.kept)
        self.build_visual(
            d_visual, n_images, visual_fusion, self.d_side, norm, n_blocks, side.gate_alpha
        )

    def encode_visual(
        self, enc_hiddens: Mapping[int, Tensor], enc_mask: Tensor, visual: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The side encoder over ``[visual ; text]`` -> (output (B, T_v + T, d/r), mask
        (B, T_v + T), True on every visual position). enc_hiddens: {state: (B, T, d)};
        enc_mask: (B, T); visual: (B, T_v, d_v). Without visual tokens (a text task of a
        multi-task run) the same side encoder on the text alone: ``T5SideNetwork.encode``."""
        if visual is None:
            return self.encode(enc_hiddens, enc_mask)
        s = self.enc
        text = s.side_input(enc_hiddens)  # (B, T, d/r)
        v = self.visual_tokens(visual, s.drop)  # (B, T_v, d/r)
        B, Tv = v.shape[:2]
        x = torch.cat([v.to(text.dtype), text], 1)  # (B, T_v + T, d/r)
        ones = torch.ones(B, Tv, dtype=torch.bool, device=x.device)
        full = torch.cat([ones, enc_mask.bool().to(x.device)], 1)  # (B, T_v + T)
        neg = torch.finfo(x.dtype).min  # finite, as T5SideStack
        allowed = full[:, None, None, :]  # (B, 1, 1, T_v + T)
        # (B, nh, T_v + T, T_v + T): one relative position bias over the whole stream + mask
        bias = s.position_bias(x.shape[1], x.device) + torch.where(allowed, 0.0, neg).to(x.dtype)
        for j, i in enumerate(s.kept):
            xv = self.visual_ladder(x[:, :Tv], v, j, self.side.gate_T)  # (B, T_v, d/r)
            xt = s.before_block(x[:, Tv:], i, enc_hiddens)  # ladders: text positions only
            x = s.block(i)(torch.cat([xv, xt], 1), bias)  # (B, T_v + T, d/r)
        x = torch.cat([x[:, :Tv], s.after_blocks(x[:, Tv:], enc_hiddens)], 1)  # late: text only
        return s.drop(s.final_ln(x)), full

    def forward(  # type: ignore[override]
        self,
        enc_hiddens: Mapping[int, Tensor],
        enc_mask: Tensor,
        dec_hiddens: Mapping[int, Tensor],
        dec_mask: Tensor | None = None,
        labels: Tensor | None = None,
        visual: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced pass -> (logits (B, T_dec, V), loss or None), as
        ``T5SideNetwork.forward``; visual: (B, T_v, d_v) visual tokens (every one attended), or
        None for a text task of a multi-task run (:meth:`encode_visual`: the text alone)."""
        enc, mask = self.encode_visual(enc_hiddens, enc_mask, visual)  # (B, T_v + T, d/r)
        return self.decode(enc, mask, dec_hiddens, dec_mask, labels)

    def score_candidates(  # type: ignore[override]
        self,
        enc_hiddens: Mapping[int, Tensor],
        enc_mask: Tensor,
        dec_hiddens: Mapping[int, Tensor],
        dec_mask: Tensor | None,
        labels: Tensor,
        visual: Tensor | None = None,
    ) -> Tensor:
        """Summed log-probability of each candidate label string -> (B, C), as
        ``T5SideNetwork.score_candidates``; visual: (B, T_v, d_v), the side encoder runs once
        per example."""
        enc, mask = self.encode_visual(enc_hiddens, enc_mask, visual)  # (B, T_v + T, d/r)
        return self.score_encoded(enc, mask, dec_hiddens, dec_mask, labels)


def visual_stats(
    blocks: np.ndarray | Tensor | Iterable[np.ndarray], eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std over every token of a grid [..., d_v], or of blocks of one
    (streamed: a block at a time, sums in float64); float32 results, std at least ``eps``."""
    if isinstance(blocks, np.ndarray | Tensor):
        blocks = [np.asarray(blocks)]
    n, total, squares = 0, 0.0, 0.0
    for block in blocks:
        x = np.asarray(block, dtype=np.float64).reshape(-1, block.shape[-1])
        n, total, squares = n + len(x), total + x.sum(0), squares + (x * x).sum(0)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float().clamp_min(eps)


def saved_visual_readout(visual: Mapping[str, Any] | None) -> str:
    """The visual readout of a saved network's ``visual`` record (``<net>.config.json``):
    networks saved before the option existed (no ``readout``) read the text token alone."""
    return str((visual or {}).get("readout", "text"))


def saved_visual_fusion(visual: Mapping[str, Any] | None) -> str:
    """The visual fusion of a saved network's ``visual`` record (``<net>.config.json``):
    networks saved before visual ladders existed (no ``fusion``) took their tokens at the
    input."""
    return str((visual or {}).get("fusion", "input"))


def build_visual_side_network(
    backbone_config: PretrainedConfig,
    side: SideConfig,
    d_visual: int,
    n_images: int = 1,
    visual_fusion: str = "ladder",
    lm_head: Tensor | None = None,
    *,
    visual_readout: str = "text",
) -> VisualSideNetwork | VisualT5SideNetwork:
    """The side network with visual tokens of ``n_images`` images per example, entering as
    ``visual_fusion`` says, read as ``visual_readout`` says: ``VisualSideNetwork`` for an
    encoder-only backbone, ``VisualT5SideNetwork`` for T5 (which needs ``lm_head``, the frozen
    [V, d] LM head; readout "text" only)."""
    check_visual_readout(visual_readout)
    if getattr(backbone_config, "model_type", None) in T5_TYPES:
        if visual_readout != "text":
            raise LadderError(
                f"visual readout {visual_readout!r} with a T5 backbone is not built (its side "
                "decoder cross-attends to every visual position already); allowed: 'text'"
            )
        if lm_head is None:
            raise LadderError(
                f"model_type={backbone_config.model_type!r} with visual tokens needs lm_head "
                "(the frozen [V, d] LM head weight); got None"
            )
        return VisualT5SideNetwork(
            backbone_config, side, lm_head, d_visual, n_images, visual_fusion
        )
    return VisualSideNetwork(
        backbone_config, side, d_visual, n_images, visual_fusion, visual_readout
    )
