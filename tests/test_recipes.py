"""The recipe's parts against torch (schedules, Adam, initialisations), the recipe configs,
--mode=plan, and both recipes end to end on fake COCO / VOC trees."""

from __future__ import annotations

import io
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from configs import ablations, coco_lt, default, voc_lt
from mlcnc_jax import cli, configuration, optim, plan, reports
from mlcnc_jax.data import voc
from mlcnc_jax.models.mlcnc import MLCNC

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------ schedules and Adam


def _recipe_train_config(lr=1e-4, multiplier=1.0):
    c = voc_lt.get_config()
    c.train.learning_rate = lr
    c.train.logit_scale_lr_multiplier = multiplier
    return c


@pytest.mark.parametrize("total", [1, 2, 7, 15, 64, 1000])
def test_one_cycle_lr_and_beta1_match_torch_every_step(total):
    config = _recipe_train_config()
    lr = optim.lr_schedule(config, total)
    beta1 = optim.beta1_schedule(config, total)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-4, total_steps=total, pct_start=0.2)
    steps = np.arange(total)
    ours_lr, ours_b1 = np.asarray(jax.vmap(lr)(steps)), np.asarray(jax.vmap(beta1)(steps))
    for i in range(total):
        np.testing.assert_allclose(ours_lr[i], opt.param_groups[0]["lr"], rtol=1e-6, atol=0)
        np.testing.assert_allclose(ours_b1[i], opt.param_groups[0]["betas"][0], rtol=1e-6)
        opt.step()
        sched.step()
    if total >= 64:
        # The peak at step pct_start * T - 1 (optax's cosine_onecycle_schedule is a step late).
        peak = round(0.2 * total - 1) if (0.2 * total).is_integer() else None
        if peak is not None:
            assert ours_lr[peak] == pytest.approx(1e-4, rel=1e-6)
            assert ours_b1[peak] == pytest.approx(0.85, rel=1e-6)
            late = optax.cosine_onecycle_schedule(total, 1e-4, 0.2, 25.0, 1e4)
            assert float(late(peak)) < 1e-4 * (1 - 1e-6)
        assert ours_lr[-1] == pytest.approx(1e-4 / 25 / 1e4, rel=1e-5)
        assert ours_b1[-1] == pytest.approx(0.95, rel=1e-6)


def test_beta1_fixed_and_constant_schedule():
    c = default.get_config()
    assert float(optim.beta1_schedule(c, 10)(3)) == pytest.approx(0.9)
    c.train.schedule = "constant"
    c.train.cycle_beta1 = True
    with pytest.raises(ValueError, match="one_cycle"):
        optim.beta1_schedule(c, 10)


def test_torch_adam_with_changing_beta1():
    """scale_by_torch_adam against torch.optim.Adam whose betas change every step."""
    rng = np.random.default_rng(0)
    betas = rng.uniform(0.5, 0.99, 25)
    scales = rng.uniform(1e-3, 10, (25, 1, 1))
    grads = (rng.normal(size=(25, 5, 3)) * scales).astype(np.float32)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    tx = optax.chain(optim.scale_by_torch_adam(lambda i: jnp.asarray(betas)[i]), optax.scale(-0.01))
    w = jnp.asarray(w0)
    state = tx.init(w)
    p = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.Adam([p], lr=0.01)
    for i in range(25):
        opt.param_groups[0]["betas"] = (float(betas[i]), 0.999)
        p.grad = torch.tensor(grads[i])
        opt.step()
        u, state = tx.update(jnp.asarray(grads[i]), state, w)
        w = optax.apply_updates(w, u)
        np.testing.assert_allclose(np.asarray(w), p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_create_optimizer_matches_torch_adam_and_one_cycle():
    """The whole chain: L2 mask (2-D bias decayed, 1-D bias and scalar not), torch Adam,
    one-cycle lr and beta1, the logit-scale step multiplier; one torch param group each."""
    rng = np.random.default_rng(1)
    total = 20
    config = _recipe_train_config(lr=1e-2, multiplier=100.0)
    config.train.weight_decay = 0.05  # large, so that a wrong mask shows
    init = {
        "kernel": rng.normal(size=(4, 3)),
        "bias": rng.normal(size=(3,)),
        "proj_bias": rng.normal(size=(2, 3)),
        "logit_scale": np.float32(1.5),
    }
    init = jax.tree.map(lambda a: np.asarray(a, np.float32), init)
    grads = [
        jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), init)
        for _ in range(total)
    ]
    tx, _ = optim.create_optimizer(config, total)
    params = jax.tree.map(jnp.asarray, init)
    state = tx.init(params)
    tp = {
        k: torch.nn.Parameter(torch.tensor(v).reshape(-1) if v.ndim == 0 else torch.tensor(v))
        for k, v in init.items()
    }
    opt = torch.optim.Adam(
        [
            {"params": [tp["kernel"], tp["proj_bias"]], "weight_decay": 0.05},
            {"params": [tp["bias"]], "weight_decay": 0.0},
            {"params": [tp["logit_scale"]], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[1e-2, 1e-2, 1.0], total_steps=total, pct_start=0.2
    )
    for g in grads:
        for k, v in g.items():
            tp[k].grad = torch.tensor(v).reshape(tp[k].shape)
        opt.step()
        sched.step()
        u, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, u)
        for k in init:
            np.testing.assert_allclose(
                np.asarray(params[k]).reshape(-1),
                tp[k].detach().numpy().reshape(-1),
                rtol=2e-5,
                atol=2e-6,
                err_msg=k,
            )


def test_decay_mask():
    params = {
        "a": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)},
        "proj_bias": jnp.zeros((2, 3)),
        "logit_scale": jnp.zeros(()),
    }
    assert optim.decay_mask(params, decay_2d_bias=True) == {
        "a": {"kernel": True, "bias": False},
        "proj_bias": True,
        "logit_scale": False,
    }
    assert optim.decay_mask(params, decay_2d_bias=False)["proj_bias"] is False


