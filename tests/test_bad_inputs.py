"""Every error a user can cause ends in one message: exit code 1, no traceback.

Each case is a bad input given to run.py's main as a user would give it, on a tiny config or
tiny files; every case fails before any training step, most before any data is read. The
cases that need an environment of their own run as run.py processes; the others run one
after another in one process that runs main as run.py does (to pay the start-up once).
"""

import os
import shutil

import numpy as np
from PIL import Image
from test_cli import run_py

from configs import default
from mlcnc_jax import configuration

TINY = [
    "--config=configs/default.py",
    "--config.data.image_size=32",
    "--config.data.resize_size=36",
    "--config.model.backbone=resnet_small",
    "--config.model.embed_dim=32",
    "--config.model.proj_dim=4",
    "--config.model.num_heads=2",
    "--config.train.batch_size=16",
    "--config.eval.batch_size=16",
    "--config.train.steps_per_epoch=3",
    "--config.train.num_epochs=2",
]


def _png(path, size=(8, 8)):
    Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(path)
    return path


def _csv_case(tmp, train, test, images=None):
    """CSV data in `tmp`: (train rows, test rows) and the images they name."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("0.png", "1.png", "2.png"):
        _png(tmp / name)
    for name, content in (images or {}).items():
        (tmp / name).write_bytes(content)
    for name, rows in (("train.csv", train), ("test.csv", test)):
        data = rows if isinstance(rows, bytes) else rows.encode()
        (tmp / name).write_bytes(data)
    return [
        "--config.data.name=csv",
        f"--config.data.train_annotations={tmp / 'train.csv'}",
        f"--config.data.test_annotations={tmp / 'test.csv'}",
    ]


def _trained_config(workdir):
    # What a training run saves first: config.json (eval and predict start from it).
    c = default.get_config()
    c.data.image_size, c.data.resize_size = 32, 36
    configuration.save_config(str(workdir), c)
    return workdir


def _cases(tmp, data_root):
    """(name, argv, extra environment, words the message must hold)."""
    data = f"--config.data.root={data_root}"
    work = f"--workdir={tmp / 'run'}"
    cases = []

    def add(name, args, words, env=None, may_succeed=False, tiny=True, absent=()):
        # Every case in its own workdir: the cases run side by side.
        own = f"--workdir={tmp / 'runs' / name.replace(' ', '_')}"
        args = [own if a == work else a for a in args]
        words = [*words, *(f"!{w}" for w in absent)]  # '!word': must not appear
        cases.append((name, [*(TINY if tiny else TINY[:1]), *args], env or {}, words, may_succeed))

    (tmp / "file").write_text("a file, not a folder")
    add("workdir is a file", [data, f"--workdir={tmp / 'file'}"], [str(tmp / "file")])
    add("empty workdir", [data, "--workdir="], ["--workdir is empty"])
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        add("read-only workdir", [data, f"--workdir={ro}"], [str(ro), "ermission denied"])
    add(
        "unwritable HOME",
        [data, work, "--mode=plan"],
        [],
        env={"HOME": str(tmp / "no" / "home")},
        may_succeed=True,  # nothing needs HOME: then it simply works
    )

    # A corrupt data cache: a truncated or deleted tfrecord of the built-in data.
    for how in ("truncated", "deleted"):
        root = tmp / f"cache_{how}"
        shutil.copytree(data_root, root, ignore=shutil.ignore_patterns("*.lock"))
        (record,) = root.glob("synthetic_lt/target_32/*/synthetic_lt-train.tfrecord*")
        if how == "deleted":
            record.unlink()
        else:
            record.write_bytes(record.read_bytes()[:5000])
        add(
            f"{how} data cache",
            [f"--config.data.root={root}", work, "--mode=plan"],
            ["synthetic_lt", "delete", "regenerate"],
        )

    add("image_size below 16", [data, work, "--config.data.image_size=8"], ["image_size"])
    add("negative crop_padding", [data, work, "--config.data.crop_padding=-1"], ["crop_padding"])
    add(
        "unknown backbone",
        [f"--config.data.root={tmp / 'unread'}", work, "--config.model.backbone=resnet51"],
        ["resnet51", "resnet50"],
    )
    wrong_shape = tmp / "wrong_shape.npy"
    np.save(wrong_shape, np.ones((3, 8), np.float32))
    text = tmp / "embeddings.txt"
    text.write_text("cat 0.1 0.2\ndog 0.3 0.4\n")
    for name, path, words in (
        ("text embeddings of the wrong shape", wrong_shape, [str(wrong_shape), "20"]),
        ("a text file as text embeddings", text, [str(text), "not a .npy"]),
    ):
        add(
            name,
            [
                data,
                work,
                "--config.model.classifier=text",
                f"--config.model.text_embeddings={path}",
            ],
            words,
            absent=("pickled",),  # what a text file used to be called
        )
    add("batch too large", [data, work, "--config.train.batch_size=1000000000"], ["batch_size"])
    add(
        "warm-up as long as the run",
        [data, work, "--config.loss.warmup_epochs=2"],
        ["warmup_epochs"],
    )

    # The user's own CSV data.
    add(
        "empty train file",
        [*_csv_case(tmp / "empty_train", "", "0.png,cat\n"), work],
        ["empty_train/train.csv", "no images"],
    )
    add(
        "empty test file",
        [*_csv_case(tmp / "empty_test", "0.png,cat\n", "image,labels\n"), work],
        ["empty_test/test.csv", "no images"],
    )
    add(
        "class only in the test split",
        [*_csv_case(tmp / "test_class", "0.png,cat\n", "1.png,dog\n"), work],
        ["dog"],
    )
    add(
        "Latin-1 CSV",
        [*_csv_case(tmp / "latin1", "0.png,caf\xe9\n".encode("latin-1"), "1.png,cat\n"), work],
        ["latin1/train.csv", "UTF-8"],
    )
    full = _png(tmp / "ok.png", (32, 32)).read_bytes()
    buffer = tmp / "image.tif"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer)
    for name, content in (
        ("0-byte image", b""),
        ("text named .png", b"just text"),
        ("truncated image", full[: len(full) // 2]),
        ("TIFF image", buffer.read_bytes()),
    ):
        folder = tmp / name.replace(" ", "_").replace(".", "")
        rows = "0.png,cat\n1.png,cat\nbad.png,cat\n"
        add(
            name,
            [*_csv_case(folder, rows, "2.png,cat\n", {"bad.png": content}), work],
            ["bad.png"],
        )

    # A trained workdir's saved config, and eval / predict on it.
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"config": {')
    add(
        "corrupt config.json",
        [data, f"--workdir={corrupt}", "--mode=eval"],
        [str(corrupt / "config.json")],
    )
    trained = _trained_config(tmp / "trained")
    add(
        "predict without inputs",
        [f"--workdir={trained}", "--mode=predict"],
        ["--config.predict.inputs"],
        tiny=False,  # eval and predict take the saved config
    )
    add(
        "eval override contradicting the saved config",
        [data, f"--workdir={trained}", "--mode=eval", "--config.model.proj_dim=8"],
        ["--config.model.proj_dim=8, trained with 20"],
        tiny=False,
    )
    garbage = tmp / "weights.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    add(
        "garbage .safetensors",
        [data, work, f"--config.model.pretrained={garbage}"],
        [str(garbage), "config.model.pretrained"],
    )

    # The machine.
    add(
        "multihost without a coordinator",
        [data, work, "--multihost"],
        ["multihost"],
        env={"JAX_COORDINATOR_ADDRESS": ""},  # its own process: it starts JAX's distributed mode
    )
    add(
        "JAX_PLATFORMS=gpu without a GPU",
        [data, work],
        ["JAX_PLATFORMS=gpu"],
        env={"JAX_PLATFORMS": "gpu"},
        absent=("rocm",),
    )
    return cases


# Runs cases one after another in one process, as run.py would (its main, its exit): the
# program's start-up (JAX, TensorFlow) is paid once instead of once per case. What each case
# writes to stderr (the file descriptor: native code too) goes to its own file, and an
# exception that escapes main is printed with its traceback, as the interpreter would.
_DRIVER = """
import json, os, sys, traceback
from absl import flags
from mlcnc_jax import cli

