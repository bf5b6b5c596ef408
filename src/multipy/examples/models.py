"""Model definitions for the torch::deploy example archives.

This module is *interned* into every example archive, i.e. its source is
copied into the ``.pt`` file, so an archive loads without ``multipy``
installed.  Keep it self-contained: it may import only ``torch`` and the
standard library (both are externed implicitly by ``torch.package``).

Example:
    >>> import torch
    >>> from multipy.examples.models import Simple
    >>> Simple(2, 3)(torch.zeros(2, 3)).shape
    torch.Size([2, 3])
"""

import torch
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "BatchedModel",
    "Identity",
    "LeafFx",
    "MultiReturn",
    "ResNet",
    "Simple",
    "SmallOps",
    "UsesCuda",
    "UsesDistributed",
    "leaf_fn",
    "resnet18",
]


class Simple(torch.nn.Module):
    """Adds a learned ``(n, m)`` weight to its input.

    Example:
        >>> Simple(2, 2)(torch.zeros(2, 2)).shape
        torch.Size([2, 2])
    """

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, m))

    def forward(self, input: Tensor) -> Tensor:
        return self.weight + input


# ---------------------------------------------------------------- ResNet-18


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision layout)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet built from :class:`BasicBlock` stages (no torchvision needed).

    Example:
        >>> ResNet([1, 1, 1, 1], num_classes=10).eval()(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """Return a randomly initialised ResNet-18 (``BasicBlock``, ``[2, 2, 2, 2]``).

    Example:
        >>> sum(p.numel() for p in resnet18().parameters())
        11689512
    """
    return ResNet([2, 2, 2, 2], num_classes=num_classes)


# ------------------------------------------------------------ small examples


class MultiReturn(nn.Module):
    """Returns a nested tuple; never mutates its input.

    Example:
        >>> a, (b, c) = MultiReturn()(torch.ones(2))
        >>> a.tolist(), b.tolist(), c.tolist()
        ([2.0, 2.0], [2.0, 2.0], [0.0, 0.0])
    """

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        masked = x.clone()
        masked.masked_fill_(masked > 0.5, 0)
        return x + 1, (x * 2, masked)


class BatchedModel(nn.Module):
    """Adds two tensors; exposes extra batching methods for the runtime.

    Example:
        >>> m = BatchedModel()
        >>> pairs = [(torch.ones(1), torch.ones(1))] * 3
        >>> [len(b) for b in m.make_batch(pairs, {"max_bs": "2"})]
        [2, 1]
    """

    def forward(self, i1: Tensor, i2: Tensor) -> Tensor:
        return i1 + i2

    def make_prediction(self, input: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Run :meth:`forward` on every ``(i1, i2)`` pair."""
        return [self.forward(a, b) for a, b in input]

    def make_batch(
        self, mega_batch: list[tuple[Tensor, Tensor]], goals: dict[str, str]
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Split ``mega_batch`` into chunks of at most ``int(goals["max_bs"])``."""
        size = int(goals["max_bs"])
        if size < 1:
            raise ValueError(f"goals['max_bs'] must be >= 1, got {size}")
        return [mega_batch[i : i + size] for i in range(0, len(mega_batch), size)]


@torch.fx.wrap
def leaf_fn(x: Tensor) -> Tensor:
    """A function ``torch.fx`` keeps as a single opaque call (a leaf)."""
    return torch.sigmoid(x) * 2 + 1


class LeafFx(nn.Module):
    """Calls :func:`leaf_fn`; symbolic-trace it to get the ``simple_leaf_fx`` model."""

    def forward(self, x: Tensor) -> Tensor:
        return leaf_fn(x) - x


class UsesDistributed(nn.Module):
    """Identity that requires ``torch.distributed`` in the interpreter."""

    def forward(self, x: Tensor) -> Tensor:
        assert torch.distributed.is_available(), "torch.distributed is unavailable"
        return x


class UsesCuda(nn.Module):
    """Moves its input to the GPU; fails where CUDA is unavailable."""

    def forward(self, x: Tensor) -> Tensor:
        assert torch.cuda.is_available(), "CUDA is unavailable"
        return x.cuda() + 1


class SmallOps(nn.Module):
    """Many tiny residual ``Linear`` layers: stresses per-op overhead.

    Example:
        >>> SmallOps(n_layers=2, width=4)(torch.zeros(1, 4)).shape
        torch.Size([1, 4])
    """

    def __init__(self, n_layers: int = 40, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x)) + x
        return x


class Identity(nn.Module):
    """Returns its input unchanged: measures pure dispatch overhead."""

    def forward(self, x: Tensor) -> Tensor:
        return x
