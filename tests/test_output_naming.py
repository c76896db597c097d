"""Output names of per-input files never collide."""

from mlcnc_jax.output_naming import output_names


def test_unique_stems_stay_plain():
    assert output_names(["img/cat.jpg", "img/dog.png"]) == {
        "img/cat.jpg": "cat.png",
        "img/dog.png": "dog.png",
    }


def test_same_stem_other_extension():
    names = output_names(["x/one.png", "x/one.jpg", "x/two.jpg"])
    assert names == {"x/one.png": "one_png.png", "x/one.jpg": "one_jpg.png", "x/two.jpg": "two.png"}


def test_same_name_in_other_folders():
    names = output_names(["/d/a/x.jpg", "/d/b/x.jpg", "/d/b/y.jpg"])
    assert names == {
        "/d/a/x.jpg": "a_x_jpg.png",
        "/d/b/x.jpg": "b_x_jpg.png",
        "/d/b/y.jpg": "y.png",
    }


def test_case_and_second_round_clashes():
    # 'One.PNG' and 'one.png' are one file on case-insensitive disks; a bumped name may meet
    # another input's plain stem ('one_png').
    paths = ["/p/One.PNG", "/q/one.png", "/q/one.jpg", "/q/one_png.gif"]
    names = output_names(paths)
    assert len({n.casefold() for n in names.values()}) == len(paths)
    assert names["/q/one.jpg"] == "one_jpg.png"


def test_many_random_paths_never_collide():
    import random

    rng = random.Random(0)
    paths = {
        "/"
        + "/".join(rng.choice("ab") for _ in range(rng.randint(0, 3)))
        + f"/{rng.choice(['x', 'X', 'y', 'x_jpg'])}.{rng.choice(['jpg', 'png', 'JPG'])}"
        for _ in range(300)
    }
    names = output_names(sorted(paths), extension=".npz")
    assert len({n.casefold() for n in names.values()}) == len(paths)
    assert all(n.endswith(".npz") and "/" not in n for n in names.values())
