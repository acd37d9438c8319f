"""A small convolutional classifier trained on scikit-learn's bundled `digits` data (8x8
images of handwritten digits, upsampled to 32x32), for EarlyExit's tests and benchmark: real
weights from plain training (no exits), about a minute on two cores.

Splits (fixed): 1000 images to train on, 397 for calibration (the pass's own search and
held-out check), 400 held out for the figures.
"""

from __future__ import annotations

import numpy as np

TRAIN, CALIBRATION = 1000, 397


def digits_32() -> tuple[np.ndarray, np.ndarray]:
    """Images [1797, 1, 32, 32] float32 (zero mean, unit variance) and labels [1797] int64, in
    a fixed shuffled order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)[:, None]  # 8x8 -> 32x32
    images = (images - images.mean()) / images.std()
    order = np.random.default_rng(0).permutation(len(images))
    return np.ascontiguousarray(images[order]), data.target[order].astype(np.int64)


def splits():
    """(train, calibration, test), each (images, labels)."""
    images, labels = digits_32()
    cut = (0, TRAIN, TRAIN + CALIBRATION, len(images))
    return tuple((images[a:b], labels[a:b]) for a, b in zip(cut[:-1], cut[1:]))


def build_model():
    import torch
    from torch import nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class DigitsCNN(nn.Module):
        """Eight conv blocks (24, 24 | pool | 48, 48, 48 | pool | 96, 96, 96 channels), global
        average pooling, one linear layer: about 60 MFLOP per image."""

        def __init__(self):
            super().__init__()
            layers = block(1, 24) + block(24, 24) + [nn.MaxPool2d(2)]
            layers += block(24, 48) + block(48, 48) + block(48, 48) + [nn.MaxPool2d(2)]
            layers += block(48, 96) + block(96, 96) + block(96, 96)
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(96, 10)

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return DigitsCNN()


def train(epochs: int = 12, seed: int = 0):
    """The model trained on the training split (Adam, batch 32, one-cycle learning rate);
    returns it in eval mode."""
    import torch

    (images, labels), _, _ = splits()
    model = build_model()
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    steps = epochs * -(-len(x) // 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 32):
            batch = order[start:start + 32]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(-1) == labels))
