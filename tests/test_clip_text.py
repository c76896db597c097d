"""CLIP's text tower in Flax against PyTorch references on random weights, in both key layouts.

References: a text tower written here from CLIP's architecture (torch's MultiheadAttention
with CLIP's additive causal mask), and open_clip's own `CLIP` (OpenAI's key layout) and
`CustomTextCLIP` (the tower under `text.`, a Linear projection with a bias).
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_extras

from mlcnc_jax.models import clip_text, tokenizer
from mlcnc_jax.models.clip_text import ClipTextArch, CLIPTextTransformer

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width, heads, act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = nn.Sequential(
            collections.OrderedDict(
                c_fc=nn.Linear(width, 4 * width),
                gelu=QuickGELU() if act == "quick_gelu" else nn.GELU(),
                c_proj=nn.Linear(4 * width, width),
            )
        )

    def forward(self, x, mask):  # x [L, B, C]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, act):
        super().__init__()
        self.resblocks = nn.ModuleList([Block(width, heads, act) for _ in range(layers)])


class TorchText(nn.Module):
    """CLIP's encode_text: embeddings, causal blocks, ln_final, EOT feature @ projection."""

    def __init__(self, vocab, context, width, layers, heads, out, act="quick_gelu", linear=False):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.transformer = Transformer(width, layers, heads, act)
        self.ln_final = nn.LayerNorm(width, eps=1e-5)
        if linear:  # open_clip's proj_type='linear' with proj_bias
            self.text_projection = nn.Linear(width, out)
        else:
            self.text_projection = nn.Parameter(torch.empty(width, out))
        # CLIP's mask: -inf above the diagonal, so token i sees tokens 0..i.
        self.register_buffer(
            "attn_mask", torch.full((context, context), float("-inf")).triu_(1), persistent=False
        )

    def forward(self, text):
        n = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:n]
        x = x.permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask[:n, :n])
        x = self.ln_final(x.permute(1, 0, 2))
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


def _randomize(model, seed):
    # Every parameter random (LayerNorm affine and biases too), so that a swapped or dropped
    # one changes the output; scales keep activations O(1).
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias") or name == "logit_scale":
                p.copy_(0.2 * r)
            elif name.endswith(("positional_embedding", "token_embedding.weight")):
                p.copy_(0.5 * r)
            elif name.endswith("text_projection"):
                p.copy_(p.shape[0] ** -0.5 * r)
            else:
                p.copy_(p[0].numel() ** -0.5 * r)
    return model.eval()


def _tokens(vocab, context, rows=5, seed=0):
    # Start token, random ids, the end token (the largest id) at varied places, zeros after;
    # the last row fills the whole context.
    rng = np.random.default_rng(seed)
    out = np.zeros((rows, context), np.int64)
    for r in range(rows):
        n = context if r == rows - 1 else int(rng.integers(2, context))
        out[r, 0] = vocab - 2
        out[r, 1 : n - 1] = rng.integers(1, vocab - 2, n - 2)
        out[r, n - 1] = vocab - 1
    return out


def _embed(arch, params, tokens, activation="quick_gelu"):
    module = CLIPTextTransformer(arch, activation=activation)
    run = jax.jit(lambda p, t: module.apply({"params": p}, t))
    return np.asarray(run(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens, jnp.int32)))


def _reference(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).numpy()


# (vocab, context, width, layers, heads = width / 64, output): output = width in the second,
# so that a transposed projection gives wrong numbers rather than a shape error.
SMALL = (60, 12, 128, 2, 2, 48)
SQUARE = (60, 12, 64, 2, 1, 64)


@pytest.mark.parametrize("case", [SMALL, SQUARE], ids=["heads2", "square_proj"])
def test_openai_layout_matches_torch(case, tmp_path):
    model = _randomize(TorchText(*case), seed=0)
    # A whole CLIP file: visual keys (their 'transformer.*' must not be mistaken for the
    # text tower's), logit_scale, and the text tower at the top level as OpenAI saves it.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(48, 16)
    state["visual.conv1.weight"] = torch.randn(16, 3, 4, 4)
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "clip.safetensors"
    safetensors_torch.save_file(state, str(path))
    arch, params = clip_text.load_clip_text(str(path))
    vocab, context, width, layers, heads, out = case
    assert arch == ClipTextArch(vocab, context, width, layers, heads, 4 * width, out)
    tokens = _tokens(vocab, context)
    ref = _reference(model, tokens)
    got = _embed(arch, params, tokens)
    assert np.abs(ref).max() > 0.3
    diff = float(np.abs(got - ref).max())
    print(f"openai layout {case}: max |diff| {diff:.2e}")
    assert diff < 1e-4
    # Fewer tokens than the context (the positional embedding's first rows), as CLIP allows.
    short = tokens[:2, :8].copy()
    short[:, -1] = vocab - 1
    np.testing.assert_allclose(_embed(arch, params, short), _reference(model, short), atol=1e-4)


