"""Quality benchmark, its protocol: which rows, budgets, seeds and grids run, and their configs.

`python -m benchmarks.quality` (benchmarks/quality.py) describes the protocol in full; this
module holds its tables, the config of one run and the choices made from the selection runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from benchmarks.quality_stats import num, val_total
from configs import ablations, pretrain


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Budgets, seeds and grids (the same for every row)."""

    short_steps: int = 120  # 10 'epochs' of 12 steps
    long_steps: int = 360  # the default run's 10 x 36
    # Part 'budget': do MLC-NC and the best baselines still improve with 2x, 4x (and BCE
    # class-aware 8x) the long budget?
    double_steps: int = 720
    quadruple_steps: int = 1440
    octuple_steps: int = 2880
    epochs: int = 10  # the steps form this many epochs (prototype updates, FLA warm-up unit)
    main_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    other_seeds: tuple[int, ...] = (0, 1, 2)
    val_fraction: float = 0.25
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    logit_scale_grid: tuple[float, ...] = (8.0, 16.0)
    vit_pretrain_steps: int = 0  # 0: configs/pretrain.py's (10 epochs of the 10,000 images)
    # A trunk below this test mAP on its own classes (chance about 8) has learned too little
    # for fine-tuning from it to show anything: its rows are not run (the ResNet one has 95+).
    min_trunk_map: float = 50.0


