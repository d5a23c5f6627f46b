"""CLOSE: Curriculum Learning On the Sharing Extent (Zhou et al., ECCV 2022) on NAS-Bench-201.

Sections 1-7 are the method in the paper's order; 8-9 are the program around it.

    python close.py --epochs 250 --device cuda  # train, score all 6,466 archs, search
    python close.py --baseline --epochs 250 --device cuda  # the vanilla one-shot supernet
    python close.py --data synthetic --epochs 5 --cells 1 --channels 8 --eval-archs 50 \
        --track-archs 50 --search-budget 60 --population 20 --tournament 5  # offline, ~50 s
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import functools
import importlib.util
import io
import itertools
import json
import math
import operator
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import scipy.stats
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF


def option(default, description, choices=None):
    return field(default=default, metadata={"help": description, "choices": choices})


@dataclass
class Config:
    # supernet
    blocks: int = option(5, "K, GLOW blocks per cell")
    baseline: bool = option(False, "the vanilla one-shot supernet instead of CLOSENet")
    channels: int = option(16, "channels of the first stage (NB201: 16)")
    cells: int = option(5, "searchable cells per stage (NB201: 5)")
    # training: the official recipe, scaled to --epochs
    epochs: int = option(250, "training epochs")
    batch_size: int = option(256, "training and scoring batch size")
    lr: float = option(0.05, "SGD learning rate")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "SGD weight decay, on every parameter")
    grad_clip: float = option(5.0, "gradient-norm clip")
    seed: int = option(0, "seed of training")
    # data and machine
    data: str = option("cifar10", "cifar10 (torchvision download), synthetic, or a folder "
                       "DATA/train/<class>/<image>")
    data_root: str = option("data", "where torchvision keeps CIFAR-10")
    train_subset: int = option(0, "train on a seeded subset of N images (0: all)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto")
    threads: int = option(0, "CPU threads per process (0: torch's default; under torchrun, the "
                          "cores shared)")
    # scoring and search
    eval_gate: str = option("sample", "blocks at scoring: one Gumbel draw per arch (official), "
                            "or the GATE's argmax", ("sample", "argmax"))
    eval_archs: int = option(0, "score a seeded subset of N unique archs (0: all 6,466)")
    eval_batches: int = option(0, "score on the first N held-out batches (0: all)")
    eval_seed: int = option(0, "seed of the arch subsets and of scoring's draws")
    images_per_pass: int = option(0, "held-out images per scoring pass, whole batches, each "
                                  "normalised alone (0: 40 batches on a GPU, 1 on a CPU)")
    track_every: int = option(-1, "score the tracked archs every N epochs and after the last "
                              "(-1: epochs // 10, at least 1; 0: never)")
    track_archs: int = option(200, "unique archs tracked during training (by --eval-seed)")
    track_batches: int = option(10, "held-out batches that score them (at most all there are)")
    search: str = option("evolution", "search strategy", ("evolution", "random"))
    search_budget: int = option(1000, "fitness evaluations of the search (0: no search)")
    population: int = option(50, "population of the evolutionary search")
    tournament: int = option(10, "tournament size of the evolutionary search")
    nb201: str = option("", "NB201 ground truth for the ranking metrics (see nb201_api_slim.py)")
    out: str = option("", "output folder (default: a new folder in runs/ named by the options)")


# The rest of the official recipe, fixed: each constant named once, with its official value.
HELDOUT_FRACTION = 0.2  # of CIFAR-10's training images: 40,000 train the supernet, 10,000 score
CROP_PADDING = 4  # training augmentation: random 32x32 crop of the image padded by 4, and a flip
HEAD_DROPOUT = 0.1  # before the classifier
GATE_WIDTHS = {"embedding": 48, "hidden": 96, "graph_layers": (128,) * 5, "mlp": (200,) * 3}
GATE_DROPOUT = 0.1  # after each hidden layer of the GATE's MLP
GUMBEL_TEMPERATURE = 5.0  # the forward draw is argmax(logits + Gumbel) whatever it is
PLATEAU_PATIENCE = 30 / 1000  # of the epochs: lr halves after 30 of 1,000 without a lower loss
PLATEAU_FACTOR, PLATEAU_THRESHOLD = 0.5, 1e-4  # the halving, and "lower" by this share at least
RESTART_FRACTION = 0.4  # of the epochs: the learning-rate restart, officially at epoch 401


class UsageError(Exception):
    """Bad input: reported as one line, never as a traceback."""


class RunError(Exception):
    """A run that cannot go on (a non-finite loss, out of GPU memory): reported as one line; the
    checkpoint and the scores so far are kept, so that --resume continues."""


def with_progress(items, label):
    """Yield from `items`, printing how far it is and the time left once a minute."""
    started = shown = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        if (now := time.monotonic()) - shown > 60 and done < len(items):
            rate, shown = done / (now - started), now
            print(f"{label}: {done:,}/{len(items):,}  {rate:,.2f}/s  "
                  f"{duration((len(items) - done) / rate)} left", flush=True)


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


# --------------------------------------
# 1. Search space (NAS-Bench-201)
OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NONE, SKIP, CONV1X1, CONV3X3, AVG_POOL = range(len(OPS))
# A cell is a DAG on 4 nodes; node 0 is the cell input, node 3 its output. An architecture is
# the op index on each of these 6 edges (from, to), in the order of the official arch string.
EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
ALL_ARCHS = tuple(itertools.product(range(len(OPS)), repeat=len(EDGES)))  # NB201's 15,625
ARCH_FORMAT = "|op~0|+|op~0|op~1|+|op~0|op~1|op~2|"


def arch_to_str(arch):
    """(3, 3, 3, 1, 3, 2) -> |nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|..."""
    ops = [f"{OPS[op]}~{src}" for (src, _), op in zip(EDGES, as_arch(arch))]
    nodes = (ops[:1], ops[1:3], ops[3:])
    return "+".join("|" + "|".join(node) + "|" for node in nodes)


def str_to_arch(text):
    """The inverse of arch_to_str; else a ValueError naming the first bad token."""
    tokens = text.replace("|+|", "|").strip("|").split("|") if isinstance(text, str) else []
    ops = [token.partition("~")[0] for token in tokens]
    problem = None
    for token, op, (src, _) in zip(tokens, ops, EDGES):
        if op not in OPS:
            problem = f"{op!r} is not an op ({', '.join(OPS)})"
        elif not token.endswith(f"~{src}"):
            problem = f"{token!r} should come from node {src}"
        if problem:
            break
    if problem or len(ops) != len(EDGES) or arch_to_str([OPS.index(op) for op in ops]) != text:
        problem = problem or "expected " + ARCH_FORMAT
        raise ValueError(f"not an NB201 architecture string: {text!r} ({problem})")
    return tuple(OPS.index(op) for op in ops)


def as_arch(arch):
    """An arch's 6 op indices, from any sequence of them or its string; else a ValueError."""
    if isinstance(arch, str):
        return str_to_arch(arch)
    if isinstance(arch, (torch.Tensor, np.ndarray)):
        arch = arch.tolist()  # Python numbers: bools and floats are refused below
    try:
        ops = tuple(-1 if isinstance(op, bool) else operator.index(op) for op in arch)
    except TypeError:
        ops = ()
    if len(ops) != len(EDGES) or not all(0 <= op < len(OPS) for op in ops):
        raise ValueError(f"not an NB201 architecture: {arch!r} "
                         f"(give its string {ARCH_FORMAT} or its 6 op indices 0-4)")
    return ops


def arch_index(arch):
    """The arch's index in NB201's order (its ops as a base-5 number)."""
    return int("".join(map(str, as_arch(arch))), len(OPS))


def isomorphism_key(arch):
    """NB201's rule for 'same cell': node 3 as an expression of the input. An edge gives '#' (zero)
    for op none or source '#', the source for skip_connect, else '(source)@op'; a node is its
    sorted terms joined by '+'. '#' sorting before '(' gives NB201's 6,466 classes."""
    expression = ["x"]
    for node in (1, 2, 3):
        terms = []
        for (src, dst), op in zip(EDGES, as_arch(arch)):
            if dst != node:
                continue
            if op == NONE or expression[src] == "#":
                terms.append("#")
            else:
                terms.append(expression[src] if op == SKIP else f"({expression[src]})@{OPS[op]}")
        expression.append("+".join(sorted(terms)))
    return expression[3]


@functools.cache
def _representatives():
    """Each arch -> the first arch of its isomorphism class in NB201's order."""
    first = {}
    return {arch: first.setdefault(isomorphism_key(arch), arch) for arch in ALL_ARCHS}


def canonical(arch):
    """The representative of arch's isomorphism class."""
    return _representatives()[as_arch(arch)]


@functools.cache
def unique_archs():
    """The 6,466 isomorphism classes of NB201, one representative each."""
    return tuple(dict.fromkeys(_representatives().values()))


def live_edges(arch):
    """Edges whose source is reachable from the input and whose target reaches the output."""
    arch = as_arch(arch)
    reachable = {0}
    for (src, dst), op in zip(EDGES, arch):  # EDGES is topologically ordered by target
        if src in reachable and op != NONE:
            reachable.add(dst)
    reaches_output = {3}
    for (src, dst), op in reversed(list(zip(EDGES, arch))):
        if dst in reaches_output and op != NONE:
            reaches_output.add(src)
    return tuple(op != NONE and src in reachable and dst in reaches_output
                 for (src, dst), op in zip(EDGES, arch))


def routed_edges(arch):
    """The live edges whose op has weights: those a sharing assignment routes."""
    ops = as_arch(arch)
    return [e for e, live in enumerate(live_edges(ops)) if live and ops[e] in (CONV1X1, CONV3X3)]


# --------------------------------------
# 2. Data: uint8 images resident on the device, augmented there in whole batches
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)


@dataclass
class Dataset:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_labels: torch.Tensor  # int64 [N]
    heldout_images: torch.Tensor  # uint8 [M, 3, 32, 32]
    heldout_labels: torch.Tensor
    num_classes: int

    def to(self, device):
        tensors = (self.train_images, self.train_labels, self.heldout_images, self.heldout_labels)
        return Dataset(*(t.to(device) for t in tensors), self.num_classes)


def synthetic_dataset(train=1024, heldout=256, num_classes=10, seed=0):
    """Random images whose class sets the mean colour: learnable in seconds."""
    generator = torch.Generator().manual_seed(seed)
    palette = torch.randint(40, 216, (num_classes, 3, 1, 1), generator=generator)
    labels = torch.randint(num_classes, (train + heldout,), generator=generator)
    noise = torch.randint(-40, 41, (train + heldout, 3, 32, 32), generator=generator)
    images = (palette[labels] + noise).clamp(0, 255).to(torch.uint8)
    return Dataset(images[:train], labels[:train], images[train:], labels[train:], num_classes)