def test_open_clip_text_layout_with_a_linear_projection_and_gelu(tmp_path):
    vocab, context, width, layers, heads, out = SMALL
    model = _randomize(TorchText(*SMALL, act="gelu", linear=True), seed=1)
    state = {f"text.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state["visual.conv1.weight"] = torch.randn(16, 3, 4, 4)
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "model.pth"  # a pickled state dict, wrapped, DataParallel prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, str(path))
    arch, params = clip_text.load_clip_text(str(path))
    assert arch.proj_bias and arch.output_dim == out
    tokens = _tokens(vocab, context, seed=1)
    diff = float(np.abs(_embed(arch, params, tokens, "gelu") - _reference(model, tokens)).max())
    print(f"open_clip text.* layout: max |diff| {diff:.2e}")
    assert diff < 1e-4
    # The activation is the image encoder's: QuickGELU would be another function.
    assert (
        np.abs(_embed(arch, params, tokens, "quick_gelu") - _reference(model, tokens)).max() > 1e-3
    )


def _open_clip_models():
    oc = torch_extras.open_clip()
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=1, width=64, head_width=64, patch_size=8, image_size=16)
    text = {"context_length": 12, "vocab_size": 60, "width": 128, "heads": 2, "layers": 2}
    return {
        "CLIP": oc.model.CLIP(48, vision, CLIPTextCfg(**text), quick_gelu=True),
        "CustomTextCLIP": oc.model.CustomTextCLIP(
            48, vision, CLIPTextCfg(**text, proj_type="linear", proj_bias=True)
        ),
    }


@pytest.mark.parametrize("kind", ["CLIP", "CustomTextCLIP"])
def test_open_clip_models_encode_text_as_the_flax_tower(kind, tmp_path):
    model = _randomize(_open_clip_models()[kind], seed=2)
    path = tmp_path / "open_clip_model.safetensors"
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path)
    )
    arch, params = clip_text.load_clip_text(str(path))
    tokens = _tokens(60, 12, seed=2)
    with torch.no_grad():
        ref = model.encode_text(torch.from_numpy(tokens)).numpy()
    activation = "quick_gelu" if kind == "CLIP" else "gelu"
    diff = float(np.abs(_embed(arch, params, tokens, activation) - ref).max())
    print(f"open_clip {kind}: max |diff| {diff:.2e}")
    assert diff < 1e-4


def test_class_embeddings_average_the_normalised_prompts(tmp_path):
    # The real tokenizer: the tower's vocabulary is CLIP's 49,408 tokens.
    case = (49408, 77, 64, 1, 1, 32)
    model = _randomize(TorchText(*case), seed=3)
    path = tmp_path / "clip.safetensors"
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path)
    )
    names, templates = ["dog", "traffic_light", "tv monitor"], ["a photo of a {}.", "itap of {}"]
    got = clip_text.class_embeddings(str(path), names, templates, "quick_gelu")
    prompts = [t.format(n.replace("_", " ")) for n in names for t in templates]
    ref = _reference(model, tokenizer.tokenize(prompts).astype(np.int64)).astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ref = ref.reshape(3, 2, -1).mean(1)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="each with '{}'"):
        clip_text.class_embeddings(str(path), names, ["a photo"], "quick_gelu")


def test_files_without_a_usable_text_tower_say_so(tmp_path):
    visual_only = tmp_path / "visual.safetensors"
    safetensors_torch.save_file({"conv1.weight": torch.randn(8, 3, 4, 4)}, str(visual_only))
    with pytest.raises(ValueError, match="holds no CLIP text tower.*whole CLIP model"):
        clip_text.load_clip_text(str(visual_only))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        clip_text.load_clip_text(str(tmp_path / "missing.safetensors"))
    model = TorchText(*SMALL)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["transformer.resblocks.0.ls_1.gamma"] = torch.ones(128)  # open_clip's layer scale
    odd = tmp_path / "layer_scale.safetensors"
    safetensors_torch.save_file(state, str(odd))
    with pytest.raises(ValueError, match="not part of a CLIP text tower.*ls_1.gamma"):
        clip_text.load_clip_text(str(odd))