QUICK = Protocol(
    short_steps=10,
    long_steps=20,
    double_steps=40,
    quadruple_steps=80,
    octuple_steps=160,
    epochs=2,
    main_seeds=(0,),
    other_seeds=(0,),
    lr_grid=(1e-3,),
    logit_scale_grid=(16.0,),
    vit_pretrain_steps=10,
    min_trunk_map=0.0,
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: `name` is an entry of configs/ablations.VARIANTS."""

    name: str
    description: str

    @property
    def is_mlcnc(self) -> bool:
        return ablations.VARIANTS[self.name].get("model.name", "mlcnc") == "mlcnc"

    @property
    def sampling(self) -> str:
        return ablations.VARIANTS[self.name].get("data.sampling", "class_aware")


_LOSSES = {"bce": "BCE", "focal": "focal", "asl": "ASL", "db": "DB-focal", "two_way": "two-way"}
_SAMPLERS = {"aware": "class-aware", "uniform": "uniform"}
BASELINES = [
    Variant(f"{loss}_{s}", f"plain model (global pooling, linear classifier), {label}, {text}")
    for loss, label in _LOSSES.items()
    for s, text in _SAMPLERS.items()
]
ABLATIONS = [
    Variant("no_fla", "MLC-NC without FLA (and its warm-up)"),
    Variant("no_fpc", "MLC-NC without FPC"),
    Variant("linear_classifier", "MLC-NC, trainable linear classifier instead of the ETF"),
    Variant("trainable_etf", "MLC-NC, ETF-initialised classifier left trainable"),
    Variant("cumulative_prototypes", "MLC-NC, prototypes accumulated over the whole run"),
    Variant("cosine_attention", "MLC-NC, parameter-free cosine attention (the paper's text)"),
]
MLCNC = Variant("mlcnc", "MLC-NC (default config), class-aware")
VARIANTS = {v.name: v for v in [MLCNC, *BASELINES, *ABLATIONS]}
MAIN = ("mlcnc", "bce_aware", "bce_uniform")
OTHER_BASELINES = tuple(v.name for v in BASELINES if v.name not in MAIN)
PARTS = ("main", "ablations", "baselines", "second_split", "budget", "vit")
# The second, independent check: the same classes with another generation seed, the training
# split made by the long-tailed split builder (lt_builder.py) over a balanced pool with more
# objects per image, and its own test split.
SECOND_SPLIT = {"data.synthetic_seed": 1, "data.synthetic_train_split": "dbloss"}
BUDGET_TITLES = {
    "long": "long budget",
    "short": "short budget",
    "double": "twice the long budget (part 'budget')",
    "quadruple": "four times the long budget (part 'budget')",
    "octuple": "eight times the long budget (part 'budget')",
    "second": "second split (synthetic_seed 1, lt_builder's long tail), long budget",
    "vit": "hybrid ViT backbone (vit_hybrid_cpu32, its own trunk pre-trained as the ResNet one), long budget",
}
# Part 'vit': a ViT trunk pre-trained on the 'pretrain' classes by configs/pretrain.py (as the
# shipped ResNet trunk was), then these rows fine-tuned from it.
VIT_BACKBONE = "vit_hybrid_cpu32"
VIT_PRETRAIN_LR = 1e-3
VIT_ROWS = ("mlcnc", "bce_aware")
# Part 'budget': MLC-NC and the class-aware baselines of the main rows, trained twice and
# four times as long, show whether the long budget is long enough for them to stop improving
# and whether the verdicts change with more steps; BCE class-aware, the plainest baseline,
# also at eight times.
LADDER = ("long", "double", "quadruple", "octuple")
BUDGET_ROWS = ("mlcnc", "bce_aware")  # and the best of the other baselines, if class-aware
OCTUPLE_ROWS = ("bce_aware",)


def budget_steps(protocol: Protocol) -> dict[str, int]:
    """Training steps of each budget (a table's runs)."""
    p = protocol
    return {
        "long": p.long_steps,
        "short": p.short_steps,
        "double": p.double_steps,
        "quadruple": p.quadruple_steps,
        "octuple": p.octuple_steps,
        "second": p.long_steps,
        "vit": p.long_steps,
    }


def experiment_config(
    name: str,
    steps: int,
    protocol: Protocol,
    *,
    data_root: str,
    lr: float,
    logit_scale: float,
    seed: int,
    validation: bool,
    second_split: bool = False,
    vit_trunk: str = "",
):
    """The full config of one run: configs/default.py with the row's and the run's changes.

    `vit_trunk`: fine-tune the ViT backbone from this pre-training workdir instead.
    """
    c = ablations.get_config(name)
    if vit_trunk:
        c.model.backbone = VIT_BACKBONE
        c.model.pretrained = vit_trunk
    for key, value in (SECOND_SPLIT if second_split else {}).items():
        section, field = key.split(".")
        setattr(c[section], field, value)
    c.data.root = data_root
    c.train.num_epochs = protocol.epochs
    c.train.steps_per_epoch = max(1, steps // protocol.epochs)
    # One evaluation and one checkpoint, at the end.
    c.train.eval_every_epochs = 10**6
    c.train.checkpoint_every_steps = 10**9
    c.train.keep_checkpoints = 1
    c.train.log_every_steps = 50
    c.train.learning_rate = float(lr)
    if VARIANTS[name].is_mlcnc:
        c.model.logit_scale_init = float(logit_scale)
    c.seed = int(seed)
    c.data.val_fraction = protocol.val_fraction if validation else 0.0
    return c


def vit_pretrain_config(data_root: str, protocol: Protocol):
    """configs/pretrain.py with the ViT backbone: the run that makes part 'vit''s trunk."""
    c = pretrain.get_config()
    c.data.root = data_root
    if protocol.vit_pretrain_steps:
        c.train.num_epochs = 1
        c.train.steps_per_epoch = protocol.vit_pretrain_steps
        c.train.eval_every_epochs = 1
    c.model.backbone = VIT_BACKBONE
    c.train.learning_rate = VIT_PRETRAIN_LR
    return c


def weak_trunk(trunk: dict, protocol: Protocol) -> list[str]:
    """[why its rows are not run] for a pre-trained trunk below protocol.min_trunk_map, else []."""
    trunk_map = max(num(trunk["map"]["total"]), num(trunk["map_ema"]["total"]))
    if trunk_map >= protocol.min_trunk_map:
        return []
    return [  # NaN (a trunk without a score) too
        f"the rows of part 'vit': its trunk reached only {trunk_map:.1f} mAP on its own "
        f"classes (below {protocol.min_trunk_map:g}), too little to fine-tune from"
    ]


def best_by_validation(names: Sequence[str], chosen: dict) -> str | None:
    """The row of `names` with the highest validation total mAP (None if none was selected)."""
    candidates = [n for n in names if n in chosen]
    if not candidates:
        return None
    return max(candidates, key=lambda n: val_total(chosen[n]["val_map"]))


def selection_rows(parts: Sequence[str]) -> list[str]:
    """The rows whose settings `parts` need chosen on the validation split (MLC-NC first)."""
    names = list(MAIN) if {"main", "second_split", "budget", "vit"} & set(parts) else []
    names += [n for n in OTHER_BASELINES if "baselines" in parts]
    names += [v.name for v in ABLATIONS if "ablations" in parts]
    if "mlcnc" not in names and any(VARIANTS[n].is_mlcnc for n in names):
        names.insert(0, "mlcnc")
    return names


def final_rows(
    parts: Sequence[str], names: Sequence[str], best_other: str | None, protocol: Protocol
) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """The test-split runs of `parts` but part 'vit' (it waits for its trunk).

    Args:
      parts: the parts asked for.
      names: the rows selected for them (`selection_rows`).
      best_other: the best of the other baselines by validation mAP (a main row), or None.
      protocol: the budgets and seeds.

    Returns:
      [(budget, row, steps, seeds)], in the order the report lists them.
    """
    p = protocol
    main_rows = [n for n in (*MAIN, best_other) if n and "main" in parts]
    if "main" not in parts:
        names = [n for n in names if n not in MAIN]
    rows = []
    for name in names:
        if name in main_rows:
            rows.append(("long", name, p.long_steps, p.main_seeds))
            rows.append(("short", name, p.short_steps, p.main_seeds))
        else:
            rows.append(("long", name, p.long_steps, p.other_seeds))
    if "second_split" in parts:  # MAIN's rows with their settings chosen on the first split
        rows += [("second", name, p.long_steps, p.other_seeds) for name in MAIN]
    if "budget" in parts:
        for name in dict.fromkeys((*BUDGET_ROWS, best_other)):
            if name and VARIANTS[name].sampling == "class_aware":
                rows.append(("double", name, p.double_steps, p.other_seeds))
                rows.append(("quadruple", name, p.quadruple_steps, p.other_seeds))
        rows += [("octuple", name, p.octuple_steps, p.other_seeds) for name in OCTUPLE_ROWS]
    return rows


def run_order(runs: Sequence[tuple[str, int]]) -> list[int]:
    """Indices of (budget, seed) pairs, seed-major: a deadline leaves every row and budget seeds."""
    budgets = ("long", "second", "vit", "short", *LADDER[1:])
    return sorted(range(len(runs)), key=lambda i: (runs[i][1], budgets.index(runs[i][0])))