# ------------------------------------------------------------------ initialisation


class _Tokens(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return x


def _stats(a) -> tuple[float, float]:
    a = np.asarray(a, np.float64)
    return float(a.std()), float(np.abs(a).max())


def test_torch_param_init_matches_torch_modules():
    k, d, p, c, heads = 12, 256, 20, 512, 8
    model = MLCNC(
        _Tokens(), num_classes=k, embed_dim=d, proj_dim=p, num_heads=heads, param_init="torch"
    )
    params = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 4, c)), train=False)[
        "params"
    ]
    torch.manual_seed(0)
    linear = torch.nn.Linear(c, d)
    mha = torch.nn.MultiheadAttention(d, heads)
    w = torch.empty(k, d, p)
    torch.nn.init.xavier_normal_(w)  # the reference code's per-class projection

    def same_law(ours, theirs, std, bound=None):
        """Both samples have the std (and, if uniform, the bound) of the same law."""
        for sample in (np.asarray(ours), theirs.detach().numpy()):
            s, m = _stats(sample)
            assert s == pytest.approx(std, rel=4 / (2 * sample.size) ** 0.5)  # ~4 sigma
            if bound is not None:
                assert 0.98 * bound < m <= bound

    uniform_std = 3**-0.5  # std of U(-1, 1)
    same_law(params["token_embed"]["kernel"], linear.weight, uniform_std / c**0.5, 1 / c**0.5)
    same_law(params["token_embed"]["bias"], linear.bias, uniform_std / c**0.5)
    assert _stats(params["token_embed"]["bias"])[1] <= 1 / c**0.5
    in_bound = (6 / (d + 3 * d)) ** 0.5  # Xavier-uniform of the stacked [3D, D] in-projection
    for i, name in enumerate(("query", "key", "value")):
        same_law(
            params[name]["kernel"],
            mha.in_proj_weight[i * d : (i + 1) * d],
            uniform_std * in_bound,
            in_bound,
        )
        assert not np.any(np.asarray(params[name]["bias"]))
    same_law(params["out"]["kernel"], mha.out_proj.weight, uniform_std / d**0.5, 1 / d**0.5)
    assert not np.any(np.asarray(params["out"]["bias"])) and not mha.out_proj.bias.any()
    assert not mha.in_proj_bias.any()
    same_law(params["proj_kernel"], w, (2 / (d * p + k * p)) ** 0.5)
    # The flax default is per-class Xavier: ~ sqrt(2 / (D + p)).
    flax_model = MLCNC(_Tokens(), num_classes=k, embed_dim=d, proj_dim=p, num_heads=heads)
    flax_params = flax_model.init(
        {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 4, c)), train=False
    )["params"]
    assert _stats(flax_params["proj_kernel"])[0] > 3 * _stats(params["proj_kernel"])[0]


# ------------------------------------------------------------------ recipe configs


