"""CLIP's text tower in Flax, converted from the same OpenAI / open_clip file as the image encoder.

The tower: token embedding + positional embedding, a causal pre-LN transformer (the
image encoder's blocks with a causal mask), `ln_final`, then the feature of the
end-of-text token (the largest token id of each text, CLIP's `text.argmax(-1)`) times
`text_projection`: the text's embedding in the joint image-text space.

Key layouts read (torch -> Flax):

    OpenAI, open_clip `CLIP`         open_clip `CustomTextCLIP`         Flax
    token_embedding.weight [V, C]    text.token_embedding.weight       token_embedding/embedding
    positional_embedding [L, C]      text.positional_embedding         positional_embedding
    transformer.resblocks.{i}.*      text.transformer.resblocks.{i}.*  resblocks_{i}/* (as clip.py)
    ln_final.weight, .bias           text.ln_final.*                   ln_final/scale, bias
    text_projection [C, D]           text.text_projection [C, D], or   text_projection [C, D]
                                     .weight [D, C] (+ .bias [D])      (+ text_projection_bias)

The image tower's keys (`visual.*`), `logit_scale`, the `attn_mask` buffer and OpenAI's
`input_resolution` / `context_length` / `vocab_size` entries are ignored. The
architecture is read from the weights (vocabulary, context, width, layers, MLP, output
width; heads = width / 64 as in every CLIP); the activation is not visible in the weights
and is the image encoder's (QuickGELU for OpenAI's models, GELU for open_clip's own).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlcnc_jax.models import clip, tokenizer
from mlcnc_jax.models.pretrained import _set
from mlcnc_jax.models.vit import ACTIVATIONS, ResidualAttentionBlock

_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_IGNORED = {"logit_scale", "attn_mask", "input_resolution", "context_length", "vocab_size"}


@dataclasses.dataclass(frozen=True)
class ClipTextArch:
    """Architecture of a CLIP text tower, as read from its weights.

    Attributes:
        vocab_size: rows of the token embedding (49,408 for CLIP's tokenizer).
        context_length: rows of the positional embedding (77).
        width: token width C.
        layers: residual attention blocks.
        heads: width / 64 (CLIP's convention; not visible in the weights).
        mlp_dim: hidden width of the MLP.
        output_dim: width of the text projection (the joint space, 512 for ViT-B/16).
        proj_bias: the projection is a Linear with a bias (some open_clip models).
    """

    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    output_dim: int
    proj_bias: bool = False

    def describe(self) -> str:
        """One line such as 'width 512, 12 layers, 8 heads, ...'."""
        return (
            f"width {self.width}, {self.layers} layers, {self.heads} heads, MLP {self.mlp_dim}, "
            f"vocabulary {self.vocab_size}, context {self.context_length}, "
            f"output dim {self.output_dim}"
        )


class CLIPTextTransformer(nn.Module):
    """CLIP's text encoder: token ids [B, L] -> text embeddings [B, output_dim].

    Attributes:
        arch: the architecture (`infer_text_architecture`).
        activation: 'quick_gelu' (OpenAI) or 'gelu' (open_clip's own trainings), as the
            image encoder of the same model.
        ln_eps: LayerNorm epsilon (1e-5 in CLIP).
        dtype: computation dtype; parameters stay float32.
    """

    arch: ClipTextArch
    activation: str = "quick_gelu"
    ln_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Embeds token ids (start token, text, end token, zeros; `tokenizer.tokenize`).

        Args:
            tokens: int [B, L] with L <= context_length.

        Returns:
            [B, output_dim] float32 embeddings, not normalised. The embedding of a text is
            read at its end-of-text token, the largest id of its row.
        """
        a = self.arch
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {ACTIVATIONS}")
        b, n = tokens.shape
        if n > a.context_length:
            raise ValueError(f"{n} tokens per text, but the context is {a.context_length}")
        embed = nn.Embed(
            a.vocab_size,
            a.width,
            embedding_init=nn.initializers.normal(0.02),
            param_dtype=jnp.float32,
            name="token_embedding",
        )
        pos = self.param(
            "positional_embedding",
            nn.initializers.normal(0.01),
            (a.context_length, a.width),
            jnp.float32,
        )
        x = (embed(tokens) + pos[:n]).astype(self.dtype)
        for i in range(a.layers):
            x = ResidualAttentionBlock(
                a.width,
                a.heads,
                a.mlp_dim,
                self.activation,
                self.ln_eps,
                self.dtype,
                causal=True,
                name=f"resblocks_{i}",
            )(x)
        x = nn.LayerNorm(
            epsilon=self.ln_eps, dtype=self.dtype, param_dtype=jnp.float32, name="ln_final"
        )(x)
        # The end-of-text token has the largest id: its feature has seen the whole text.
        pooled = x[jnp.arange(b), jnp.argmax(tokens, axis=-1)].astype(jnp.float32)
        proj = self.param(
            "text_projection",
            nn.initializers.normal(a.width**-0.5),
            (a.width, a.output_dim),
            jnp.float32,
        )
        out = pooled @ proj
        if a.proj_bias:
            out = out + self.param(
                "text_projection_bias", nn.initializers.zeros, (a.output_dim,), jnp.float32
            )
        return out


def text_tower_state(state: Mapping[str, np.ndarray], path: str = "") -> dict[str, np.ndarray]:
    """The text tower of a CLIP state dict, in OpenAI's key layout.

    Args:
        state: a whole CLIP state dict (`clip.read_state_dict`), either layout.
        path: the file, for the messages.

    Returns:
        Text-tower key -> array, OpenAI's names; an open_clip Linear projection becomes
        `text_projection` [C, D] (transposed) plus `text_projection_bias` when it has one.

    Raises:
        ValueError: for a file without a text tower (e.g. an image encoder alone).
    """
    where = path or "(state dict)"
    if "text.token_embedding.weight" in state:  # open_clip's CustomTextCLIP: the tower as `text`
        text = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    elif "token_embedding.weight" in state:
        text = {
            k: v
            for k, v in state.items()
            if not k.startswith("visual.") and k not in _IGNORED and not k.startswith("text.")
        }
    else:
        raise ValueError(
            f"{where} holds no CLIP text tower (no token_embedding.weight, with or without "
            "the 'text.' prefix): class names need the file of the whole CLIP model (OpenAI's "
            "ViT-B-16.pt or open_clip's open_clip_model.safetensors), not its image encoder "
            "alone; set config.model.text_weights to such a file, or give the embeddings as "
            "config.model.text_embeddings=FILE.npy"
        )
    text = {k: v for k, v in text.items() if k not in _IGNORED}
    if "text_projection.weight" in text:  # an nn.Linear: [D, C] (+ bias)
        text["text_projection"] = np.ascontiguousarray(text.pop("text_projection.weight").T)
        if "text_projection.bias" in text:
            text["text_projection_bias"] = text.pop("text_projection.bias")
    missing = [
        k
        for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight")
        if k not in text
    ]
    if "text_projection" not in text:
        missing.append("text_projection")
    if missing:
        raise ValueError(f"{where}: the CLIP text tower lacks {', '.join(missing)}")
    return text


def infer_text_architecture(text: Mapping[str, np.ndarray]) -> ClipTextArch:
    """Reads the architecture of a text tower (`text_tower_state`) from its weights."""
    vocab, width = (int(d) for d in text["token_embedding.weight"].shape)
    blocks = {int(m.group(1)) for k in text if (m := _BLOCK_KEY.match(k))}
    mlp = text.get("transformer.resblocks.0.mlp.c_fc.weight")
    return ClipTextArch(
        vocab_size=vocab,
        context_length=int(text["positional_embedding"].shape[0]),
        width=width,
        layers=len(blocks),
        heads=max(width // clip.CLIP_HEAD_WIDTH, 1),
        mlp_dim=int(mlp.shape[0]) if mlp is not None else 4 * width,
        output_dim=int(text["text_projection"].shape[1]),
        proj_bias="text_projection_bias" in text,
    )


def convert_clip_text(text: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Converts a text tower (`text_tower_state`) into `CLIPTextTransformer` params.

    Raises:
        ValueError: for a key that is not part of CLIP's text tower (open_clip's layer
            scale, an appended class token, ...: architectures the module does not have).
    """
    params: dict = {}
    unknown = []
    for key, value in text.items():
        value = np.asarray(value, dtype=np.float32)
        if key == "token_embedding.weight":
            _set(params, ("token_embedding", "embedding"), value)
        elif key in ("positional_embedding", "text_projection", "text_projection_bias"):
            params[key] = value
        elif key in ("ln_final.weight", "ln_final.bias"):
            _set(params, ("ln_final", "scale" if key.endswith("weight") else "bias"), value)
        elif (m := _BLOCK_KEY.match(key)) and m.group(2) in clip._BLOCK_LEAVES:
            clip.set_block_leaf(params, f"resblocks_{m.group(1)}", m.group(2), value)
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (
            f", ... ({len(unknown)} in all)" if len(unknown) > 8 else ""
        )
        raise ValueError(f"keys that are not part of a CLIP text tower: {shown}")
    return params


def load_clip_text(path: str) -> tuple[ClipTextArch, dict[str, Any]]:
    """Reads the text tower of a CLIP weights file.

    Args:
        path: the whole CLIP model's weights (see `clip.read_state_dict` for the formats).

    Returns:
        (architecture, params for `CLIPTextTransformer`).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it holds no text tower, or one with parts the module lacks.
    """
    missing = (
        f"CLIP weights not found: {path}. The text tower is read from the whole CLIP model's "
        "file (OpenAI's ViT-B-16.pt, or open_clip's open_clip_model.safetensors, converted as "
        "the image encoder's message shows but keeping every key). Weights are never "
        "downloaded at run time."
    )
    text = text_tower_state(clip.read_state_dict(path, missing), path)
    return infer_text_architecture(text), convert_clip_text(text)


def encode_texts(
    module: CLIPTextTransformer,
    params: Mapping[str, Any],
    texts: Sequence[str],
    batch_size: int = 256,
) -> np.ndarray:
    """Text embeddings [N, output_dim] (float32, not normalised) of `texts`."""
    tokens = tokenizer.tokenize(texts, module.arch.context_length)
    apply = jax.jit(lambda p, t: module.apply({"params": p}, t))
    out = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        pad = batch_size - len(chunk) if len(tokens) > batch_size else 0
        # Pad to a whole batch so that every chunk reuses one compiled program.
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
        out.append(np.asarray(apply(params, jnp.asarray(padded)))[: len(chunk)])
    return np.concatenate(out).astype(np.float32)


def class_embeddings(
    path: str, class_names: Sequence[str], templates: Sequence[str], activation: str
) -> np.ndarray:
    """One text embedding per class from prompts: CLIP's zero-shot classifier.

    Each class name is put into every template ('a photo of a {}.'), each prompt's
    embedding is L2-normalised, the class's prompts are averaged and the mean normalised
    again (the prompt ensembling of CLIP's paper).

    Args:
        path: the whole CLIP model's weights.
        class_names: the K class names, in the dataset's class order.
        templates: prompt templates, each with one '{}' for the class name.
        activation: the image encoder's activation ('quick_gelu' or 'gelu').

    Returns:
        float32 [K, output_dim], rows of unit norm.

    Raises:
        ValueError: for no templates, a template without '{}', or weights without a text tower.
    """
    templates = list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(
            f"class prompt templates {templates!r}: give one or more, each with '{{}}' where "
            "the class name goes (e.g. 'a photo of a {}.')"
        )
    arch, params = load_clip_text(path)
    module = CLIPTextTransformer(arch, activation=activation)
    params = jax.tree.map(jnp.asarray, params)
    # Underscores in dataset names ('traffic_light') read as spaces in a sentence.
    prompts = [t.format(n.replace("_", " ")) for n in class_names for t in templates]
    emb = encode_texts(module, params, prompts).astype(np.float64)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
    return (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).astype(np.float32)
