"""Model families: what each one declares, and the registry's refusals."""

import numpy as np
import pytest

from configs import default
from mlcnc_jax import models
from mlcnc_jax.models import families


def test_the_two_families_declare_what_the_step_and_the_evaluation_read():
    mlcnc, baseline = families.get_family("mlcnc"), families.get_family("baseline")
    assert mlcnc.loss_outputs == ("logits", "class_features", "projected")
    assert mlcnc.shared_outputs == ("label_embedding",)
    assert mlcnc.keeps_prototypes and mlcnc.prototype_output == "projected"
    assert not baseline.keeps_prototypes and baseline.loss_outputs == ("logits",)
    c = default.get_config()
    c.loss.warmup_epochs = 3
    assert mlcnc.warmup_epochs(c) == 3 and baseline.warmup_epochs(c) == 0
    assert baseline.initial_prototypes(c, 4) is None
    protos = mlcnc.initial_prototypes(c, 4)
    assert protos.epoch_sum.shape == (4, c.model.proj_dim)


def test_each_family_builds_its_module_and_outputs_what_it_declares():
    import jax
    import jax.numpy as jnp

    c = default.get_config()
    c.model.embed_dim, c.model.proj_dim, c.model.num_heads = 8, 4, 2
    c.model.pretrained = "none"
    x = jnp.zeros((2, 32, 32, 3))
    for name in ("mlcnc", "baseline"):
        c.model.name = name
        family = families.get_family(name)
        model = models.create_model(c, 3)
        out = model.apply(model.init(jax.random.PRNGKey(0), x, train=False), x, train=False)
        assert set(family.loss_outputs) | set(family.shared_outputs) <= set(out)
        assert family.eval_features in out


def test_mlcnc_measures_neural_collapse_over_the_positive_pairs():
    features = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # [B, K, D]
    labels = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    f, y = families.get_family("mlcnc").pair_features(features, labels)
    # Hand-picked: (image 0, class 0), (image 0, class 2), (image 1, class 1).
    np.testing.assert_array_equal(f, [features[0, 0], features[0, 2], features[1, 1]])
    np.testing.assert_array_equal(y, np.eye(3)[[0, 2, 1]])
    pooled = features[:, 0]
    f, y = families.get_family("baseline").pair_features(pooled, labels)
    assert f is pooled and y is labels


def test_the_registry_refuses_what_the_step_could_not_run():
    class NoLogits(families.ModelFamily):
        name = "no_logits"
        loss_outputs = ("features",)

    class Unnamed(families.ModelFamily):
        pass

    class LostPrototypes(families.ModelFamily):
        name = "lost"
        prototype_output = "projected"  # not gathered: not among its loss outputs

    with pytest.raises(ValueError, match="must include 'logits'"):
        families.register_family(NoLogits())
    with pytest.raises(ValueError, match="has no name"):
        families.register_family(Unnamed())
    with pytest.raises(ValueError, match="prototype_output 'projected' must be one of"):
        families.register_family(LostPrototypes())
    assert families.family_names() == ("mlcnc", "baseline")
    with pytest.raises(ValueError, match="unknown model.name 'mlc'.*mlcnc, baseline.*register"):
        families.get_family("mlc")
