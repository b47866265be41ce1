"""The model zoo: the small classifiers the papers compress (the test bed; user models come
from their own factories, ``moecomp.factories``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moecomp.errors import ConfigError


class MLP(nn.Module):
    """Digits MLP: 64 -> 128 -> 64 -> 10 (ReLU). Input (n, 64) or anything that flattens to it."""

    def __init__(self, n_in: int = 64, hidden: tuple[int, ...] = (128, 64),
                 n_out: int = 10) -> None:
        super().__init__()
        sizes = (n_in, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:],
                                                                     strict=False))
        self.out = nn.Linear(sizes[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


class LeNet300(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998; Han et al. 2016): 784 -> 300 -> 100 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe and Deep Compression: conv 20@5x5, conv 50@5x5, fc 500, fc 10.

    Input (n, 1, 28, 28); 431k parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(self.conv1(x), 2)
        x = torch.max_pool2d(self.conv2(x), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


ZOO: dict[str, Callable[[], nn.Module]] = {
    "mlp-digits": MLP,
    "lenet300": LeNet300,
    "lenet5": LeNet5,
}


def build_model(name: str) -> nn.Module:
    """A fresh (untrained) zoo model by name."""
    try:
        return ZOO[name]()
    except KeyError:
        raise ConfigError("model.zoo", f"unknown model {name!r}; allowed: {', '.join(ZOO)}")\
            from None