def test_recipes_differ_only_in_their_fields():
    for module, name in ((voc_lt, "voc_lt"), (coco_lt, "coco_lt")):
        ref, pap = module.get_config(), module.get_config("paper")
        assert (ref.recipe, pap.recipe) == ("reference", "paper")
        assert ref.data.name == pap.data.name == name
        diff = {
            f"{s}.{f}" for s in ("model", "loss", "train") for f in ref[s] if ref[s][f] != pap[s][f]
        }
        assert diff == {
            "model.classifier",
            "train.logit_scale_lr_multiplier",
            "loss.fpc",
            "loss.prototypes",
        }
        assert configuration.recipe_differences(ref) == configuration.recipe_differences(pap) == {}
        assert (ref.model.classifier, ref.loss.fpc, ref.loss.prototypes) == (
            "etf_trainable",
            0.1,
            "cumulative",
        )
        assert (pap.model.classifier, pap.loss.fpc, pap.loss.prototypes) == (
            "etf",
            0.2,
            "previous_epoch",
        )
        for c in (ref, pap):
            assert c.train.cycle_beta1 and c.train.decay_2d_bias and c.model.param_init == "torch"
            assert c.train.ema_decay == 0.9997 and c.loss.warmup_epochs == 5
    ref = voc_lt.get_config()
    ref.loss.fpc = 0.2  # a one-field ablation is visible as such
    assert configuration.recipe_differences(ref) == {"loss.fpc": (0.1, 0.2)}
    assert ablations.get_config("no_fpc,voc_lt").recipe == "reference"
    assert (
        default.get_config().recipe == "none"
        and configuration.recipe_differences(default.get_config()) == {}
    )
    with pytest.raises(ValueError, match="recipe"):
        voc_lt.get_config("papr")


# ------------------------------------------------------------------ fake trees


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _split_json(path, ids, labels, names):
    freq = np.zeros(len(names), int)
    for ls in labels:
        freq[ls] += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "num_classes": len(names),
                "class_names": list(names),
                "train_image_ids": ids,
                "train_labels": labels,
                "class_freq": freq.tolist(),
                "class_split": {"head": [], "medium": [], "tail": list(range(len(names)))},
            }
        )
    )
    return freq


def _voc_tree(root, n_train=30, n_test=6):
    names = voc.VOC_CLASSES
    rng = np.random.default_rng(0)
    train = {f"2012_{i:06d}": sorted({i % 20, int(rng.integers(20))}) for i in range(n_train)}
    test = {f"{i:06d}": sorted({i % 20, (i + 7) % 20}) for i in range(n_test)}
    for year, images in (("VOC2012", train), ("VOC2007", test)):
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / year / sub).mkdir(parents=True, exist_ok=True)
        for j, (image_id, classes) in enumerate(images.items()):
            objects = "".join(
                f"<object><name>{names[c]}</name><difficult>0</difficult><bndbox><xmin>1</xmin>"
                "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
                for c in classes
            )
            (root / year / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>x.jpg</filename>{objects}</annotation>"
            )
            (root / year / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg(j))
    (root / "VOC2007" / "ImageSets" / "Main" / "test.txt").write_text("\n".join(test) + "\n")
    return _split_json(root / "lt_splits" / "voc_lt.json", list(train), list(train.values()), names)


def _coco_tree(root, k=4, n_train=24):
    names = [f"thing{i}" for i in range(k)]
    train = {1 + i: sorted({i % k, (3 * i) % k}) for i in range(n_train)}
    test = {900 + i: sorted({i % k}) for i in range(5)}
    for split_name, images in (("train2017", train), ("val2017", test)):
        (root / split_name).mkdir(parents=True, exist_ok=True)
        entries, anns = [], []
        for j, (image_id, classes) in enumerate(images.items()):
            file_name = f"{image_id:012d}.jpg"
            (root / split_name / file_name).write_bytes(_jpeg(j))
            entries.append({"id": image_id, "file_name": file_name, "width": 40, "height": 40})
            for c in classes:
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 10 + 3 * c})
        ann = root / "annotations" / f"instances_{split_name}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        cats = [{"id": 10 + 3 * c, "name": n} for c, n in enumerate(names)]
        ann.write_text(json.dumps({"images": entries, "annotations": anns, "categories": cats}))
    return _split_json(
        root / "lt_splits" / "coco_lt.json", list(train), list(train.values()), names
    )


def _tree(tmp_path, dataset):
    root = tmp_path / dataset
    freq = (_voc_tree if dataset == "voc_lt" else _coco_tree)(root)
    return root, freq


def _tiny(config, root):
    """The recipe unchanged except the scale: a small CPU backbone, 32 px, 2 short epochs."""
    config.data.root = str(root)
    config.data.image_size, config.data.resize_size = 32, 36
    config.model.backbone, config.model.pretrained = "resnet_small", ""
    config.model.embed_dim, config.model.proj_dim, config.model.num_heads = 32, 4, 2
    config.dtype = "float32"
    config.train.batch_size = config.eval.batch_size = 16
    config.train.steps_per_epoch, config.train.num_epochs = 2, 2
    config.loss.warmup_epochs = 1
    # every epoch, as the recipe: two evaluations
    config.train.log_every_steps, config.train.checkpoint_every_steps = 2, 4
    return config


