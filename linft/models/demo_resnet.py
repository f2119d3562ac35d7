"""``demo-resnet``: the demo's small torchvision-style ResNet, and the file of its pretrained weights.

:class:`DemoResNet` is built from torchvision's own ``Bottleneck`` blocks, with
the attribute names and ``forward`` of torchvision's ``ResNet`` (``conv1 bn1
relu maxpool layer1..layer4 avgpool fc``), a quarter of ResNet-50's widths
(planes 16/32/64/128, 512-d penultimate), layers ``[1, 1, 2, 3]`` (three blocks
in the last stage, like ResNet-50) and a light stem for 64 px images. The
extraction and fine-tuning code treats it exactly like a torchvision
ResNet-50: its φ blocks are ``layer4.0, layer4.1, layer4.2``.

The module registers the architecture under ``demo-resnet`` with the shipped
weights (:data:`SHIPPED_CHECKPOINT`, made by :func:`linft.train.pretrain.pretrain`;
its metadata hold the exact command) as its default.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from linft.errors import LinftError
from linft.models.registry import register_backbone

#: The checkpoint shipped inside the package; ``load_backbone("demo-resnet")`` loads it.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "demo_resnet.pt"


class DemoResNet(nn.Module):
    """A small torchvision-style Bottleneck ResNet (ResNet-50's block structure, reduced widths).

    Same attribute names and ``forward`` as ``torchvision.models.ResNet``. The
    stem is a 5x5 stride-2 convolution and a 3x3 stride-2 max-pool, so a 64 px
    image reaches ``layer1`` at 16x16 and ``layer4`` at 2x2 (ResNet-50 at 224 px:
    56x56 and 7x7). Initialisation is torchvision's (Kaiming normal, fan-out,
    for convolutions; BatchNorm weight 1, bias 0).
    """

    def __init__(self, num_classes: int = 1000, layers=(1, 1, 2, 3), widths=(16, 32, 64, 128),
                 zero_init_residual: bool = False):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise LinftError("DemoResNet needs 4 stages: pass 4 block counts and 4 widths")
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * Bottleneck.expansion, num_classes)

        # torchvision's ResNet initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        # torchvision.models.resnet.ResNet._make_layer for Bottleneck, without dilation or groups
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


def demo_resnet(num_classes: int = 1000, zero_init_residual: bool = False) -> DemoResNet:
    """The ``demo-resnet`` backbone: layers [1, 1, 2, 3], widths 16/32/64/128, 512-d penultimate."""
    return DemoResNet(num_classes=num_classes, zero_init_residual=zero_init_residual)


register_backbone("demo-resnet", demo_resnet, str(SHIPPED_CHECKPOINT))
