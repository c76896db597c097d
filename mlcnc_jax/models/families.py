"""Model families: each kind of model, and everything the rest of the code must know about it.

A family owns its module (`make`), the outputs its losses read, whether it keeps the
feature prototypes (FPC) and uses the loss warm-up, and which features the evaluation
measures. The step, the evaluation, the step counts and the initial state ask the
family of `config.model.name`; nothing else tells kinds of model apart.

To add one, subclass `ModelFamily` and register an instance (the name selects it as
`--config.model.name=NAME`):

    from mlcnc_jax.models import families

    class MyFamily(families.ModelFamily):
        name = "my_model"

        def make(self, config, num_classes, backbone, dtype):
            return MyModel(backbone=backbone, num_classes=num_classes, dtype=dtype)

    families.register_family(MyFamily())
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from mlcnc_jax import prototypes
from mlcnc_jax.models import text_classifier
from mlcnc_jax.models.mlcnc import ATTENTIONS, CLASSIFIERS, MLCNC, Baseline


class ModelFamily:
    """A kind of model (the defaults describe a plain classifier with pooled features).

    Attributes:
      name: the value of config.model.name that selects it.
      loss_outputs: the per-example outputs the losses read (all-gathered over the
        devices under pmap, so every loss sees the global batch); 'logits' at least.
      shared_outputs: outputs the losses read that every device holds whole (not
        per example, e.g. a label embedding): passed on as they are.
      eval_features: the output whose neural-collapse measures the evaluation reports.
      prototype_output: the output whose per-class features make the class prototypes
        of the FPC loss (`prototypes.PrototypeState` in the training state), or None
        for a family that keeps no prototypes.
      uses_warmup: whether config.loss.warmup_epochs applies (the plain-BCE epochs
        before the full loss).
      has_attention_maps: whether `predict` can draw per-class attention maps.
    """

    name: str = ""
    loss_outputs: tuple[str, ...] = ("logits",)
    shared_outputs: tuple[str, ...] = ()
    eval_features: str = "features"
    prototype_output: str | None = None
    uses_warmup: bool = False
    has_attention_maps: bool = False

    def make(
        self,
        config: ml_collections.ConfigDict,
        num_classes: int,
        backbone: nn.Module,
        dtype: Any,
    ) -> nn.Module:
        """The family's module: (images [B, H, W, 3], train) -> dict of outputs.

        Args:
          config: the experiment config (its `model` fields).
          num_classes: K.
          backbone: the backbone module (images -> tokens [B, N, C]).
          dtype: the compute dtype.
        """
        raise NotImplementedError

    @property
    def keeps_prototypes(self) -> bool:
        """Whether the training state holds class prototypes (`prototype_output` is set)."""
        return self.prototype_output is not None

    def warmup_epochs(self, config: ml_collections.ConfigDict) -> int:
        """Epochs of warm-up loss before the full objective (0 when the family has none)."""
        return int(config.loss.warmup_epochs) if self.uses_warmup else 0

    def initial_prototypes(
        self, config: ml_collections.ConfigDict, num_classes: int
    ) -> prototypes.PrototypeState | None:
        """The empty prototype statistics of a fresh run, or None for a family without them."""
        if not self.keeps_prototypes:
            return None
        return prototypes.init_prototypes(num_classes, config.model.proj_dim)

    def pair_features(
        self, features: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (features, one-hot or multi-hot labels) whose neural collapse is measured.

        Args:
          features: the `eval_features` output of a batch's valid images.
          labels: [B, K] their labels.

        Returns:
          Per image: its features [B, C] and its labels.
        """
        return features, labels

    def step_metrics(self, params: Any) -> dict[str, jax.Array]:
        """Scalars of the weights worth logging each step (none by default)."""
        return {}


class MLCNCFamily(ModelFamily):
    """MLC-NC (docs/method.md §1): per-class features from ETF-guided attention, FPC, warm-up."""

    name = "mlcnc"
    loss_outputs = ("logits", "class_features", "projected")
    shared_outputs = ("label_embedding",)
    eval_features = "class_features"
    prototype_output = "projected"
    uses_warmup = True
    has_attention_maps = True

    def make(self, config, num_classes, backbone, dtype):
        m = config.model
        if m.attention not in ATTENTIONS:
            raise ValueError(
                f"unknown model.attention {m.attention!r}; valid: {', '.join(ATTENTIONS)}"
            )
        if m.classifier not in CLASSIFIERS:
            raise ValueError(
                f"unknown model.classifier {m.classifier!r}; valid: {', '.join(CLASSIFIERS)}"
            )
        text = None
        if m.classifier == "text":
            # d must be the backbone's image-text width when it has one (a CLIP ViT's proj).
            embeddings = text_classifier.load_text_embeddings(
                m.text_embeddings,
                num_classes,
                dataset=config.data.name,
                joint_dim=getattr(backbone, "output_dim", None),
            )
            text = tuple(tuple(row) for row in embeddings.tolist())
        return MLCNC(
            backbone=backbone,
            num_classes=num_classes,
            embed_dim=m.embed_dim,
            proj_dim=m.proj_dim,
            attention=m.attention,
            num_heads=m.num_heads,
            attention_dropout=m.attention_dropout,
            classifier=m.classifier,
            alpha=m.alpha,
            logit_scale_init=m.logit_scale_init,
            etf_seed=m.etf_seed,
            param_init=m.param_init,
            text_embeddings=text,
            dtype=dtype,
        )

    def pair_features(self, features, labels):
        """One feature per positive (image, class) pair, labelled with its class."""
        b, c = np.nonzero(labels)
        return features[b, c], np.eye(labels.shape[1], dtype=np.float32)[c]

    def step_metrics(self, params):
        # The learned temperature of the text classifier (classifier='text').
        if "logit_scale" in params:
            return {"logit_scale": jnp.reshape(params["logit_scale"], ())}
        return {}


class BaselineFamily(ModelFamily):
    """The plain baseline: pooled backbone features and a linear classifier."""

    name = "baseline"

    def make(self, config, num_classes, backbone, dtype):
        return Baseline(backbone=backbone, num_classes=num_classes, dtype=dtype)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Registers `family` under `family.name` (the value of config.model.name); returns it."""
    if not family.name:
        raise ValueError(f"{type(family).__name__} has no name: set the class attribute `name`")
    if "logits" not in family.loss_outputs:
        raise ValueError(f"model family {family.name!r}: loss_outputs must include 'logits'")
    if family.keeps_prototypes and family.prototype_output not in family.loss_outputs:
        raise ValueError(
            f"model family {family.name!r}: prototype_output {family.prototype_output!r} "
            "must be one of its loss_outputs (the step gathers those over the devices)"
        )
    _FAMILIES[family.name] = family
    return family


def family_names() -> tuple[str, ...]:
    """The registered model family names."""
    return tuple(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """The registered family `name` (config.model.name)."""
    if name not in _FAMILIES:
        raise ValueError(
            f"unknown model.name {name!r}; valid: {', '.join(_FAMILIES)} "
            "(models.families.register_family adds one)"
        )
    return _FAMILIES[name]


register_family(MLCNCFamily())
register_family(BaselineFamily())
