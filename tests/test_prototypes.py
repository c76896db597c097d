"""Prototype statistics against a numpy reference over two epochs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcnc_jax import prototypes as proto

K, P, B = 5, 3, 6


class RefPrototypes:
    """Plain numpy bookkeeping, pair by pair."""

    def __init__(self):
        self.epoch = [[] for _ in range(K)]
        self.all = [[] for _ in range(K)]
        self.protos = np.zeros((K, P))
        self.valid = np.zeros(K, bool)
        self.cumulative_protos = np.zeros((K, P))
        self.cumulative_valid = np.zeros(K, bool)

    def add(self, z, y, mask):
        for b in range(z.shape[0]):
            if not mask[b]:
                continue
            for c in range(K):
                if y[b, c] > 0.5:
                    v = z[b, c] / np.linalg.norm(z[b, c])
                    self.epoch[c].append(v)
                    self.all[c].append(v)

    def end_epoch(self):
        for c in range(K):
            if self.epoch[c]:
                self.protos[c] = np.mean(self.epoch[c], axis=0)
                self.valid[c] = True
            self.epoch[c] = []
        self.cumulative_protos = np.array(
            [np.mean(v, axis=0) if v else np.zeros(P) for v in self.all]
        )
        self.cumulative_valid = np.array([bool(v) for v in self.all])

    def cumulative(self):
        return self.cumulative_protos, self.cumulative_valid


def _batch(rng, absent=()):
    z = rng.normal(size=(B, K, P)) * rng.uniform(0.5, 3.0, (B, K, 1))  # not normalised
    y = (rng.random((B, K)) < 0.5).astype(np.float32)
    y[:, list(absent)] = 0.0
    mask = rng.random(B) < 0.8
    return z.astype(np.float32), y, mask


def test_two_epochs_against_reference():
    rng = np.random.default_rng(0)
    state = proto.init_prototypes(K, P)
    ref = RefPrototypes()
    acc = jax.jit(proto.accumulate)
    end = jax.jit(proto.end_epoch)
    cur = jax.jit(proto.current, static_argnames="mode")

    p0, v0 = cur(state, "previous_epoch")
    assert not np.any(v0) and p0.shape == (K, P)
    assert not np.any(cur(state, "cumulative")[1])

    # Epoch 1: class 4 never appears. Epoch 2: class 3 absent as well, so it keeps
    # its epoch-1 prototype while the cumulative mean keeps growing elsewhere.
    for epoch, absent in enumerate([(4,), (3, 4)]):
        for _ in range(3):
            z, y, mask = _batch(rng, absent)
            state = acc(state, z, y, jnp.asarray(mask))
            ref.add(z.astype(np.float64), y, mask)
            # Within an epoch neither kind moves: both are fixed at the end of an epoch.
            pm, pv = cur(state, "previous_epoch")
            np.testing.assert_allclose(np.asarray(pm), ref.protos, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(pv), ref.valid)
            cm, cv = cur(state, "cumulative")
            rm, rv = ref.cumulative()
            np.testing.assert_allclose(np.asarray(cm), rm, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(cv), rv)
        state = end(state)
        ref.end_epoch()
        pm, pv = cur(state, "previous_epoch")
        np.testing.assert_allclose(np.asarray(pm), ref.protos, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(pv), ref.valid)
        cm, cv = cur(state, "cumulative")
        np.testing.assert_allclose(np.asarray(cm), ref.cumulative()[0], atol=1e-6)
        np.testing.assert_array_equal(np.asarray(cv), ref.cumulative()[1])
        assert np.all(np.asarray(state.epoch_count) == 0)
        assert np.all(np.asarray(state.epoch_sum) == 0)
        if epoch == 1:
            assert list(np.asarray(pv)) == [True, True, True, True, False]
            # Previous-epoch and cumulative prototypes now differ for seen classes.
            assert not np.allclose(np.asarray(pm)[:3], np.asarray(cur(state, "cumulative")[0])[:3])
    assert state.total_count.dtype == jnp.int32
    rm, _ = ref.cumulative()
    np.testing.assert_array_equal(np.asarray(state.total_count), [len(v) for v in ref.all])


def test_mask_and_gradient_isolation():
    rng = np.random.default_rng(1)
    z, y, _ = _batch(rng)
    mask = np.zeros(B, bool)
    mask[:2] = True
    state = proto.accumulate(proto.init_prototypes(K, P), z, y, jnp.asarray(mask))
    expected = proto.accumulate(proto.init_prototypes(K, P), z[:2], y[:2])
    np.testing.assert_allclose(
        np.asarray(state.epoch_sum), np.asarray(expected.epoch_sum), atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(state.epoch_count), np.asarray(expected.epoch_count))

    # Nothing differentiates through the statistics.
    def f(a):
        s = proto.end_epoch(proto.accumulate(proto.init_prototypes(K, P), a, y))
        return jnp.sum(proto.current(s, "cumulative")[0])

    assert np.all(np.asarray(jax.grad(f)(z)) == 0)


def test_pmap_psum_matches_single_device():
    n_dev = 4
    if jax.local_device_count() < n_dev:
        pytest.skip("needs 4 devices (tests/conftest.py sets 8 fake CPU devices)")
    rng = np.random.default_rng(2)
    z = rng.normal(size=(n_dev * 2, K, P)).astype(np.float32)
    y = (rng.random((n_dev * 2, K)) < 0.5).astype(np.float32)
    mask = rng.random(n_dev * 2) < 0.7
    state = proto.init_prototypes(K, P)
    full = proto.accumulate(state, z, y, jnp.asarray(mask))

    rep = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev, *a.shape)), state)
    shard = lambda a: a.reshape(n_dev, 2, *a.shape[1:])  # noqa: E731
    out = jax.pmap(lambda s, a, b, m: proto.accumulate(s, a, b, m, axis_name="d"), axis_name="d")(
        rep, shard(z), shard(y), shard(mask)
    )
    for d in range(n_dev):
        np.testing.assert_allclose(
            np.asarray(out.total_sum[d]), np.asarray(full.total_sum), atol=1e-5
        )
        np.testing.assert_array_equal(np.asarray(out.epoch_count[d]), np.asarray(full.epoch_count))


def test_bad_input():
    state = proto.init_prototypes(K, P)
    with pytest.raises(ValueError, match="Unknown prototype mode 'last'"):
        proto.current(state, "last")
    with pytest.raises(ValueError, match="projected"):
        proto.accumulate(state, jnp.zeros((B, K, P + 1)), jnp.zeros((B, K)))
    with pytest.raises(ValueError, match="labels"):
        proto.accumulate(state, jnp.zeros((B, K, P)), jnp.zeros((B, K + 1)))
    with pytest.raises(ValueError, match="num_classes"):
        proto.init_prototypes(0, P)


def test_state_is_a_pytree():
    state = proto.init_prototypes(K, P)
    leaves = jax.tree_util.tree_leaves(state)
    assert len(leaves) == 8
    assert state.valid.dtype == jnp.bool_ and state.prototypes.dtype == jnp.float32