def split(images, labels, order, num_classes):
    """The first 80% of `order` train the supernet, the rest score archs."""
    cut = round(len(order) * (1 - HELDOUT_FRACTION))
    train, heldout = order[:cut], order[cut:]
    return Dataset(images[train], labels[train], images[heldout], labels[heldout], num_classes)


def cifar10_dataset(root):
    """torchvision's CIFAR-10 train set, split by position as officially (it is shuffled)."""
    root = Path(root)
    first_new = next((p for p in [*reversed(root.parents), root] if not p.exists()), None)
    there = set(root.iterdir()) if root.is_dir() else set()
    try:
        train_set = torchvision.datasets.CIFAR10(root, train=True, download=True)
    except (OSError, RuntimeError) as error:  # offline: URLError; a broken archive: RuntimeError
        for path in [first_new] if first_new else set(root.iterdir()) - there:  # what it created
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise UsageError(f"CIFAR-10 could not be downloaded into {root} "
                         f"({str(error).splitlines()[0]}): use --data FOLDER, --data synthetic, "
                         f"or --data-root DIR") from None
    images = torch.from_numpy(train_set.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(train_set.targets)
    return split(images, labels, torch.arange(len(labels)), 10)


def image_folder_dataset(path, seed=0):
    """PATH/train/<class>/*, split by a seeded shuffle (ImageFolder lists class by class)."""
    root = Path(path) / "train"
    try:
        folder = torchvision.datasets.ImageFolder(
            root, transform=lambda image: TF.pil_to_tensor(TF.resize(image, [32, 32])))
        if len(folder.classes) < 2:
            raise RuntimeError(f"{len(folder.classes)} class folder(s); need at least 2")
        images = torch.stack([image for image, _ in with_progress(folder, f"decoding {root}")])
    except (OSError, RuntimeError) as error:
        raise UsageError(f"--data {path}: not an image-folder tree with train/<class>/<image> "
                         f"({error})") from None
    labels = torch.tensor(folder.targets)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return split(images, labels, order, len(folder.classes))


def load_dataset(cfg):
    if cfg.data == "synthetic":
        data = synthetic_dataset(seed=cfg.seed)
    elif cfg.data == "cifar10":
        data = cifar10_dataset(cfg.data_root)
    elif Path(cfg.data).is_dir():
        data = image_folder_dataset(cfg.data)
    else:
        raise UsageError(f"--data {cfg.data}: not 'cifar10', 'synthetic' or a folder")
    if 0 < cfg.train_subset < len(data.train_labels):  # a quick run on real data
        generator = torch.Generator().manual_seed(cfg.seed)
        keep = torch.randperm(len(data.train_labels), generator=generator)[:cfg.train_subset]
        data = Dataset(data.train_images[keep], data.train_labels[keep],
                       data.heldout_images, data.heldout_labels, data.num_classes)
    return data


def normalize(images):
    """uint8 -> float, CIFAR-10 mean/std normalisation."""
    return TF.normalize(images.float().div_(255), CIFAR10_MEAN, CIFAR10_STD)


def augment(images):
    """Random crop 32 of the zero-padded image and horizontal flip, drawn per image (torchvision
    draws per batch): one gather from shifted sources."""
    batch, device = images.shape[0], images.device
    padded = F.pad(images, (CROP_PADDING,) * 4)
    offset_y, offset_x = torch.randint(0, 2 * CROP_PADDING + 1, (2, batch, 1), device=device)
    flip = torch.rand(batch, 1, device=device) < 0.5
    pixels = torch.arange(32, device=device)
    rows = offset_y + pixels  # [B, 32]
    cols = offset_x + torch.where(flip, 31 - pixels, pixels)  # [B, 32], reversed if flipped
    index = torch.arange(batch, device=device)[:, None, None]
    out = padded[index, :, rows[:, :, None], cols[:, None, :]]  # [B, 32, 32, C]
    return out.permute(0, 3, 1, 2)


# --------------------------------------
# 3. CLOSENet: parameters decoupled from operations
#
# The paper's words and this file's names:
#   GLOW block: one set of weights for a cell's ops       GlowBlock; a cell's pool: glow_blocks
#   K, the number of GLOW blocks per cell                 --blocks, CLOSENet.num_blocks
#   sharing assignment: the block each edge of an arch uses   SharingAssignment
#   GATE: graph encoder + MLP that draws the assignment   Gate, CLOSENet.sharing_assignment
#   sharing extent: how many edges share one block        shrinks as `level` (active blocks) rises
#   curriculum on the sharing extent                      curriculum_level (section 4)
#   WIT, weight inheritance training                      add_glow_block (section 4)
#   learning-rate restart at 40% of training              restart_epoch (section 5)
#   de-isomorphic sampling: one arch per isomorphism class   unique_archs, train_epoch
#   one-shot evaluation: an arch scored with shared weights  score_arch (section 6)
#   vanilla one-shot supernet: one block per edge, no GATE   CLOSENet(baseline=True), --baseline
MEMORY_FORMAT = torch.channels_last  # faster for these small convolutions on CPU and GPU


def precision(device):
    """bf16 where the GPU has it natively (compute capability 8 or more: A100, RTX 30 and newer);
    fp32 elsewhere: older GPUs (T4, V100, RTX 20) only emulate bf16, and a CPU gains nothing."""
    native = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native else torch.float32


def autocast(device):
    """Autocast to bf16 where precision(device) says so (the GATE opts out: see gate_logits)."""
    bf16 = precision(device) == torch.bfloat16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# Archs are scored with batch statistics (the one-shot protocol), so BN keeps no running ones.
# Scoring sends many batches through one pass (launches are what a GPU waits on), each
# normalised alone as a pass per batch would: every forward takes `batch_size` for that.
def batch_norm(x, weight=None, bias=None, eps=1e-5, batch_size=None):
    """F.batch_norm on batch statistics: of the whole input, or of each `batch_size` images."""
    if batch_size is None or batch_size == len(x):
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
    groups = x.unflatten(0, (-1, batch_size))  # (G, batch_size, C, H, W)
    var, mean = (s.double() for s in torch.var_mean(groups, (1, 3, 4), keepdim=True, correction=0))
    scale = torch.rsqrt(var + eps) * (1 if weight is None else weight[:, None, None])  # tiny
    shift = (0 if bias is None else bias[:, None, None]) - mean * scale  # (G, 1, C, 1, 1)
    return torch.addcmul(shift.to(x.dtype), groups, scale.to(x.dtype)).flatten(0, 1)


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, channels):
        super().__init__(channels, track_running_stats=False)

    def forward(self, x, batch_size=None):
        return batch_norm(x, self.weight, self.bias, self.eps, batch_size)


class Sequential(nn.Sequential):
    """nn.Sequential that hands `batch_size` to its batch norms."""

    def forward(self, x, batch_size=None):
        for module in self:
            x = module(x, batch_size) if isinstance(module, BatchNorm) else module(x)
        return x


