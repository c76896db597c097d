"""The MLC-NC model (docs/method.md §1) and the plain pooled-feature baseline.

Frozen structures live in the variable collection 'etf', never in 'params':
`etf/label_embedding` [K, D] (the ETF label vectors, queries of the cross-attention)
and, for classifier='etf', `etf/classifier` [K*p, K] (the binarized ETF classifier);
for classifier='text', `etf/classifier` [K*p, K] holds the class text embeddings
instead, placed with their own pairwise cosines (`etf.gram_frame`).
Initialise with `model.init(rngs, x, train=False)` and pass the whole variable dict
to `apply`; take gradients with respect to `variables['params']` only.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlcnc_jax.etf import gram_frame, simplex_etf

ATTENTIONS = ("mha", "cosine")
CLASSIFIERS = ("etf", "etf_trainable", "linear", "text")
PARAM_INITS = ("flax", "torch")

# Temperature of the parameter-free cosine attention: softmax(cos / T) over tokens.
# With T = 1 the weights of two tokens can differ by at most e^2 (cosines lie in
# [-1, 1]), which makes the attention nearly uniform (average pooling) over the 49
# tokens of a 224 px image; T = 0.1 lets a class concentrate on its few best
# matching tokens while keeping the module free of parameters.
COSINE_TEMPERATURE = 0.1


def _torch_linear_kernel_init() -> nn.initializers.Initializer:
    # torch.nn.Linear: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    # torch.nn.Linear's bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / max(fan_in, 1) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    # torch.nn.functional.normalize: x / max(||x||, eps)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


class MLCNC(nn.Module):
    """Backbone tokens -> ETF-guided class features -> per-class projection -> logits.

    Attributes:
        backbone: module mapping images [B, H, W, 3] to tokens [B, N, C].
        num_classes: K.
        embed_dim: D, width of the token embedding and the ETF label vectors.
        proj_dim: p, per-class projection dimension.
        attention: 'mha' (learned multi-head attention, reference code) or 'cosine'
            (parameter-free softmax over cosine(token, l_c) / COSINE_TEMPERATURE).
        num_heads: heads of the 'mha' attention (D must be divisible by it).
        attention_dropout: dropout rate on the 'mha' attention weights (train only,
            rng stream 'dropout').
        classifier: 'etf' (frozen ETF, in collection 'etf'), 'etf_trainable' (ETF
            initialisation, in 'params'), 'linear' (learned per-class weight and bias
            on each class's own projection) or 'text' (frozen, in collection 'etf': the
            ETF's place and shape [K*p, K], with the Gram matrix of `text_embeddings`
            instead of the ETF's, placed by the same seeded basis; `etf.gram_frame`).
        text_embeddings: classifier='text' only: the K L2-normalised class text
            embeddings [K, d] as nested tuples (hashable, like every attribute); any d
            (only their inner products enter the classifier).
        alpha: scale applied to the positive entries of the class features.
        logit_scale_init: initial value of the learned logit scale gamma.
        etf_seed: seed of both ETF constructions.
        param_init: 'flax' (flax's initialisers; Xavier-normal of each class's W_c
            separately) or 'torch' (the reference code's torch defaults: token
            embedding as torch.nn.Linear, weight and bias U(-1/sqrt(C), 1/sqrt(C));
            attention as torch.nn.MultiheadAttention, Xavier-uniform over the stacked
            [3D, D] in-projection, the out-projection's weight as a torch.nn.Linear,
            zero biases; W [K, D, p] Xavier-normal over the 3-D tensor, fan_in = D*p,
            fan_out = K*p, std = sqrt(2 / (D*p + K*p))).
        dtype: computation dtype of the backbone, embedding and projections;
            parameters are float32 and every output is float32.
    """

    backbone: nn.Module
    num_classes: int
    embed_dim: int = 768
    proj_dim: int = 20
    attention: str = "mha"
    num_heads: int = 8
    attention_dropout: float = 0.1
    classifier: str = "etf"
    alpha: float = 1.0
    logit_scale_init: float = 1.0
    etf_seed: int = 0
    param_init: str = "flax"
    text_embeddings: tuple[tuple[float, ...], ...] | None = None
    dtype: Any = jnp.float32

    def _check(self) -> None:
        if self.param_init not in PARAM_INITS:
            raise ValueError(f"unknown param_init {self.param_init!r}; valid: {PARAM_INITS}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; valid: {ATTENTIONS}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {self.classifier!r}; valid: {CLASSIFIERS}")
        if self.classifier == "text" and (
            self.text_embeddings is None or len(self.text_embeddings) != self.num_classes
        ):
            rows = None if self.text_embeddings is None else len(self.text_embeddings)
            raise ValueError(
                f"classifier 'text' needs text_embeddings with one row per class "
                f"({self.num_classes}); got {rows} rows"
            )
        if self.attention == "mha" and self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )

    def _mha(
        self, label_embedding: jax.Array, tokens: jax.Array, train: bool
    ) -> tuple[jax.Array, jax.Array]:
        d, h = self.embed_dim, self.num_heads
        dh = d // h

        torch_init = self.param_init == "torch"
        # torch's MultiheadAttention draws its [3D, D] in-projection Xavier-uniform: bound
        # sqrt(6 / (D + 3D)), i.e. variance scale 1/2 over each [D, D] block's fan_avg.
        in_init = nn.initializers.variance_scaling(0.5 if torch_init else 1.0, "fan_avg", "uniform")
        out_init = _torch_linear_kernel_init() if torch_init else nn.initializers.xavier_uniform()

        def dense(name):
            return nn.Dense(
                d,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=out_init if name == "out" else in_init,
                bias_init=nn.initializers.zeros,
                name=name,
            )

        # The queries are the same K label vectors for every image: project once.
        q = dense("query")(label_embedding.astype(self.dtype)).reshape(-1, h, dh)  # [K,H,dh]
        k = dense("key")(tokens).reshape(*tokens.shape[:2], h, dh)  # [B,N,H,dh]
        v = dense("value")(tokens).reshape(*tokens.shape[:2], h, dh)
        scores = jnp.einsum("khd,bnhd->bhkn", q, k).astype(jnp.float32) / jnp.sqrt(dh)
        weights = jax.nn.softmax(scores, axis=-1)  # [B,H,K,N]
        dropped = nn.Dropout(self.attention_dropout, deterministic=not train)(weights)
        out = jnp.einsum("bhkn,bnhd->bkhd", dropped.astype(self.dtype), v)
        out = dense("out")(out.reshape(*out.shape[:2], d))  # [B,K,D]
        # Maps for visualisation: before dropout, averaged over heads.
        return out, weights.mean(axis=1)

    def _cosine(self, label_embedding: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        tokens32 = tokens.astype(jnp.float32)
        cos = jnp.einsum("kd,bnd->bkn", _l2_normalize(label_embedding), _l2_normalize(tokens32))
        weights = jax.nn.softmax(cos / COSINE_TEMPERATURE, axis=-1)  # [B,K,N]
        return jnp.einsum("bkn,bnd->bkd", weights, tokens32), weights

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        """Runs the model.

        Args:
            images: [B, H, W, 3] normalised images.
            train: training mode (batch statistics, attention dropout).

        Returns:
            float32 dict: logits [B, K]; class_features [B, K, D] (cross-attention
            output after the alpha scaling); projected [B, K, p] (unit norm per
            class); attention [B, K, N] (attention weights, mean over heads);
            label_embedding [K, D] (the fixed ETF rows).
        """
        self._check()
        k, d, p = self.num_classes, self.embed_dim, self.proj_dim
        label_embedding = self.variable(
            "etf",
            "label_embedding",
            lambda: jnp.asarray(simplex_etf(k, d, self.etf_seed).T),
        ).value

        tokens = self.backbone(images, train)  # [B,N,C]
        torch_init = self.param_init == "torch"
        embed_init = {}
        if torch_init:
            embed_init = {
                "kernel_init": _torch_linear_kernel_init(),
                "bias_init": _torch_linear_bias_init(tokens.shape[-1]),
            }
        tokens = nn.Dense(
            d, dtype=self.dtype, param_dtype=jnp.float32, name="token_embed", **embed_init
        )(tokens)
        tokens = nn.relu(tokens)

        if self.attention == "mha":
            feats, attn = self._mha(label_embedding, tokens, train)
        else:
            feats, attn = self._cosine(label_embedding, tokens)
        feats = feats.astype(jnp.float32)
        feats = jnp.where(feats > 0, self.alpha * feats, feats)

        # Per-class projection W [K, D, p]. flax: Xavier-normal over (D, p) separately for each
        # class (std ~ sqrt(2 / (D + p))); torch: torch.nn.init.xavier_normal_ of the 3-D tensor
        # (dim 1 in, dim 0 out, dim 2 receptive field), std sqrt(2 / (D*p + K*p)), ~5x smaller.
        if torch_init:
            w_init = nn.initializers.variance_scaling(
                1.0, "fan_avg", "normal", in_axis=1, out_axis=0
            )
        else:
            w_init = nn.initializers.xavier_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        w = self.param("proj_kernel", w_init, (k, d, p), jnp.float32)
        b = self.param("proj_bias", nn.initializers.zeros, (k, p), jnp.float32)
        z = jnp.einsum("bkd,kdp->bkp", feats.astype(self.dtype), w.astype(self.dtype))
        z = z.astype(jnp.float32) + b
        projected = _l2_normalize(z)

        gamma = self.param(
            "logit_scale",
            nn.initializers.constant(self.logit_scale_init),
            (),
            jnp.float32,
        )

        def etf_init():
            return jnp.asarray(simplex_etf(k, k * p, self.etf_seed))

        def text_init():
            text = np.asarray(self.text_embeddings, np.float32)
            return jnp.asarray(gram_frame(text, k * p, self.etf_seed))

        if self.classifier == "etf":
            v = self.variable("etf", "classifier", etf_init).value
        elif self.classifier == "text":
            v = self.variable("etf", "classifier", text_init).value
        elif self.classifier == "etf_trainable":
            v = self.param("classifier", lambda _: etf_init())
        if self.classifier == "linear":
            cw = self.param(
                "classifier_kernel",
                nn.initializers.normal(p**-0.5),
                (k, p),
                jnp.float32,
            )
            cb = self.param("classifier_bias", nn.initializers.zeros, (k,), jnp.float32)
            scores = jnp.einsum("bkp,kp->bk", projected, cw) + cb
        else:
            scores = projected.reshape(projected.shape[0], k * p) @ v
        return {
            "logits": gamma * scores,
            "class_features": feats,
            "projected": projected,
            "attention": attn.astype(jnp.float32),
            "label_embedding": label_embedding,
        }


class Baseline(nn.Module):
    """Backbone, global average pooling of the tokens and a linear classifier.

    Attributes:
        backbone: module mapping images [B, H, W, 3] to tokens [B, N, C].
        num_classes: K.
        dtype: computation dtype (parameters and outputs float32).
    """

    backbone: nn.Module
    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        """Runs the model.

        Args:
            images: [B, H, W, 3] normalised images.
            train: training mode (batch statistics).

        Returns:
            float32 dict: logits [B, K]; features [B, C] (pooled tokens).
        """
        tokens = self.backbone(images, train)
        features = tokens.astype(jnp.float32).mean(axis=1)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="classifier",
        )(features)
        return {"logits": logits.astype(jnp.float32), "features": features}
