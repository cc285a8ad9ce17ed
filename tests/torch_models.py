"""PyTorch-side models of the tests, written here (torchvision is not a dependency).

A ResNet-18 with torchvision's module names and the dataset-distillation ConvNet (DC/DM), what
`wmdd_jax.interop` converts from and to. Import only after ``pytest.importorskip("torch")``.
"""

import torch

tnn = torch.nn


class TorchBasicBlock(tnn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.relu = tnn.ReLU()
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18(tnn.Module):
    """torchvision's resnet18 module tree; ``stem`` as in our ResNet."""

    def __init__(self, num_classes, stem="imagenet", channels=3):
        super().__init__()
        k, s, p, pool = {"imagenet": (7, 2, 3, True), "small": (3, 1, 1, False), "tiny": (3, 2, 3, False)}[stem]
        self.conv1 = tnn.Conv2d(channels, 64, k, s, p, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.relu = tnn.ReLU()
        self.maxpool = tnn.MaxPool2d(3, 2, 1) if pool else tnn.Identity()
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", tnn.Sequential(TorchBasicBlock(cin, cout, stride),
                                                          TorchBasicBlock(cout, cout, 1)))
            cin = cout
        self.avgpool = tnn.AdaptiveAvgPool2d(1)
        self.fc = tnn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TorchConvNet(tnn.Module):
    """The DC/DM ConvNet: [conv, norm, relu, avgpool] x depth, a Linear on the flattened NCHW map."""

    def __init__(self, channels, num_classes, width, depth, norm, im_size):
        super().__init__()
        layers, cin = [], channels
        h, w = (32, 32) if im_size[0] == 28 else im_size
        for d in range(depth):
            layers.append(tnn.Conv2d(cin, width, 3, padding=3 if channels == 1 and d == 0 else 1))
            if norm == "instance":
                layers.append(tnn.GroupNorm(width, width, affine=True))
            elif norm == "batch":
                layers.append(tnn.BatchNorm2d(width))
            layers += [tnn.ReLU(inplace=True), tnn.AvgPool2d(2, 2)]
            cin, h, w = width, h // 2, w // 2
        self.features = tnn.Sequential(*layers)
        self.classifier = tnn.Linear(width * h * w, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def randomize(model, inputs, seed=0):
    """Random affine parameters, then running statistics near the data's, perturbed (eval mode after)."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, (tnn.BatchNorm2d, tnn.GroupNorm))]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        bns = [m for m in norms if isinstance(m, tnn.BatchNorm2d)]
        if bns:
            model.train()
            for m in bns:
                m.momentum = None  # cumulative average over the calibration batches
            for chunk in inputs.split(max(1, len(inputs) // 2)):
                model(chunk)
            for m in bns:
                m.momentum = 0.1
                m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.mul_(0.7 + 0.7 * torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
