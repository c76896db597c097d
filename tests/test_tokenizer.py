"""CLIP's tokenizer (mlcnc_jax/models/tokenizer.py) against open_clip's on a few hundred strings."""

import gzip

import numpy as np
import pytest
import torch_extras

from mlcnc_jax.data.voc import VOC_CLASSES
from mlcnc_jax.models import tokenizer

COCO_CLASSES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,"
    "stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,"
    "backpack,umbrella,handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,"
    "baseball bat,baseball glove,skateboard,surfboard,tennis racket,bottle,wine glass,cup,fork,"
    "knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,"
    "chair,couch,potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,keyboard,"
    "cell phone,microwave,oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,"
    "hair drier,toothbrush"
).split(",")
TEMPLATES = ("a photo of a {}.", "a bad photo of the {}!", "itap of my {}", "A PHOTO OF {}s?")
OTHERS = [
    "",
    "   leading and trailing   ",
    "tabs\tand\nnew\r\nlines",
    "it's we'll they'd I'm you've she's don't",
    "IT'S WE'LL THEY'D",
    "punctuation!!! ... ??? ;:,- (brackets) [x] {y} <z> @#$%^&*_+=~`|\\/",
    "numbers 0 12 345 6789 3.14 1,000,000 2nd 21st",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp;",
    "<b>bold</b> &amp; tags",
    "café naïve résumé Zürich's façade",
    "e\u0301 combining (NFC) and A\u030a",
    "“curly double” ‘curly single’ ‚low‛ „low double‟ ʼmodifier",
    "ﬁsh ﬂower ﬀ ﬃ ﬄ ﬆ ĳ Ĳ ǆ ǅ Ǳ",
    "ＦＵＬＬ　ｗｉｄｔｈ　１２３！ ｶﾀｶﾅ",
    "東京タワー 北京 서울 Москва Αθήνα القاهرة मुंबई",
    "emoji 🐶 🐱🚗 ✈️ 👍🏽",
    "½ ² ³ Ⅷ ⅷ ① ٣ ३",
    "\u00a0non\u00a0breaking\u2009thin\u3000ideographic",
    "control\x00\x07chars\x7f\ufeffbom\u200bzwsp",
    "\x1b[31mred\x1b[0m terminal",
    "ß ẞ İstanbul ǰ ŉ",
    "a" * 300,
    " ".join(["word"] * 100),
    "hyphen-ated snake_case CamelCase dot.ted slash/ed",
    "<start_of_text>inside<end_of_text>",
]


def _strings():
    names = [*COCO_CLASSES, *VOC_CLASSES]
    prompts = [t.format(n) for n in names[::2] for t in TEMPLATES]
    return [*names, *prompts, *OTHERS]


def test_strings_are_a_few_hundred():
    assert len(_strings()) >= 300


def test_token_ids_equal_open_clips():
    ref = torch_extras.open_clip().tokenizer.SimpleTokenizer()
    mine = tokenizer.ClipTokenizer()
    strings = _strings()
    got = mine(strings)
    want = ref(strings).numpy()
    bad = [s for s, a, b in zip(strings, got, want) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} of {len(strings)} differ, e.g. {bad[:3]}"
    assert got.dtype == np.int32 and got.shape == (len(strings), 77)
    assert mine.vocab_size == len(ref.encoder) == 49408
    assert (mine.start_token, mine.end_token) == (ref.sot_token_id, ref.eot_token_id)


def test_layout_start_end_truncation_and_decode():
    tok = tokenizer.ClipTokenizer()
    ids = tok(["a photo of a dog.", "x " * 200])
    n = int(np.argmax(ids[0]))  # the end token is the largest id
    assert ids[0, 0] == tok.start_token == 49406 and ids[0, n] == tok.end_token == 49407
    assert (ids[0, n + 1 :] == 0).all()
    assert tok.decode(ids[0, 1:n]) == "a photo of a dog ."
    # Cut to the context with the end token last.
    assert ids[1, -1] == tok.end_token and (ids[1] > 0).all()
    assert tokenizer.tokenize("Dog", context_length=5).tolist() == [[49406, 1929, 49407, 0, 0]]
    assert tokenizer.clean("  ＤＯＧ’s\u00a0“bed”  ") == 'dog\'s "bed"'


def test_bpe_merges_in_rank_order(tmp_path):
    # A vocabulary of three merges: 'l o' (rank 0), 'lo w</w>' (rank 1), 'o w</w>' (rank 2).
    # By rank, 'low' is 'l o' then 'lo w</w>': one token; merging 'o w</w>' first (a wrong
    # order) would leave 'l' and 'ow</w>'.
    path = tmp_path / "vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: test\nl o\nlo w</w>\no w</w>\n")
    tok = tokenizer.ClipTokenizer(str(path))
    assert [tok.decoder[i] for i in tok.encode("low")] == ["low</w>"]
    assert [tok.decoder[i] for i in tok.encode("ow lo")] == ["ow</w>", "l", "o</w>"]
    with pytest.raises(FileNotFoundError, match="ships with the package"):
        tokenizer.ClipTokenizer(str(tmp_path / "none.txt.gz"))