def relu_conv_bn(x, weight, batch_size=None):
    """NB201's nor_conv_kxk: ReLU -> conv (no bias) -> BN without affine."""
    x = F.conv2d(F.relu(x), weight, padding=weight.shape[-1] // 2)
    return batch_norm(x, batch_size=batch_size)


class GlowBlock(nn.Module):
    """A GLOW block: one set of weights for a cell's parameterised ops."""

    def __init__(self, channels):
        super().__init__()
        self.conv1x1 = nn.Conv2d(channels, channels, 1, bias=False)  # for PyTorch's default init
        self.conv3x3 = nn.Conv2d(channels, channels, 3, bias=False)

    def weight(self, op):
        if op == CONV1X1:
            return self.conv1x1.weight
        if op == CONV3X3:
            return self.conv3x3.weight
        raise ValueError(f"{OPS[op]} has no weights in a GLOW block")


@dataclass
class SharingAssignment:
    """The GLOW block of each edge, the same in every cell: fixed `blocks`, 6 ints (scoring,
    vanilla, level 1), or a training draw of the GATE, `gate` (6, level) one-hot forward with
    soft gradients (straight-through) and its argmax `chosen` (6,), both left on the device."""
    blocks: list[int] | None = None
    gate: torch.Tensor | None = None
    chosen: torch.Tensor | None = None


# False: glow_op computes the paper's sum as written (slower, the same loss and gradients).
FUSED_UNCHOSEN_BLOCKS = True


def glow_op(x, op, edge, glow_blocks, assignment, batch_size=None):
    """The paper's edge output: sum_i gate_i * block_i(x) over the active blocks, the gate one-hot
    forward (straight-through). A fixed assignment: the named block."""
    if assignment.gate is None:
        return relu_conv_bn(x, glow_blocks[assignment.blocks[edge]].weight(op), batch_size)
    gate = assignment.gate[edge]  # (level,)
    if not FUSED_UNCHOSEN_BLOCKS:  # every active block with autograd, as the official code
        return sum(g * relu_conv_bn(x, block.weight(op), batch_size)
                   for g, block in zip(gate, glow_blocks))
    # The same sum made cheap: the others' weight is 0, so only the chosen block needs autograd;
    # the others' values give the gate's gradient <dL/d out, block_i(x)>: one forward-only conv.
    level = gate.shape[0]
    weights = torch.stack([block.weight(op) for block in glow_blocks[:level]])  # (level, C, C, k,k)
    chosen = assignment.chosen[edge].view(1)
    out = gate.index_select(0, chosen) * relu_conv_bn(x, weights.index_select(0, chosen)[0],
                                                      batch_size)
    if level > 1:
        others = (chosen + torch.arange(1, level, device=chosen.device)) % level  # (level - 1,)
        with torch.no_grad():  # one conv with (level - 1) * C output channels
            values = relu_conv_bn(x, weights.index_select(0, others).flatten(0, 1), batch_size)
        values = values.unflatten(1, (level - 1, -1))  # (B, level - 1, C, H, W)
        out = UnchosenBlocks.apply(out, gate.index_select(0, others), values)
    return out


class UnchosenBlocks(torch.autograd.Function):
    """out + sum_k gate_k * value_k over the unchosen blocks, gate_k = 0: only the gradient."""

    @staticmethod
    def forward(ctx, out, gate, values):
        ctx.save_for_backward(values)
        ctx.gate_dtype = gate.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        values, = ctx.saved_tensors
        batch, blocks, channels = values.shape[:3]
        # one matmul over pixels; (B, K, C, H, W) -> (B*H*W, K, C) is a view in channels_last
        values = values.permute(0, 3, 4, 1, 2).reshape(-1, blocks, channels).to(ctx.gate_dtype)
        grad = grad_out.permute(0, 2, 3, 1).reshape(-1, channels, 1).to(ctx.gate_dtype)
        return grad_out, torch.bmm(values, grad).sum((0, 2)), None  # d loss / d gate_k: (K,)


class Cell(nn.Module):
    """A searchable NB201 cell that owns a pool of GLOW blocks."""

    def __init__(self, channels, num_blocks):
        super().__init__()
        self.glow_blocks = nn.ModuleList(GlowBlock(channels) for _ in range(num_blocks))

    def forward(self, x, arch, assignment, batch_size=None):
        arch = as_arch(arch)
        live = live_edges(arch)
        nodes = [x]
        for node in (1, 2, 3):
            terms = []
            for e, ((src, dst), op) in enumerate(zip(EDGES, arch)):
                if dst != node or not live[e]:
                    continue
                if op in (CONV1X1, CONV3X3):
                    terms.append(glow_op(nodes[src], op, e, self.glow_blocks, assignment,
                                         batch_size))
                elif op == SKIP:
                    terms.append(nodes[src])
                else:
                    terms.append(F.avg_pool2d(nodes[src], 3, 1, 1, count_include_pad=False))
            nodes.append(sum(terms) if terms else None)  # live edges never read an empty node
        return nodes[3] if nodes[3] is not None else torch.zeros_like(x)


class ResidualReduction(nn.Module):
    """NB201's reduction between stages: a ResNet basic block, stride 2, channels doubled."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.a = Sequential(nn.ReLU(), nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False),
                            BatchNorm(c_out))
        self.b = Sequential(nn.ReLU(), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                            BatchNorm(c_out))
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x, batch_size=None):
        return self.shortcut(x) + self.b(self.a(x, batch_size), batch_size)


class Gate(nn.Module):
    """The GATE: a GATES-style graph encoder of the arch, then per edge an MLP giving a logit per
    block. Node 0 starts from a learned embedding, nodes 1-3 from zero; each layer sends node j's
    message W h_j to node i through an attention made from the op on edge j->i."""

    def __init__(self, num_blocks, sizes=GATE_WIDTHS, dropout=GATE_DROPOUT):
        super().__init__()
        embedding, hidden = sizes["embedding"], sizes["hidden"]
        self.op_embedding = nn.Embedding(len(OPS), embedding)
        self.input_node_embedding = nn.Parameter(torch.randn(embedding))
        self.lift = nn.Linear(embedding, hidden)
        widths = (hidden,) + tuple(sizes["graph_layers"])
        self.messages = nn.ModuleList(nn.Linear(a, b, bias=False)
                                      for a, b in zip(widths, widths[1:]))
        self.attention = nn.ModuleList(nn.Linear(embedding, b) for b in widths[1:])
        mlp, layers = (2 * widths[-1],) + tuple(sizes["mlp"]), []
        for a, b in zip(mlp, mlp[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        # the last layer's row i scores block i; only the first `level` rows are used
        self.mlp = nn.Sequential(*layers, nn.Linear(mlp[-1], num_blocks))
        self.register_buffer("edge_src", torch.tensor([s for s, _ in EDGES]), persistent=False)
        self.register_buffer("edge_dst", torch.tensor([d for _, d in EDGES]), persistent=False)

    def forward(self, archs):
        """archs: long (..., 6) -> logits (..., 6, num_blocks)."""
        op_matrix = archs.new_zeros(*archs.shape[:-1], 4, 4)  # (..., to, from)
        op_matrix[..., self.edge_dst, self.edge_src] = archs
        op_features = self.op_embedding(op_matrix)  # (..., to, from, embedding)
        is_edge = (op_matrix != NONE).unsqueeze(-1)  # (..., to, from, 1)
        nodes = F.pad(self.input_node_embedding[None], (0, 0, 0, 3))  # (4, embedding)
        h = self.lift(nodes).expand(*archs.shape[:-1], 4, -1)  # (..., node, hidden)
        for layer, (message, attention) in enumerate(zip(self.messages, self.attention)):
            support = message(h)  # (..., node, width)
            att = torch.sigmoid(attention(op_features)) * is_edge  # (..., to, from, width)
            h_next = torch.einsum("...ijw,...jw->...iw", att, support)  # (..., node, width)
            # node 0 has no incoming edge: it keeps its own message
            h = torch.cat([h_next[..., :1, :] + support[..., :1, :], h_next[..., 1:, :]], dim=-2)
            if layer < len(self.messages) - 1:
                h = F.relu(h)
        ends = torch.cat([h[..., self.edge_src, :], h[..., self.edge_dst, :]], dim=-1)
        return self.mlp(ends)  # ends: (..., 6, 2 * width), each edge's two nodes


def gumbel_draw(logits):
    """Straight-through Gumbel: one-hot forward, the gradient of the soft probabilities."""
    gate = F.gumbel_softmax(logits, tau=GUMBEL_TEMPERATURE, hard=True)  # (6, level)
    return SharingAssignment(gate=gate, chosen=gate.argmax(-1))


class CLOSENet(nn.Module):
    """NB201 supernet whose cells draw op weights from a pool of GLOW blocks (baseline: vanilla)."""

    def __init__(self, channels=16, cells=5, num_blocks=5, num_classes=10, baseline=False):
        super().__init__()
        self.baseline = baseline
        self.num_blocks = len(EDGES) if baseline else num_blocks
        self.stem = Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False),
                               BatchNorm(channels))
        layers = []
        for stage, width in enumerate((channels, 2 * channels, 4 * channels)):
            if stage:
                layers.append(ResidualReduction(width // 2, width))
            layers += [Cell(width, self.num_blocks) for _ in range(cells)]
        self.layers = nn.ModuleList(layers)
        self.head = Sequential(BatchNorm(4 * channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Dropout(HEAD_DROPOUT),
                               nn.Linear(4 * channels, num_classes))
        self.gate = None if baseline else Gate(num_blocks)
        self.level = self.num_blocks if baseline else 1

    @property
    def level(self):
        """Active blocks, the curriculum level. The blocks beyond it are frozen until WIT brings
        them in; not the GATE's logit rows for them: weight decay shrinks those, as officially."""
        return self._level

    @level.setter
    def level(self, level):
        self._level = level
        for cell in self.cells():
            for i, block in enumerate(cell.glow_blocks):
                block.requires_grad_(i < level)

    def cells(self):
        return [layer for layer in self.layers if isinstance(layer, Cell)]

    def gate_logits(self, archs):
        """Logits over the active blocks: (6, level) for an arch, (N, 6, level) for a list of N
        archs. In fp32: bf16 rounds by ~5e-4, above a fresh GATE's arch signal."""
        try:
            ops = torch.tensor(as_arch(archs))  # (6,)
        except ValueError:  # not an arch: a list of them
            ops = torch.tensor([as_arch(arch) for arch in archs]).view(-1, len(EDGES))
        device = self.gate.edge_src.device
        with torch.autocast(device.type, enabled=False):
            return self.gate(ops.to(device, non_blocking=True))[..., :self.level]

    def sharing_assignment(self, arch, eval_gate="sample", seed=0):
        """Vanilla: edge e on block e; level 1: block 0. Training: a straight-through Gumbel draw
        from the GATE. Scoring (eval mode): a draw seeded by `seed` and the arch (official), or
        eval_gate='argmax'."""
        arch = as_arch(arch)
        if self.baseline:
            return SharingAssignment(blocks=list(range(len(EDGES))))
        if self.level == 1:
            return SharingAssignment(blocks=[0] * len(EDGES))
        logits = self.gate_logits(arch)  # (6, level)
        if self.training:
            return gumbel_draw(logits)
        if eval_gate == "argmax":
            return SharingAssignment(blocks=logits.argmax(-1).tolist())
        # argmax(logits + Gumbel noise) is a draw from softmax(logits): the library's draw
        generator = torch.Generator().manual_seed(seed * len(ALL_ARCHS) + arch_index(arch))
        draw = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator)  # (6, 1)
        return SharingAssignment(blocks=draw[:, 0].tolist())

    def forward(self, images, arch, assignment=None, batch_size=None):
        """Logits (B, classes); BN statistics of each `batch_size` images (None: of all)."""
        arch = as_arch(arch)
        assignment = assignment or self.sharing_assignment(arch)
        x = self.stem(images, batch_size)
        for layer in self.layers:
            x = (layer(x, arch, assignment, batch_size) if isinstance(layer, Cell)
                 else layer(x, batch_size))
        return self.head(x, batch_size)

    def get_extra_state(self):  # the level travels with the weights in state_dict()
        return {"level": self.level}

    def set_extra_state(self, state):
        self.level = state["level"]


def build_model(cfg, num_classes, device):
    torch.manual_seed(cfg.seed)  # training draws from torch's generators only
    model = CLOSENet(cfg.channels, cfg.cells, cfg.blocks, num_classes, cfg.baseline)
    return model.to(device, memory_format=MEMORY_FORMAT)


# --------------------------------------
# 4. Curriculum on the sharing extent
def curriculum_level(epoch, epochs, num_blocks):
    """Active blocks at 0-based `epoch`: one more every epochs/K (officially 1,000 epochs and a
    block every 200)."""
    return min(num_blocks, 1 + epoch * num_blocks // epochs)


@torch.no_grad()
def add_glow_block(model):
    """The next GLOW block by WIT, in place: its parent's weights are added to its fresh init, and
    its GATE logit row likewise (official). An exact copy would give the GATE no gradient."""
    if model.level == model.num_blocks:
        raise ValueError(f"add_glow_block: all {model.num_blocks} blocks are at work already")
    new = model.level
    for cell in model.cells():
        parent = cell.glow_blocks[new - 1].parameters()
        for inherited, weight in zip(cell.glow_blocks[new].parameters(), parent):
            inherited.add_(weight)
    for row in (model.gate.mlp[-1].weight, model.gate.mlp[-1].bias):  # the GATE's logit row
        row[new] += row[new - 1]
    model.level = new + 1


# --------------------------------------
# 5. Training (the official recipe, scaled to --epochs)
def make_optimizer(model, cfg):
    """SGD over everything, the GATE included, and the plateau schedule. Officially gradients are
    zeroed, never dropped, so SGD decays every active weight at every step, used or not; a step
    pre-hook does so in any loop."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    optimizer.register_step_pre_hook(zero_missing_grads)
    patience = max(1, round(PLATEAU_PATIENCE * cfg.epochs))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=PLATEAU_FACTOR, patience=patience, threshold=PLATEAU_THRESHOLD)
    return optimizer, scheduler


def zero_missing_grads(optimizer, *_):
    """A zero gradient for each trainable parameter without one (frozen blocks wait for WIT)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)