for case in json.load(open(sys.argv[1])):
    sys.stderr.flush()
    saved = os.dup(2)
    with open(case["stderr"], "w") as out:
        os.dup2(out.fileno(), 2)
    code = 0
    try:
        cli.main(["run.py", *case["argv"]])
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            code = 1
        else:
            code = e.code or 0
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    with open(case["stderr"] + ".code", "w") as f:
        f.write(str(code))
    # config_flags defines a flag per --config.FIELD override while parsing: forget them.
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
"""


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _run_together(cases, tmp):
    """Runs the cases without their own environment in one run.py-like process."""
    import json
    import subprocess
    import sys

    from test_cli import ROOT

    listing = []
    for i, (_, argv, _, _, _) in enumerate(cases):
        listing.append({"argv": argv, "stderr": str(tmp / f"case_{i}.stderr")})
    (tmp / "cases.json").write_text(json.dumps(listing))
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(tmp / "cases.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = []
    for entry in listing:
        code = int(open(entry["stderr"] + ".code").read())
        results.append(_Result(code, open(entry["stderr"]).read()))
    return results


def test_every_bad_input_ends_in_one_message(tmp_path, data_root):
    # The built-in data at 32 px, made once per session: the cache cases copy and damage it.
    from test_train import tiny_config

    from mlcnc_jax.data import sources

    sources.load_dataset(tiny_config(data_root))
    cases = _cases(tmp_path, data_root)
    # Cases with an environment of their own run as run.py processes; the others together.
    alone = [c for c in cases if c[2]]
    together = [c for c in cases if not c[2]]
    results = dict(zip([c[0] for c in together], _run_together(together, tmp_path)))
    for name, argv, env, _, _ in alone:
        results[name] = run_py(*argv, env=env, timeout=300)
    failures = []
    for name, _, _, words, may_succeed in cases:
        result = results[name]
        errors = [line for line in result.stderr.splitlines() if "run.py: error:" in line]
        problems = []
        if may_succeed and result.returncode == 0:
            errors = ["fine"]
        elif result.returncode != 1:
            problems.append(f"exit code {result.returncode}")
        if "Traceback" in result.stderr:
            problems.append("a traceback")
        if len(errors) != 1:
            problems.append(f"{len(errors)} 'run.py: error:' lines")
        missing = [w for w in words if w[:1] != "!" and w not in result.stderr]
        if missing:
            problems.append(f"no {missing} in the message")
        unwanted = [w[1:] for w in words if w[:1] == "!" and w[1:] in result.stderr]
        if unwanted:
            problems.append(f"{unwanted} in the message")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n{result.stderr[-1500:]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n\n".join(failures)