@pytest.mark.parametrize("dataset", ["voc_lt", "coco_lt"])
@pytest.mark.parametrize("recipe", ["reference", "paper"])
def test_plan_on_fake_trees(tmp_path, capsys, dataset, recipe):
    root, freq = _tree(tmp_path, dataset)
    config = (voc_lt if dataset == "voc_lt" else coco_lt).get_config(recipe)
    config.data.root = str(root)
    config.train.batch_size = 8
    config.plan.train_images_per_second = 100.0
    config.plan.eval_images_per_second = 300.0
    result = cli.run(config, str(tmp_path / "work"), "plan")
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(result))
    k = len(freq)
    epoch = int(freq.max()) * k  # class-aware epoch
    steps = -(-epoch // 8)
    test_images = 6 if dataset == "voc_lt" else 5
    assert (last["recipe"], last["recipe_changes"]) == (
        recipe,
        {},
    )  # batch size: not a recipe field
    assert last["num_classes"] == k and last["test_images"] == test_images
    assert last["steps_per_epoch"] == steps and last["total_steps"] == 100 * steps
    assert last["warmup_steps"] == 5 * steps
    assert last["lr_peak_step"] == pytest.approx(0.2 * 100 * steps - 1)
    assert last["images_seen"] == 100 * steps * 8
    evaluations = 100  # every epoch
    assert last["evaluations"] == evaluations and last["eval_passes"] == 2 * evaluations
    assert last["eval_images"] == 2 * evaluations * test_images
    expected = (100 * steps * 8 / 100.0 + 2 * evaluations * test_images / 300.0) / 3600
    assert last["accelerator_hours"] == pytest.approx(expected)


def test_plan_of_the_official_splits(lt_splits_dir):
    for name, steps, test_images in (("voc_lt", 243, 4952), ("coco_lt", 1410, 4952)):
        split = json.loads((lt_splits_dir / f"{name}.json").read_text())
        labels = np.zeros((len(split["train_labels"]), split["num_classes"]), np.uint8)
        for row, classes in enumerate(split["train_labels"]):
            labels[row, classes] = 1
        config = (voc_lt if name == "voc_lt" else coco_lt).get_config()
        p = plan.make_plan(config, labels, test_images)
        assert p["steps_per_epoch"] == steps and p["total_steps"] == 100 * steps
        assert p["warmup_steps"] == 5 * steps and p["images_seen"] == 100 * steps * 64
        assert p["evaluations"] == 100  # every epoch, as the authors' code


def test_plan_reports_fields_changed_from_the_recipe(tmp_path, capsys):
    root, _ = _tree(tmp_path, "coco_lt")
    config = coco_lt.get_config()
    config.data.root = str(root)
    config.recipe = "paper"  # relabelled on the command line: the values are still 'reference'
    result = plan.plan(config)
    assert set(result["recipe_changes"]) == {
        "model.classifier",
        "train.logit_scale_lr_multiplier",
        "loss.fpc",
        "loss.prototypes",
    }
    assert "changed: model.classifier=etf_trainable (recipe etf)" in capsys.readouterr().out


@pytest.mark.parametrize("dataset,recipe", [("voc_lt", "reference"), ("coco_lt", "paper")])
def test_recipe_trains_end_to_end_on_fake_tree(tmp_path, dataset, recipe):
    root, freq = _tree(tmp_path, dataset)
    config = _tiny((voc_lt if dataset == "voc_lt" else coco_lt).get_config(recipe), root)
    results = cli.run(config, str(tmp_path / "work"), "train")
    final = results.final
    assert final.step == 4
    assert final.num_images_scored == final.num_images_expected == (6 if dataset == "voc_lt" else 5)
    for scores in (final.raw, final.ema):
        assert 0 < scores.map.total <= 100
    work = tmp_path / "work"
    assert sorted(p.name for p in work.glob("eval_*.json")) == ["eval_2.json", "eval_4.json"]
    # Final and best-on-test numbers side by side, the latter labelled as test-selected.
    summary = json.loads((work / "summary.json").read_text())
    assert summary["final"]["step"] == 4 and summary["complete"] is True
    assert summary["final"]["map_raw"] == json.loads(
        json.dumps(reports.to_json(final.raw.map.as_dict()))
    )
    evals = {s: json.loads((work / f"eval_{s}.json").read_text()) for s in (2, 4)}
    best = max((2, 4), key=lambda s: evals[s]["map_raw"]["total"])
    assert summary["best_raw_on_test"]["step"] == best
    assert "selected on the test split" in summary["best_raw_on_test"]["selection"]