def restart_epoch(cfg):
    """The 0-based epoch at whose start train() restarts the learning rate (officially epoch 401
    of 1,000)."""
    return int(RESTART_FRACTION * cfg.epochs)


@dataclass
class TrainingState:
    """What the schedule changes: with the model and torch's RNG, all an exact resume needs."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    epoch: int = 0  # epochs finished


def train_step(model, optimizer, images, labels, arch, grad_clip):
    with autocast(images.device):
        logits = model(images, arch)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=False)  # official: zeroed, never dropped
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), logits.detach()


def train_epoch(model, optimizer, data, cfg):
    """One pass, one uniformly drawn unique arch per step (de-isomorphic sampling), no host sync."""
    model.train()
    archs, device, count = unique_archs(), data.train_labels.device, len(data.train_labels)
    order, steps = torch.randperm(count, device=device), math.ceil(count / cfg.batch_size)
    losses, correct = torch.zeros(steps, device=device), torch.zeros((), device=device)
    for step in with_progress(range(steps), "steps"):
        arch = archs[torch.randint(len(archs), ()).item()]  # CPU generator: no device sync
        batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        images = normalize(augment(data.train_images[batch]))
        images = images.contiguous(memory_format=MEMORY_FORMAT)
        labels = data.train_labels[batch]
        loss, logits = train_step(model, optimizer, images, labels, arch, cfg.grad_clip)
        losses[step] = loss * len(batch)
        correct += (logits.argmax(1) == labels).sum()
    return {"losses": losses, "correct": correct, "images": count}


def train(model, data, cfg, state, epoch_done=lambda finished: None):
    """Each epoch: grow the pool to the curriculum level (WIT), restart the learning rate at 40%,
    make one pass, step the plateau scheduler on the mean loss."""
    for epoch in range(state.epoch, cfg.epochs):
        while model.level < curriculum_level(epoch, cfg.epochs, model.num_blocks):
            add_glow_block(model)
        if epoch == restart_epoch(cfg) > 0:  # lr back to --lr, no momentum, a new plateau count
            state.optimizer, state.scheduler = make_optimizer(model, cfg)
        started, lr = time.monotonic(), state.optimizer.param_groups[0]["lr"]
        finished = train_epoch(model, state.optimizer, data, cfg)
        loss = sum(finished["losses"].tolist()) / finished["images"]  # the epoch's mean
        state.scheduler.step(loss)
        state.epoch = epoch + 1
        epoch_done(finished | {"loss": loss, "lr": lr, "seconds": time.monotonic() - started})


# --------------------------------------
# 6. Evaluation: one-shot scores, the GATE's health, ranking metrics
def heldout_set(data, cfg, batches=None):
    """The first `batches` held-out batches (default --eval-batches; 0: all), normalised once."""
    count = (cfg.eval_batches if batches is None else batches) * cfg.batch_size
    count = count or len(data.heldout_labels)
    images = normalize(data.heldout_images[:count]).contiguous(memory_format=MEMORY_FORMAT)
    return images, data.heldout_labels[:count]


def seeded_archs(count, seed):
    """`count` unique archs drawn by `seed` (0, or more than there are: all, in NB201's order)."""
    if 0 < count < len(unique_archs()):
        return tuple(random.Random(seed).sample(unique_archs(), count))
    return unique_archs()


@contextlib.contextmanager
def evaluating(model):
    training = model.training
    try:
        yield model.eval()
    finally:
        model.train(training)


@torch.no_grad()
def score_arch(model, arch, images, labels, batch_size, eval_gate="sample", seed=0,
               images_per_pass=0):
    """One-shot evaluation: accuracy (%) and loss of arch with the supernet's weights, means over
    batches; dropout off, BN on each batch's statistics (eval() does both). Whole batches go
    through images_per_pass at a time (0: 40 on a GPU, where launches cost; 1 on a CPU, where
    cache misses do), the last, smaller batch alone. A pass that runs out of GPU memory is
    halved until it fits (the scores stay the same); one batch that does not fit raises."""
    if images_per_pass % batch_size:
        raise ValueError(f"images per pass ({images_per_pass}) must be 0 or a multiple of the "
                         f"batch size ({batch_size})")
    step = images_per_pass or batch_size * (40 if images.device.type == "cuda" else 1)
    whole = len(labels) - len(labels) % batch_size
    arch, accuracies, losses, start = as_arch(arch), [], [], 0
    with evaluating(model):
        assignment = model.sharing_assignment(arch, eval_gate, seed)
        while start < len(labels):
            end, group = ((min(start + step, whole), batch_size) if start < whole else
                          (len(labels), len(labels) - whole))
            try:
                with autocast(images.device):  # bf16 on a recent GPU
                    logits = model(images[start:end], arch, assignment, group).double()
            except torch.OutOfMemoryError:
                if end - start <= batch_size:
                    raise
                logits = None  # try again once this pass's memory is free
            if logits is None:
                step = (end - start) // 2 // batch_size * batch_size
                continue
            logits, y = logits.unflatten(0, (-1, group)), labels[start:end].view(-1, group)
            accuracies.append((logits.argmax(-1) == y).double().mean(1) * 100)
            losses.append(F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1))
            start = end
    return torch.cat(accuracies).mean().item(), torch.cat(losses).mean().item()


@functools.cache
def probe_archs():
    """gate_health's 500 unique archs, the same in every run."""
    return tuple(random.Random(0).sample(unique_archs(), 500))


# The GATE's health in words: BLIND when the spread of its logits between archs is below this (no
# block's odds move by 5%), COLLAPSED when fewer edges than this share avoid the likeliest block.
GATE_BLIND_SPREAD, GATE_COLLAPSED_SHARE = 0.05, 0.01


