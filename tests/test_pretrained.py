"""Tests of the torchvision -> Flax weight conversion against a PyTorch forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcnc_jax.models.mlcnc import MLCNC
from mlcnc_jax.models.pretrained import (
    convert_torchvision_resnet,
    load_pretrained_backbone,
    load_state_dict,
)
from mlcnc_jax.models.resnet import ResNet, get_backbone

torch = pytest.importorskip("torch")
nn = torch.nn
safetensors_torch = pytest.importorskip("safetensors.torch")


# Minimal torchvision-equivalent ResNet (same module names, so the same state-dict keys).
class TorchBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    def __init__(self, block, layers, widths=(64, 128, 256, 512), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(inplanes, w, 2 if (i > 0 and j == 0) else 1))
                inplanes = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.fc = nn.Linear(inplanes, num_classes)  # present in the file, ignored by the loader

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x  # [B, C, H, W]


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
                module.bias.copy_(0.2 * torch.randn(c, generator=g))
                module.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                module.running_var.copy_(0.5 + torch.rand(c, generator=g))
                module.num_batches_tracked.fill_(7)
    return model.eval()


def _compare(torch_model, flax_model, tmp_path, size):
    path = tmp_path / "weights.safetensors"
    state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
    safetensors_torch.save_file(state, str(path))
    variables = convert_torchvision_resnet(load_state_dict(str(path)))

    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(x)).numpy()  # [B, C, H, W]
    tokens = flax_model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)
    b, c, h, w = ref.shape
    got = np.asarray(tokens).reshape(b, h, w, c).transpose(0, 3, 1, 2)
    assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero maps
    assert np.abs(got - ref).max() < 1e-4


def test_resnet18_matches_torch(tmp_path):
    torch.manual_seed(0)
    torch_model = _randomise(TorchResNet(TorchBasicBlock, [2, 2, 2, 2]), 1)
    _compare(torch_model, get_backbone("resnet18"), tmp_path, 64)


def test_bottleneck_resnet_matches_torch(tmp_path):
    torch.manual_seed(0)
    widths = (8, 16, 16, 32)
    torch_model = _randomise(TorchResNet(TorchBottleneck, [2, 1, 2, 1], widths), 2)
    flax_model = ResNet(stage_sizes=(2, 1, 2, 1), block="bottleneck", widths=widths)
    _compare(torch_model, flax_model, tmp_path, 64)


def _tiny_mlcnc(backbone):
    return MLCNC(backbone=backbone, num_classes=3, embed_dim=16, proj_dim=4, num_heads=2)


def _abstract_init(model, size=32):
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def test_load_into_model_replaces_only_the_backbone(tmp_path):
    widths = (4, 8)
    torch_model = _randomise(TorchResNet(TorchBasicBlock, [1, 1], widths), 3)
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": torch_model.state_dict()}, str(path))  # wrapped, as many .pth files

    model = _tiny_mlcnc(ResNet(stage_sizes=(1, 1), widths=widths))
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    loaded = load_pretrained_backbone(str(path), variables)

    sd = torch_model.state_dict()
    np.testing.assert_array_equal(
        loaded["params"]["backbone"]["layer2_0"]["conv1"]["kernel"],
        sd["layer2.0.conv1.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        loaded["batch_stats"]["backbone"]["layer2_0"]["downsample_1"]["var"],
        sd["layer2.0.downsample.1.running_var"].numpy(),
    )
    np.testing.assert_array_equal(
        loaded["params"]["backbone"]["bn1"]["scale"], sd["bn1.weight"].numpy()
    )
    for name in ("token_embed", "proj_kernel", "logit_scale"):
        np.testing.assert_array_equal(loaded["params"][name], variables["params"][name])
    np.testing.assert_array_equal(
        loaded["etf"]["label_embedding"], variables["etf"]["label_embedding"]
    )
    # The input is not modified.
    assert not np.array_equal(
        variables["params"]["backbone"]["bn1"]["scale"], sd["bn1.weight"].numpy()
    )
    model.apply(loaded, x, train=False)  # the result is usable as is


def test_missing_file_names_the_path(tmp_path):
    model = _tiny_mlcnc(ResNet(stage_sizes=(1,), widths=(4,)))
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_pretrained_backbone(str(missing), _abstract_init(model))


def test_wrong_architecture_names_the_path_and_mismatches(tmp_path):
    torch_model = TorchResNet(TorchBasicBlock, [2, 2, 2, 2])  # resnet18 weights
    path = tmp_path / "resnet18.safetensors"
    safetensors_torch.save_file(dict(torch_model.state_dict()), str(path))
    variables = _abstract_init(_tiny_mlcnc(get_backbone("resnet50")), 64)
    with pytest.raises(ValueError) as err:
        load_pretrained_backbone(str(path), variables)
    message = str(err.value)
    assert str(path) in message
    assert "missing in file" in message and "conv3" in message  # bottleneck convs
    assert "shape mismatch" in message
    assert "config.model.backbone" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.safetensors, \.pth or \.pt"):
        load_state_dict(str(path))