@torch.no_grad()
def gate_health(model, archs):
    """Does the GATE route by arch? Over the routed edges of `archs`: spread, the std of the
    logits centred per edge; off_dominant, the share not on the likeliest block (0: collapsed);
    entropy of a draw / log(level)."""
    if model.gate is None or model.level == 1:
        return {"spread": None, "off_dominant": None, "entropy": None}
    routed = torch.tensor([[e in routed_edges(arch) for e in range(len(EDGES))] for arch in archs])
    with evaluating(model):
        logits = model.gate_logits(archs)[routed.to(model.gate.edge_src.device)]
    # logits: (routed edges, level)
    p = logits.softmax(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(model.level)
    return {"spread": (logits - logits.mean(-1, keepdim=True)).std(0).mean().item(),
            "off_dominant": 1 - torch.bincount(logits.argmax(-1)).max().item() / len(logits),
            "entropy": entropy.mean().item()}


def descending_ranks(values):
    """Rank 0 = the highest value; ties share their best rank."""
    return scipy.stats.rankdata(-np.asarray(values, dtype=float), method="min").astype(int) - 1


def ranking_metrics(predicted, truth, ratios=(0.01, 0.05, 0.1, 0.5)):
    """k = int(N * ratio); P@topK: share of the predicted top-k in the true top-k (P@bottomK
    likewise); BR/WR@K: 1 + best/worst true rank among them."""
    predicted, truth = np.asarray(predicted, dtype=float), np.asarray(truth, dtype=float)
    for name, values in (("predicted scores", predicted), ("truth", truth)):
        if np.isnan(values).any():
            raise ValueError(f"ranking_metrics: NaN in the {name}")
    n = len(predicted)
    metrics = {"n": n,
               "kendall_tau": scipy.stats.kendalltau(predicted, truth).statistic,
               "spearman": scipy.stats.spearmanr(predicted, truth).statistic,
               "pearson": scipy.stats.pearsonr(predicted, truth).statistic}
    rank_from_top, rank_from_bottom = descending_ranks(truth), descending_ranks(-truth)
    predicted_order = np.argsort(-predicted, kind="stable")
    for ratio in ratios:
        k, name = int(n * ratio), f"{ratio * 100:g}%"
        top, bottom = predicted_order[:k], predicted_order[::-1][:k]
        metrics[f"P@top{name}"] = float(np.mean(rank_from_top[top] < k)) if k else None
        metrics[f"P@bottom{name}"] = float(np.mean(rank_from_bottom[bottom] < k)) if k else None
        metrics[f"BR@{name}"] = int(1 + rank_from_top[top].min()) if k else None
        metrics[f"WR@{name}"] = int(1 + rank_from_top[top].max()) if k else None
    return {key: float(v) if isinstance(v, np.floating) else v for key, v in metrics.items()}


NB201_DATASETS = ("cifar10", "cifar100", "ImageNet16-120")  # the supernet trains on CIFAR-10


@dataclass
class GroundTruth:
    accuracy: dict  # [dataset][arch]: NB201 test accuracy, the mean of the arch's class
    rank: dict  # [dataset][arch]: its class's rank of 6,466 (1: best)


def load_ground_truth(path):
    try:
        import nb201_api_slim
    except ImportError:
        raise UsageError("--nb201 needs nb201_api_slim.py next to close.py") from None
    try:
        table = nb201_api_slim.load(path)
        class_of = functools.cache(lambda text: canonical(str_to_arch(text)))
        classes = {d: table.group_accuracies(class_of, d)
                   for d in NB201_DATASETS if d in table.datasets}
    except (OSError, ValueError) as error:
        raise UsageError(f"--nb201 {path}: {error}") from None
    classes = {d: by_class for d, by_class in classes.items() if len(by_class) == 6466}
    if "cifar10" not in classes:
        raise UsageError(f"--nb201 {path}: no CIFAR-10 accuracy for each of the 6,466 classes")
    if lacking := [d for d in NB201_DATASETS if d not in classes]:
        print(f"--nb201 {path}: no complete {', '.join(lacking)} column")
    truth = GroundTruth({}, {})
    for dataset, by_class in classes.items():
        ranks = dict(zip(by_class, (descending_ranks(list(by_class.values())) + 1).tolist()))
        truth.accuracy[dataset] = {a: by_class[canonical(a)] for a in ALL_ARCHS}
        truth.rank[dataset] = {a: ranks[canonical(a)] for a in ALL_ARCHS}
    return truth


# --------------------------------------
# 7. Search over unique architectures: regularized evolution, and random search as its baseline
def mutate(arch, rng):
    """Change the op on one edge, until the child is another cell (not an isomorph)."""
    while True:
        edge = rng.randrange(len(EDGES))
        child = list(arch)
        child[edge] = rng.choice([op for op in range(len(OPS)) if op != arch[edge]])
        child = canonical(child)
        if child != canonical(arch):
            return child


def regularized_evolution(fitness, budget, population_size=50, tournament_size=10, seed=0):
    """Age-regularized evolution (Real et al., 2019): the tournament winner's mutant joins, the
    oldest member leaves; `budget` counts calls of `fitness`. Its own random stream, not
    --eval-archs' one. Returns the best arch, its fitness and the (arch, fitness) history."""
    rng = random.Random(f"regularized-evolution-{seed}")
    history, population = [], []

    def evaluate(arch):
        history.append((arch, fitness(arch)))
        population.append(history[-1])

    while len(history) < min(budget, population_size):
        evaluate(rng.choice(unique_archs()))
    while len(history) < budget:
        sample = rng.sample(population, min(tournament_size, len(population)))
        evaluate(mutate(max(sample, key=lambda member: member[1])[0], rng))
        population.pop(0)
    best = max(history, key=lambda member: member[1])
    return best[0], best[1], history


def random_search(fitness, budget, seed=0):
    """NAS's first baseline: the best of `budget` distinct unique archs drawn at random."""
    rng = random.Random(f"random-search-{seed}")
    drawn = rng.sample(unique_archs(), min(budget, len(unique_archs())))
    history = [(arch, fitness(arch)) for arch in drawn]
    best = max(history, key=lambda member: member[1])
    return best[0], best[1], history


def search_with_supernet(model, images, labels, cfg, scores):
    """--search on one-shot accuracy (never the ground truth), scoring archs on demand."""
    def fitness(arch):
        if arch not in scores:
            scores[arch] = score_arch(model, arch, images, labels, cfg.batch_size, cfg.eval_gate,
                                      cfg.eval_seed, cfg.images_per_pass)
        return scores[arch][0]

    if cfg.search == "random":
        best, _, history = random_search(fitness, cfg.search_budget, cfg.seed)
    else:
        best, _, history = regularized_evolution(fitness, cfg.search_budget, cfg.population,
                                                 cfg.tournament, cfg.seed)
    return {"strategy": cfg.search, "best": best, "budget": cfg.search_budget,
            "unique_evaluated": len({a for a, _ in history})}


# --------------------------------------
# 8. Runs: checked options, exact resume, the curve, torchrun, outputs, summary, benchmark
# The options that define a trained supernet, and those its weights need.
RUN_OPTIONS = ("blocks", "baseline", "channels", "cells", "epochs", "batch_size", "lr", "momentum",
               "weight_decay", "grad_clip", "seed", "data", "train_subset")
MODEL_OPTIONS = ("blocks", "baseline", "channels", "cells")
# What a resumed run must keep besides: its scores and its curve would mix two protocols.
SCORING_OPTIONS = ("eval_batches", "eval_gate", "eval_seed", "track_every", "track_archs",
                   "track_batches")
LOG_FIELDS = ("epoch", "level", "lr", "loss", "accuracy", "seconds", "images_per_s",
              "gate_spread", "gate_off_dominant", "gate_entropy")
SCORE_FIELDS = ("arch", "oneshot_accuracy", "oneshot_loss", "nb201_accuracy")
CURVE_FIELDS = ("epoch", "level", "lr", "mean_oneshot_accuracy", "kendall_tau", "spearman",
                "P@top5%", "seconds")
SUMMARY_METRICS = ("kendall_tau", "spearman", "pearson", "P@top1%", "P@top5%", "P@top10%",
                   "P@bottom5%", "BR@5%", "WR@5%")
STOP_SIGNALS = [signal.SIGINT]  # the command line adds SIGTERM; a library keeps its own
# Under torchrun, rank 0 trains; all ranks score; rank 0 gathers, searches, prints and writes.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Interrupted(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM)."""


class StopRequest:
    """Ctrl-C (or SIGTERM) noted, to stop where all ranks agree. Twice: abort at once."""

    def __enter__(self):
        self.requested, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.request) for sig in STOP_SIGNALS}
        return self

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this arch (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def use_machine(cfg):
    """--threads (else torch's; under torchrun a share of the cores) and the device (under
    torchrun, rank r on cuda:(LOCAL_RANK mod GPUs))."""
    if cfg.threads or WORLD > 1:
        share = (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"] if WORLD > 1 else 1)
        torch.set_num_threads(cfg.threads or max(1, share))
    name, unknown = cfg.device, f"--device {cfg.device}: unknown device (cpu, cuda, cuda:N, auto)"
    if name in ("auto", "cuda") and torch.cuda.is_available():
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    try:
        device = torch.device("cpu" if name == "auto" else name)
    except RuntimeError:
        raise UsageError(unknown) from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(unknown)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {cfg.device}: CUDA is not available here")
    return device


def check_config(cfg):
    """Every option, before anything is read or written."""
    rules = [("epochs batch_size blocks channels cells population tournament lr grad_clip "
              "track_batches", lambda v: v > 0, "be positive"),
             ("eval_archs eval_batches search_budget train_subset weight_decay threads "
              "images_per_pass", lambda v: v >= 0, "be 0 or more"),
             ("track_every", lambda v: v >= -1, "be 0 or more, or -1 (epochs // 10)"),
             ("track_archs", lambda v: 2 <= v <= len(unique_archs()), "be 2 to 6,466"),
             ("momentum", lambda v: 0 <= v < 1, "be in [0, 1)")]
    for names, valid, rule in rules:
        for name in names.split():
            if not valid(value := getattr(cfg, name)):
                raise UsageError(f"--{name.replace('_', '-')} must {rule}, got {value}")
    if cfg.images_per_pass % cfg.batch_size:
        raise UsageError(f"--images-per-pass must be 0 or a multiple of --batch-size "
                         f"({cfg.batch_size}), got {cfg.images_per_pass}")
    if not cfg.baseline and cfg.epochs < cfg.blocks:
        raise UsageError(f"--epochs {cfg.epochs} is smaller than the {cfg.blocks} curriculum "
                         f"stages: use --epochs {cfg.blocks} or more, or --blocks {cfg.epochs}")


def default_out(cfg):
    data = cfg.data if cfg.data in ("cifar10", "synthetic") else Path(cfg.data).name
    kind = "vanilla" if cfg.baseline else "close"
    return Path("runs") / f"{kind}-{data}-C{cfg.channels}x{cfg.cells}-{cfg.epochs}ep-seed{cfg.seed}"


def settle_options(cfg, given, resume, load):
    """A resumed or loaded run's options, but those typed now (`given`), which may not change the
    supernet; and for --load the checkpoint. Options a run predates take their defaults."""
    checkpoint, needed, fixed, path = None, RUN_OPTIONS, RUN_OPTIONS + SCORING_OPTIONS, load
    if load:
        checkpoint, needed = load_checkpoint(load), MODEL_OPTIONS
        saved, fixed = checkpoint["config"], needed
    elif resume:
        path = Path(cfg.out or default_out(cfg)) / "config.json"
        if not path.exists():
            raise UsageError(f"--resume: {path.parent} holds no run")
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"--resume: {path} is not readable JSON ({error})") from None
    else:
        return cfg, None
    defaults = asdict(Config())
    if not isinstance(saved, dict) or not set(needed) <= saved.keys() or any(
            type(value) is not type(defaults[name])
            for name, value in saved.items() if name in defaults):
        raise UsageError(f"{path}: not the options of a close.py run")
    settled = Config(**(defaults | {k: v for k, v in saved.items() if k in defaults}))
    conflicts = [f"--{name.replace('_', '-')} ({getattr(settled, name)} there, "
                 f"{getattr(cfg, name)} now)" for name in fixed
                 if name in given and getattr(settled, name) != getattr(cfg, name)]
    if conflicts:
        raise UsageError(f"the run had other options: {', '.join(conflicts)}")
    for name in given:
        setattr(settled, name, getattr(cfg, name))
    if load:
        settled.out = cfg.out or str(Path(load).parent / "rescored")
    return settled, checkpoint


def claim_out(cfg, resume):
    """The output folder, new or empty: never one holding a run (unless resumed) or files."""
    out = Path(cfg.out or default_out(cfg))
    there = next(path for path in [out, *out.parents] if path.exists())
    if not there.is_dir() or not os.access(there, os.W_OK):
        raise UsageError(f"--out {out}: {there} is not a folder that can be written to")
    if not resume and out.is_dir() and any(out.iterdir()):
        held = "a run: --resume it or" if (out / "config.json").exists() else "other files:"
        raise UsageError(f"--out {out} already holds {held} choose another --out")
    return out


def write_atomic(path, content):
    """Write text (or call content(temporary path)), then rename: a kill leaves no broken file."""
    temporary = path.with_name(path.name + ".tmp")
    if isinstance(content, str):
        temporary.write_text(content, newline="")
    else:
        content(temporary)
    os.replace(temporary, path)


def csv_text(header, rows):
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    return text.getvalue()


def save_checkpoint(path, cfg, model, state, log, curve):
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    checkpoint = {"config": asdict(cfg), "model": model.state_dict(), "epoch": state.epoch,
                  "optimizer": state.optimizer.state_dict(), "rng": rng, "log": log,
                  "scheduler": state.scheduler.state_dict(), "curve": curve}
    write_atomic(path, lambda temporary: torch.save(checkpoint, temporary))


def load_checkpoint(path, device="cpu"):
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # not torch's message: its advice to drop weights_only is unsafe
        raise UsageError(f"{path}: not a close.py checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or not {"config", "model", "log"} <= checkpoint.keys():
        raise UsageError(f"{path}: not a close.py checkpoint (no options, weights and log)")
    return checkpoint


def load_weights(model, weights, path):
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"{path}: its weights do not fit its options "
                         f"({str(error).splitlines()[0][:200]})") from None


def resume_training(model, state, path):
    """Weights, optimizer, plateau schedule and RNG after the last finished epoch; its log and
    curve."""
    saved = load_checkpoint(path, next(model.parameters()).device)
    load_weights(model, saved["model"], path)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.epoch, rng = saved["epoch"], saved["rng"]
    torch.set_rng_state(rng["cpu"].cpu())  # generator states live on the CPU
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([generator.cpu() for generator in rng["cuda"]])
    print(f"resumed after epoch {state.epoch}")
    return saved["log"], saved.get("curve", [])


# The curve: a fixed set of archs scored as the final scoring does, every --track-every epochs,
# so that one run measures the ranking at every training budget up to its own.
def tracking_interval(cfg):
    return max(1, cfg.epochs // 10) if cfg.track_every == -1 else cfg.track_every


def track(model, images, labels, archs, cfg, truth):
    """One point of the curve. It leaves training as it was: score_arch keeps no autograd graph,
    draws from generators of its own and restores train mode; fork_rng guards training's."""
    started, device = time.monotonic(), images.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        scores = [score_arch(model, arch, images, labels, cfg.batch_size, cfg.eval_gate,
                             cfg.eval_seed, cfg.images_per_pass) for arch in archs]
    accuracies = [accuracy for accuracy, _ in scores]
    ranking = {}
    if truth:
        ranking = ranking_metrics(accuracies, [truth.accuracy["cifar10"][a] for a in archs])
    return {"mean_oneshot_accuracy": float(np.mean(accuracies)),
            **{name: ranking.get(name) for name in CURVE_FIELDS[4:7]},
            "seconds": round(time.monotonic() - started, 3), "scores": scores}


def write_training_files(out, log, curve, archs):
    """log.csv, and the curve: curve.csv (its points), curve_scores.csv (each arch's scores)."""
    write_atomic(out / "log.csv", csv_text(LOG_FIELDS, [[r[k] for k in LOG_FIELDS] for r in log]))
    if curve:
        rows = [["" if p[k] is None else p[k] for k in CURVE_FIELDS] for p in curve]
        write_atomic(out / "curve.csv", csv_text(CURVE_FIELDS, rows))
        rows = [[p["epoch"], arch_to_str(a), *score]
                for p in curve for a, score in zip(archs, p["scores"])]
        write_atomic(out / "curve_scores.csv", csv_text(("epoch", *SCORE_FIELDS[:3]), rows))


def fit(model, data, cfg, out, truth=None):
    """train() with a checkpoint, a log.csv row and a line after every epoch, and a point of the
    curve every --track-every epochs; resumed after the last finished epoch."""
    state, log, curve = TrainingState(*make_optimizer(model, cfg)), [], []
    if (out / "checkpoint.pt").exists():
        log, curve = resume_training(model, state, out / "checkpoint.pt")
    every, archs = tracking_interval(cfg), seeded_archs(cfg.track_archs, cfg.eval_seed)
    images, labels = heldout_set(data, cfg, cfg.track_batches) if every else (None, None)

    def epoch_done(finished):
        seen, seconds, loss = finished["images"], finished["seconds"], finished["loss"]
        if not math.isfinite(loss):
            raise RunError(f"the training loss became non-finite in epoch {state.epoch}; the "
                           f"checkpoint keeps the last good one")
        health = gate_health(model, probe_archs())
        log.append({"epoch": state.epoch, "level": model.level, "lr": finished["lr"],
                    "loss": loss, "accuracy": 100 * finished["correct"].item() / seen,
                    "seconds": round(seconds, 3), "images_per_s": round(seen / seconds, 1),
                    **{f"gate_{key}": value for key, value in health.items()}})
        if every and (state.epoch % every == 0 or state.epoch == cfg.epochs):
            curve.append({"epoch": state.epoch, "level": model.level, "lr": finished["lr"],
                          **track(model, images, labels, archs, cfg, truth)})
        save_checkpoint(out / "checkpoint.pt", cfg, model, state, log, curve)
        write_training_files(out, log, curve, archs)
        print(epoch_line(model, cfg, log[-1], curve, health), flush=True)

    train(model, data, cfg, state, epoch_done)
    return log


def epoch_line(model, cfg, row, curve, health):
    left = row["seconds"] * (cfg.epochs - row["epoch"])  # later levels are slower
    left = f"{duration(left)} left or more  " if left else ""
    point = curve[-1] if curve and curve[-1]["epoch"] == row["epoch"] else None
    tracked = "" if point is None else (
        f"tracked tau {point['kendall_tau']:.3f}  " if point["kendall_tau"] is not None
        else f"tracked one-shot {point['mean_oneshot_accuracy']:.1f}%  ")
    return (f"epoch {row['epoch']:4d}/{cfg.epochs}  loss {row['loss']:.4f}  acc "
            f"{row['accuracy']:5.1f}%  lr {row['lr']:.4g}  "
            f"{'' if model.baseline else f'level {model.level}  '}"
            f"{row['images_per_s']:,.0f} img/s  {left}{tracked}{describe_gate(health)}")


def from_rank0(value):
    box = [value]
    dist.broadcast_object_list(box)
    return box[0]


def fit_on_rank0(model, data, cfg, out, truth=None):
    """fit() on rank 0; the other ranks take its weights (or its stop)."""
    weights = log = None
    with StopRequest() if RANK else contextlib.nullcontext():  # rank 0 answers a stop
        try:
            if RANK == 0:
                log = fit(model, data, cfg, out, truth)
                weights = {k: v.cpu() if torch.is_tensor(v) else v
                           for k, v in model.state_dict().items()}
        finally:
            weights = from_rank0(weights)
    if weights is None:
        raise Interrupted("stopped with rank 0")
    model.load_state_dict(weights)
    return log


def score_archs(model, images, labels, cfg, archs, path):
    """One-shot scores, appended to `path` (a stopped run's are reused). Rank r scores archs r,
    r + WORLD, ...; a stop ends all ranks after the same arch."""
    scores = {}
    if RANK == 0:
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        for arch, accuracy, loss, *_ in csv.reader(lines[1:]):
            scores[str_to_arch(arch)] = (float(accuracy), float(loss))
        rows = [[arch_to_str(a), *scores[a]] for a in scores]
        write_atomic(path, csv_text(SCORE_FIELDS[:3], rows))
    todo = [arch for arch in archs if arch not in scores]
    todo = from_rank0(todo) if WORLD > 1 else todo
    label = f"scoring {len(todo):,} archs on {len(labels):,} images"
    with open(path if RANK == 0 else os.devnull, "a", newline="") as file, StopRequest() as stop:
        for start in with_progress(range(0, len(todo), WORLD), label):
            rows = [(arch, score_arch(model, arch, images, labels, cfg.batch_size, cfg.eval_gate,
                                      cfg.eval_seed, cfg.images_per_pass))
                    for arch in todo[start + RANK:][:1]]
            stopping = stop.requested
            if WORLD > 1:
                everything = [None] * WORLD
                dist.all_gather_object(everything, (rows, stopping))
                rows = [row for part, _ in everything for row in part]
                stopping = any(asked for _, asked in everything)
            for arch, score in rows:
                scores[arch] = score
                csv.writer(file).writerow([arch_to_str(arch), *score])
            file.flush()
            if stopping:
                raise Interrupted("stopped while scoring: --resume continues")
    return scores


def run(cfg, resume=False, load="", given=()):
    """Check every input, then train, score, rank, search. Under torchrun rank 0 reads the data
    (and downloads it on first use) before the ranks meet, the others after it: one download."""
    cfg, checkpoint = settle_options(cfg, set(given), resume, load)
    check_config(cfg)
    device, out = use_machine(cfg), claim_out(cfg, resume)
    truth = load_ground_truth(cfg.nb201) if cfg.nb201 else None  # never seen by the search
    times, started = {}, time.monotonic()
    try:
        data = read_data(cfg, given) if RANK == 0 else None
        if WORLD > 1:  # gloo: ranks may share a GPU; wait out the longest training
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
        data = (data or read_data(cfg, given)).to(device)
        times["data_s"] = time.monotonic() - started
        model = build_model(cfg, data.num_classes, device)
        print(f"{out.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{len(data.train_labels):,} train / {len(data.heldout_labels):,} held-out images, "
              f"{device}, {str(precision(device))[6:]}", flush=True)
        if checkpoint:
            load_weights(model, checkpoint["model"], load)
            print("--load: no training, so no curve")
        if RANK == 0:  # from here the folder is the run's
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / "config.json", json.dumps(asdict(cfg), indent=2))
        train_supernet = fit_on_rank0 if WORLD > 1 else fit
        log = checkpoint["log"] if checkpoint else train_supernet(model, data, cfg, out, truth)
        times["train_s"] = sum(row["seconds"] for row in log or [])
        results = score_rank_search(model, data, cfg, out, truth, times)
        if WORLD > 1:  # leave together: a rank that left gloo while rank 0 searched has aborted
            dist.barrier()
        return results
    except KeyboardInterrupt:
        saved = (out / "config.json").exists()
        raise Interrupted("interrupted: " + ("--resume continues" if saved else
                                             "nothing was saved")) from None
    except torch.OutOfMemoryError:
        raise RunError(out_of_memory(device, cfg)) from None


def read_data(cfg, given):
    """load_dataset, and a --track-batches that its held-out split holds."""
    data = load_dataset(cfg)
    batches = math.ceil(len(data.heldout_labels) / cfg.batch_size)
    if "track_batches" in given and cfg.track_batches > batches:
        raise UsageError(f"--track-batches {cfg.track_batches}: the held-out split has "
                         f"{batches} batches of {cfg.batch_size}")
    return data


def out_of_memory(device, cfg):
    """What to do when one batch does not fit (a pass of many batches halves itself first)."""
    where = str(device)
    if device.type == "cuda":
        free, total = (size / 2**30 for size in torch.cuda.mem_get_info(device))
        where = f"{torch.cuda.get_device_name(device)}, {free:.1f} of {total:.1f} GiB free"
    return (f"out of GPU memory with one batch of --batch-size {cfg.batch_size} ({where}); the "
            f"checkpoint and scores so far are kept: free the GPU's memory and --resume, or "
            f"start again with a smaller --batch-size")


def score_rank_search(model, data, cfg, out, truth, times):
    started, (images, labels) = time.monotonic(), heldout_set(data, cfg)
    archs = seeded_archs(cfg.eval_archs, cfg.eval_seed)
    scores = score_archs(model, images, labels, cfg, archs, out / "scores.csv")
    if RANK > 0:
        return None
    times["score_s"] = time.monotonic() - started
    cifar10 = truth.accuracy["cifar10"] if truth else {}
    rows = [[arch_to_str(a), *scores[a], cifar10.get(a, "")] for a in archs]
    write_atomic(out / "scores.csv", csv_text(SCORE_FIELDS, rows))
    accuracies, ranking = [scores[a][0] for a in archs], None
    if truth and len(archs) > 1:
        ranking = ranking_metrics(accuracies, [cifar10[a] for a in archs])
    started, search, searched = time.monotonic(), None, dict(scores)
    if cfg.search_budget:
        search = search_with_supernet(model, images, labels, cfg, searched)
        best = search["best"]
        search["best"] = {"arch": arch_to_str(best), "oneshot_accuracy": searched[best][0],
                          "oneshot_loss": searched[best][1]}
        if truth:  # the found cell on each of NB201's datasets, as NAS papers report it
            search["best"]["nb201"] = {dataset: {"accuracy": truth.accuracy[dataset][best],
                                                 "rank": truth.rank[dataset][best]}
                                       for dataset in truth.accuracy}
        write_atomic(out / "search.json", json.dumps(search, indent=2))
    times["search_s"] = time.monotonic() - started
    results = {"run": out.name, "ranking": ranking, "search": search,
               "times": {key: round(value, 1) for key, value in times.items()},
               "scored_archs": len(archs), "mean_oneshot_accuracy": float(np.mean(accuracies)),
               "scoring_edges_per_block": edges_per_block(model, archs, cfg),
               "gate": gate_health(model, probe_archs()), "heldout_images": len(labels),
               "device": str(images.device), "precision": str(precision(images.device))[6:],
               "threads": torch.get_num_threads()}
    write_atomic(out / "metrics.json", json.dumps(results, indent=2))
    print_summary(out, results)
    if importlib.util.find_spec("matplotlib"):
        plot_run(out)
    else:
        print(f"no matplotlib: no ranking.png (pip install matplotlib; close.py --plot {out})")
    return results


def edges_per_block(model, archs, cfg):
    """How many routed edges of `archs` each block scores."""
    blocks = []
    with evaluating(model):
        for arch in archs:
            assignment = model.sharing_assignment(arch, cfg.eval_gate, cfg.eval_seed)
            blocks += [assignment.blocks[e] for e in routed_edges(arch)]
    return np.bincount(blocks, minlength=model.num_blocks).tolist()


def describe_gate(health):
    """gate_health in words ('' without a GATE at work): BLIND, its routing barely depends on the
    arch; COLLAPSED, one block is the likeliest for every edge."""
    if health["spread"] is None:
        return ""
    verdict = [word for word, bad in (("BLIND", health["spread"] < GATE_BLIND_SPREAD),
                                      ("COLLAPSED", health["off_dominant"] < GATE_COLLAPSED_SHARE))
               if bad]
    return f"GATE {' and '.join(verdict) or 'routes by arch'} (spread {health['spread']:.2g})"


def print_summary(out, results):
    print(f"\n== {results['run']} ({out}) ==")
    gate = results["gate"]
    if gate["spread"] is not None:
        print(describe_gate(gate))
        print(f"  spread: std of its logits between archs (<{GATE_BLIND_SPREAD}: blind)\n"
              f"  likeliest block: one block for {1 - gate['off_dominant']:.0%} of the edges\n"
              f"  draws: {gate['entropy']:.0%} as random as a uniform pick (entropy)\n"
              f"  scoring (--eval-gate): edges per block {results['scoring_edges_per_block']}")
    if curve := read_curve(out):
        names = CURVE_FIELDS[1:7] if results["ranking"] else CURVE_FIELDS[1:4]
        print(f"curve ({out / 'curve.csv'}):")
        print_table("epoch", [p["epoch"] for p in curve],
                    [(name, {p["epoch"]: p[name] for p in curve}) for name in names])
    print_metrics_table([results])
    if search := results["search"]:
        print(f"search ({search['strategy']}, {search['budget']} evaluations) found "
              f"{search['best']['arch']}")


def read_curve(folder):
    """The points of curve.csv ([] without one)."""
    path = Path(folder) / "curve.csv"
    rows = list(csv.DictReader(path.read_text().splitlines())) if path.exists() else []
    return [{key: None if text == "" else int(text) if key in ("epoch", "level") else float(text)
             for key, text in row.items()} for row in rows]


def finished_run(folder):
    """A finished run's metrics, options (defaults for those it predates), folder and curve."""
    try:
        run = json.loads((Path(folder) / "metrics.json").read_text())
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        run = config = None
    if not (isinstance(run, dict) and "ranking" in run and isinstance(config, dict)):
        raise UsageError(f"{folder} is not a finished run (no metrics.json and config.json "
                         f"written by close.py)")
    return {**run, "run": Path(folder).name, "config": asdict(Config()) | config,
            "folder": Path(folder), "curve": read_curve(folder)}


def found_cell(run, dataset):
    """The NB201 accuracy and rank on `dataset` of the cell a run found ({}: none)."""
    return ((run["search"] or {}).get("best") or {}).get("nb201", {}).get(dataset, {})


def print_table(corner, rows, columns):
    """`columns`: (name, {row: value}) pairs, printed side by side; floats with 3 decimals, '-'
    where a column has no value."""
    def text(value):
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    columns = [(name, [text(values.get(row)) for row in rows]) for name, values in columns]
    label = 2 + max(len(str(row)) for row in [corner, *rows])
    widths = [2 + max(len(name), *map(len, texts)) for name, texts in columns]
    print(f"{corner:{label}s}" + "".join(f"{n:>{w}s}" for (n, _), w in zip(columns, widths)))
    for i, row in enumerate(rows):
        print(f"{row!s:{label}s}" + "".join(f"{t[i]:>{w}s}" for (_, t), w in zip(columns, widths)))


def print_metrics_table(runs):
    """Finished runs side by side (the summary, --compare)."""
    rows = list(SUMMARY_METRICS) if any(run["ranking"] for run in runs) else []
    rows += ["mean one-shot"] + [f"found {d}" for d in NB201_DATASETS
                                 if any(found_cell(run, d) for run in runs)] + ["train, score"]
    columns = []
    for run in runs:
        column = dict(run["ranking"] or {}) | {
            "mean one-shot": f"{run['mean_oneshot_accuracy']:.1f}%",
            "train, score": ", ".join(duration(run["times"][k]) for k in ("train_s", "score_s"))}
        for dataset in NB201_DATASETS:
            if cell := found_cell(run, dataset):
                column[f"found {dataset}"] = f"{cell['accuracy']:.2f}% #{cell['rank']:,}"
        columns.append((run["run"], column))
    print_table("", rows, columns)
    if ranked := [run["ranking"] for run in runs if run["ranking"]]:
        print(f"({ranked[0]['n']:,} archs; P@top/bottom K: share of the predicted top/bottom K% "
              f"that truly are; BR/WR@5%: best/worst true rank in the predicted top 5%)")
    if any(found_cell(run, "cifar10") for run in runs):
        print("(found: the search's cell, its NB201 test accuracy and rank among the 6,466)")


# A vanilla and a CLOSE run pair when only these options differ (vanilla has no blocks or GATE).
UNPAIRED_OPTIONS = ("seed", "baseline", "blocks", "eval_gate", "out", "device", "threads",
                    "images_per_pass", "track_every")
PAIRED_METRICS = ("kendall_tau", "spearman", "P@top5%")


def compare(runs):
    """--compare: the runs side by side, their curves, and CLOSE - vanilla paired by seed."""
    print_metrics_table(runs)
    curved = [run for run in runs if run["curve"]]
    metric = "kendall_tau" if any(run["ranking"] for run in curved) else "mean_oneshot_accuracy"
    if curved:
        print(f"\n{metric} during training (curve.csv):")
        epochs = sorted({point["epoch"] for run in curved for point in run["curve"]})
        print_table("epoch", epochs, [(run["run"], {p["epoch"]: p[metric] for p in run["curve"]})
                                      for run in curved])
    if len(curved) < len(runs):
        print(f"no curve: {', '.join(run['run'] for run in runs if not run['curve'])}")
    for pairs in pair_by_seed(runs):
        print_paired_differences(pairs)
    if curved and importlib.util.find_spec("matplotlib"):
        names = ("kendall_tau", "P@top5%") if metric == "kendall_tau" else (metric,)
        print(f"\ncurves drawn in {plot_comparison(curved, names)}")


def pair_by_seed(runs):
    """Groups of runs whose options differ only in UNPAIRED_OPTIONS, each {seed: (vanilla,
    CLOSE)}; says which runs do not pair."""
    groups, unpaired = {}, []
    for run in runs:
        options = {k: v for k, v in run["config"].items() if k not in UNPAIRED_OPTIONS}
        seeds = groups.setdefault(json.dumps(options, sort_keys=True), {})
        seeds.setdefault(run["config"]["seed"], []).append(run)
    for seeds in groups.values():
        for seed, group in list(seeds.items()):
            kinds = [[run for run in group if run["config"]["baseline"] is vanilla]
                     for vanilla in (True, False)]
            for kind, same in zip(("vanilla", "CLOSE"), kinds):
                if len(same) > 1:
                    print(f"seed {seed} has {len(same)} {kind} runs with the same options "
                          f"({', '.join(run['run'] for run in same)}): none of them pairs")
            if [len(same) for same in kinds] == [1, 1] and all(run["ranking"] for run in group):
                seeds[seed] = (kinds[0][0], kinds[1][0])
            else:
                unpaired += [run["run"] for run in seeds.pop(seed)]
    if unpaired and len({run["config"]["baseline"] for run in runs}) == 2:
        print(f"not paired (no run of the other kind with the same seed and options, or no "
              f"--nb201): {', '.join(unpaired)}")
    return [seeds for seeds in groups.values() if seeds]


def print_paired_differences(pairs):
    """CLOSE - vanilla, seed by seed: the final metrics, then the curve at each tracked epoch
    that both runs have; with their mean, sd and a paired t-test."""
    def final(run):
        return [run["ranking"][name] for name in PAIRED_METRICS] + [
            found_cell(run, "cifar10").get("accuracy", np.nan)]

    print(f"\nCLOSE - vanilla, paired by seed ({len(pairs)} pair{'s' * (len(pairs) > 1)}, the "
          f"same other options):")
    print_differences(pairs, PAIRED_METRICS + ("found CIFAR-10",), final)
    epochs = sorted({p["epoch"] for pair in pairs.values() for run in pair for p in run["curve"]})
    for metric in ("kendall_tau", "P@top5%") if epochs else ():
        print(f"\nCLOSE - vanilla {metric} during training, paired by seed:")
        print_differences(pairs, epochs, lambda run: [
            next((p[metric] for p in run["curve"] if p["epoch"] == e), np.nan) for e in epochs])
    if len(pairs) < 3:
        print("(fewer than 3 pairs: the mean, sd and p say nothing yet)")


def print_differences(pairs, rows, values):
    """A column per seed of CLOSE - vanilla in each row (values(run) gives the run's row values),
    then their mean, sd and paired t-test p over the seeds that have the row."""
    vanilla, closenet = (np.array([values(pair[side]) for pair in pairs.values()], dtype=float)
                         for side in (0, 1))
    differences = closenet - vanilla  # (pairs, rows), NaN where a run has no value
    columns = [(f"seed {seed}", row) for seed, row in zip(pairs, differences)]
    with warnings.catch_warnings():  # NaN where a row has too few pairs
        warnings.simplefilter("ignore")
        columns += [("mean", np.nanmean(differences, 0))]
        if len(pairs) > 1:
            columns += [("sd", np.nanstd(differences, 0, ddof=1)),
                        ("p", scipy.stats.ttest_rel(closenet, vanilla, nan_policy="omit").pvalue)]
    form = {"sd": "{:.3f}", "p": "{:.3f}"}
    print_table("epoch" if isinstance(rows[0], int) else "", rows, [
        (name, {row: None if np.isnan(v) else form.get(name, "{:+.3f}").format(v)
                for row, v in zip(rows, values)}) for name, values in columns])


def pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    plt.switch_backend("Agg")
    return plt


def draw_curves(axes, runs, names):
    """Each of `names` by epoch in a panel of its own: each kind's mean over its runs (several
    runs: each faint behind), the curriculum's growths marked."""
    for axis, name in zip(axes, names):
        for color, kind, baseline in (("C0", "vanilla", True), ("C1", "CLOSE", False)):
            curves = [{p["epoch"]: np.nan if p[name] is None else p[name] for p in run["curve"]}
                      for run in runs if run["config"]["baseline"] is baseline]
            for curve in curves if len(curves) > 1 else ():
                axis.plot(list(curve), list(curve.values()), color=color, alpha=0.25)
            if epochs := sorted(set.intersection(*map(set, curves))) if curves else []:
                axis.plot(epochs, [np.mean([c[e] for c in curves]) for e in epochs], "o-",
                          color=color, label=kind + f", mean of {len(curves)}" * (len(curves) > 1))
        if cfg := next((run["config"] for run in runs if not run["config"]["baseline"]), None):
            for level in range(2, cfg["blocks"] + 1):  # as in curriculum_level
                epoch = math.ceil((level - 1) * cfg["epochs"] / cfg["blocks"])
                axis.axvline(epoch, color="gray", linestyle=":")
                axis.annotate(f"level {level}", (epoch, 0), xycoords=("data", "axes fraction"))
        axis.set(xlabel="epochs trained", ylabel=name)
        axis.legend()


def plot_run(out):
    """ranking.png: one-shot vs NB201 accuracy (without --nb201, how the one-shot scores spread),
    then the curve: Kendall tau and P@top5% (or mean one-shot accuracy) by epoch."""
    plt, run = pyplot(), finished_run(out)
    names = () if not run["curve"] else ("kendall_tau", "P@top5%") if run["ranking"] else (
        "mean_oneshot_accuracy",)
    figure, axes = plt.subplots(1, 1 + len(names), figsize=(5.5 + 5 * len(names), 4.5),
                                squeeze=False)
    scores = list(csv.DictReader(open(out / "scores.csv")))
    oneshot = [float(row["oneshot_accuracy"]) for row in scores]
    if all(row["nb201_accuracy"] for row in scores):
        axes[0, 0].scatter([float(row["nb201_accuracy"]) for row in scores], oneshot, s=8)
        axes[0, 0].set(xlabel="NB201 CIFAR-10 accuracy (%)", ylabel="one-shot accuracy (%)")
    else:
        axes[0, 0].hist(oneshot, bins=30)
        axes[0, 0].set(xlabel="one-shot accuracy (%)", ylabel="archs")
    axes[0, 0].set_title(out.name)
    draw_curves(axes[0, 1:], [run], names)
    figure.savefig(out / "ranking.png", dpi=120, bbox_inches="tight")
    plt.close(figure)


PICTURE_MARK = "close.py --compare"


def plot_comparison(runs, names):
    """--compare's curves into compare.png beside the runs, or compare-N.png where a file that
    close.py did not write is in the way."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    draw_curves(axes[0], runs, names)
    folder = Path(os.path.commonpath([run["folder"].resolve().parent for run in runs]))
    for n in itertools.count(1):
        path = folder / ("compare.png" if n == 1 else f"compare-{n}.png")
        if not path.exists() or PICTURE_MARK.encode() in path.read_bytes():
            break
    figure.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": PICTURE_MARK})
    plt.close(figure)
    return path


def benchmark(cfg, steps, rounds=5):
    """ms per training step, vanilla vs CLOSENet at each level (the same 8 archs and batch), and s
    per arch scoring 40 batches (vanilla, last level): medians of 5 rounds taking turns."""
    from torch.utils.benchmark import Measurement, Timer
    device = use_machine(cfg)
    torch.manual_seed(cfg.seed)
    archs = itertools.cycle(random.Random(0).sample(
        [arch for arch in unique_archs() if routed_edges(arch)], 8))
    data = synthetic_dataset(cfg.batch_size, 40 * cfg.batch_size, seed=cfg.seed).to(device)
    images, heldout = (normalize(x).contiguous(memory_format=MEMORY_FORMAT)
                       for x in (data.train_images, data.heldout_images))
    calls, closenet = {}, CLOSENet(cfg.channels, cfg.cells, cfg.blocks)
    for key in ["vanilla"] + [f"close_level{level}" for level in range(1, cfg.blocks + 1)]:
        net = CLOSENet(cfg.channels, cfg.cells, baseline=True) if key == "vanilla" else closenet
        net = copy.deepcopy(net).to(device, memory_format=MEMORY_FORMAT)
        optimizer = make_optimizer(net, cfg)[0]
        calls[key] = steps, lambda net=net, optimizer=optimizer: train_step(
            net.train(), optimizer, images, data.train_labels, next(archs), cfg.grad_clip)
        if key in ("vanilla", f"close_level{cfg.blocks}"):
            calls[f"{key}_score"] = 1, lambda net=net: score_arch(
                net, next(archs), heldout, data.heldout_labels, cfg.batch_size,
                images_per_pass=cfg.images_per_pass)
        if key != "vanilla" and closenet.level < cfg.blocks:
            add_glow_block(closenet)
    measurements = [Timer("call()", globals={"call": call}, label=key,
                          num_threads=torch.get_num_threads()).timeit(number)
                    for _ in range(rounds) for key, (number, call) in calls.items()]
    return report_benchmark(Measurement.merge(measurements), cfg, device, len(heldout))


def report_benchmark(measurements, cfg, device, score_images):
    results = {"device": str(device), "torch": torch.__version__, "batch_size": cfg.batch_size,
               "score_images": score_images, "precision": str(precision(device))[6:]}
    for measurement in measurements:
        key, median, iqr = measurement.label, measurement.median, measurement.iqr
        if key.endswith("_score"):
            results.update({f"{key}_s_per_arch": median, f"{key}_iqr_s": iqr})
            print(f"{key:19s}{median:7.3f} s per arch (IQR {iqr:.3f}) on {score_images:,} images")
        else:
            ratio = 1000 * median / results.setdefault("vanilla_ms_per_step", 1000 * median)
            results.update({f"{key}_ms_per_step": 1000 * median, f"{key}_iqr_ms": 1000 * iqr,
                            f"{key}_ratio": ratio})
            print(f"{key:13s}{1000 * median:9.1f} ms per step (IQR {1000 * iqr:.1f})  "
                  f"{ratio:.2f}x vanilla")
    (out := Path(cfg.out or "runs")).mkdir(parents=True, exist_ok=True)
    write_atomic(out / "benchmark.json", json.dumps(results, indent=2))
    print(f"{device}, batch {cfg.batch_size}, {results['precision']}: written to "
          f"{out / 'benchmark.json'}")
    return results


# --------------------------------------
# 9. Command line
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad input
        raise UsageError(message)


def parse_args(argv=None):
    """Config, the other arguments, and the options typed (a resumed run takes the others)."""
    parser = ArgumentParser(
        description="CLOSE on NAS-Bench-201: train a CLOSENet supernet, score archs, search.",
        epilog="NB201 files other than the compact CSV are pickles: loading one runs code from "
               "it, so use only files you trust.")
    for option in fields(Config):
        hidden = option.default == "" or isinstance(option.default, bool)  # flags, no value
        shown = "" if hidden else f" (default: {option.default})"
        kind = ({"action": "store_true"} if isinstance(option.default, bool) else
                {"type": type(option.default), "choices": option.metadata["choices"]})
        parser.add_argument("--" + option.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=option.metadata["help"] + shown, **kind)
    for flag, text, kind in (
            ("--resume", "continue the run in --out with its options", {"action": "store_true"}),
            ("--load", "no training: score and search the supernet in CKPT", {"metavar": "CKPT"}),
            ("--compare", "print finished runs' metrics and curves side by side, CLOSE - "
             "vanilla paired by seed", {"nargs": "+"}),
            ("--plot", "draw RUN/ranking.png (needs matplotlib)", {"metavar": "RUN"}),
            ("--benchmark", "time training steps, vanilla and CLOSENet at each level, and "
             "scoring", {"action": "store_true"}),
            ("--benchmark-steps", "timed calls per configuration and round (default: 4)",
             {"type": int, "default": 4})):
        parser.add_argument(flag, help=text, **kind)
    args = parser.parse_args(argv)
    given = [option.name for option in fields(Config) if hasattr(args, option.name)]
    return Config(**{name: getattr(args, name) for name in given}), args, given


def main(argv=None):
    if RANK > 0:  # under torchrun rank 0 alone prints
        sys.stdout = open(os.devnull, "w")
    try:
        cfg, args, given = parse_args(argv)
        if args.compare:
            compare([finished_run(folder) for folder in args.compare])
        elif args.plot:
            finished_run(args.plot)  # or a one-line error
            plot_run(Path(args.plot))
        elif args.benchmark:
            check_config(cfg)
            benchmark(cfg, args.benchmark_steps)
        else:
            run(cfg, args.resume, args.load, given)
    except UsageError as error:
        print(f"close.py: error: {error}", file=sys.stderr if RANK == 0 else sys.stdout)
        return 2
    except (RunError, Interrupted, KeyboardInterrupt) as error:
        print(f"close.py: {error or 'interrupted'}", file=sys.stderr if RANK == 0 else sys.stdout)
        return 1 if isinstance(error, RunError) else 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    STOP_SIGNALS.append(signal.SIGTERM)  # a killed job stops like Ctrl-C
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # which raises KeyboardInterrupt
    sys.exit(main())
