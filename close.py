"""CLOSE: Curriculum Learning On the Sharing Extent (Zhou et al., ECCV 2022) on NAS-Bench-201.

Sections 1-7 are the method in the paper's order; 8-9 run it once:

    python close.py --epochs 250 --device cuda --nb201 nb201.csv  # train, score all archs, search
    python close.py --baseline --epochs 250 --device cuda --nb201 nb201.csv  # vanilla supernet
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
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
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import scipy.stats
import torch
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
    data: str = option("cifar10", "cifar10 (downloaded), synthetic, or DATA/train/<class>/<image>")
    data_root: str = option("data", "where torchvision keeps CIFAR-10")
    train_subset: int = option(0, "train on a seeded subset of N images (0: all)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto")
    threads: int = option(0, "CPU threads (0: torch's default)")
    # scoring and search
    eval_gate: str = option("sample", "scoring's blocks: a seeded draw per arch (official), or "
                            "the argmax", ("sample", "argmax"))
    eval_archs: int = option(0, "score a seeded subset of N unique archs (0: all 6,466)")
    eval_batches: int = option(0, "score on the first N held-out batches (0: all)")
    eval_seed: int = option(0, "seed of the arch subsets and of scoring's draws")
    images_per_pass: int = option(0, "images per scoring pass (0: 40 batches on a GPU, 1 on a "
                                  "CPU)")
    track_every: int = option(-1, "score the tracked archs every N epochs and after the last "
                              "(-1: epochs // 10; 0: never)")
    track_archs: int = option(200, "unique archs tracked during training (by --eval-seed)")
    track_batches: int = option(10, "held-out batches that score them")
    search: str = option("evolution", "search strategy", ("evolution", "random", "reinforce"))
    search_budget: int = option(1000, "fitness evaluations of the search (0: no search)")
    population: int = option(50, "population of the evolutionary search")
    tournament: int = option(10, "tournament size of the evolutionary search")
    nb201: str = option("", "NB201 accuracies, to rank against (see nb201_api_slim.py)")
    out: str = option("", "output folder (default: runs/<named by the options>)")


# The rest of the official recipe, fixed.
HELDOUT_FRACTION = 0.2  # of CIFAR-10's training images: 40,000 train the supernet, 10,000 score
CROP_PADDING = 4  # augmentation: a random 32x32 crop of the image padded by 4, and a flip
HEAD_DROPOUT = 0.1  # before the classifier
GATE_WIDTHS = {"embedding": 48, "hidden": 96, "graph_layers": (128,) * 5, "mlp": (200,) * 3}
GATE_DROPOUT = 0.1  # after each hidden layer of the GATE's MLP
GUMBEL_TEMPERATURE = 5.0  # the forward draw is argmax(logits + Gumbel) whatever it is
PLATEAU_PATIENCE = 30 / 1000  # of the epochs: lr halves after 30 of 1,000 without a lower loss
PLATEAU_FACTOR, PLATEAU_THRESHOLD = 0.5, 1e-4  # the halving, and "lower" by this share at least
RESTART_FRACTION = 0.4  # of the epochs: the learning-rate restart, officially at epoch 401


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
    return "+".join("|" + "|".join(node) + "|" for node in (ops[:1], ops[1:3], ops[3:]))


def str_to_arch(text):
    """The inverse of arch_to_str; else a ValueError."""
    ops = text.replace("|+|", "|").strip("|").split("|") if isinstance(text, str) else []
    ops = [op.partition("~")[0] for op in ops]
    if len(ops) != len(EDGES) or not set(ops) <= set(OPS) or arch_to_str(
            [OPS.index(op) for op in ops]) != text:
        raise ValueError(f"not an NB201 architecture string: {text!r} (expected {ARCH_FORMAT}, "
                         f"each op one of {', '.join(OPS)})")
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


# --------------------------------------
# 2. Data: uint8 images resident on the device, augmented there in whole batches
CIFAR10_MEAN = (0.49139968, 0.48215827, 0.44653124)
CIFAR10_STD = (0.24703233, 0.24348505, 0.26158768)


@dataclass
class Dataset:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_labels: torch.Tensor  # int64 [N]
    heldout_images: torch.Tensor
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


def normalize(images):
    """uint8 -> float, CIFAR-10 mean/std normalisation."""
    return TF.normalize(images.float().div_(255), CIFAR10_MEAN, CIFAR10_STD)


def augment(images):
    """Random crop of the zero-padded image and flip, drawn per image: one gather."""
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
# The paper's GLOW blocks are GlowBlock (a cell's pool: glow_blocks), its sharing assignment
# SharingAssignment, its GATE Gate; the sharing extent shrinks as `level` (active blocks) rises.
class GlowBlock(nn.Module):
    """One set of weights for a cell's parameterised ops; each cell owns K."""

    def __init__(self, channels):
        super().__init__()
        self.conv1x1 = nn.Conv2d(channels, channels, 1, bias=False)  # for PyTorch's default init
        self.conv3x3 = nn.Conv2d(channels, channels, 3, bias=False)

    def weight(self, op):
        if op not in (CONV1X1, CONV3X3):
            raise ValueError(f"{OPS[op]} has no weights in a GLOW block")
        return self.conv1x1.weight if op == CONV1X1 else self.conv3x3.weight


@dataclass
class SharingAssignment:
    """The GLOW block of each edge, the same in every cell: fixed `blocks` (6 ints), or the GATE's
    training draw `gate` (6, level), one-hot forward and soft backward, and its argmax `chosen`."""
    blocks: list[int] | None = None
    gate: torch.Tensor | None = None
    chosen: torch.Tensor | None = None


FUSED_UNCHOSEN_BLOCKS = True  # False: glow_op computes the paper's sum as written


def glow_op(x, op, edge, glow_blocks, assignment, batch_size=None):
    """The paper's edge output: sum_i gate_i * block_i(x) over the active blocks, the gate one-hot
    forward (straight-through). A fixed assignment runs the named block alone."""
    if assignment.gate is None:
        return relu_conv_bn(x, glow_blocks[assignment.blocks[edge]].weight(op), batch_size)
    if FUSED_UNCHOSEN_BLOCKS:
        return fused_glow_op(x, op, edge, glow_blocks, assignment, batch_size)
    return sum(g * relu_conv_bn(x, block.weight(op), batch_size)  # all with autograd (official)
               for g, block in zip(assignment.gate[edge], glow_blocks))


def fused_glow_op(x, op, edge, glow_blocks, assignment, batch_size=None):
    """glow_op's sum, the same, faster: only the chosen block needs autograd (the others' gate is
    0); their values, for the gate's gradient <dL/d out, block_i(x)>, come from one conv."""
    gate = assignment.gate[edge]  # (level,)
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

    def forward(self, x, live, assignment, batch_size=None):
        """live: the arch's live edges as (edge, from, to, op), in EDGES' order (by target)."""
        nodes = [x]
        for node in (1, 2, 3):
            terms = [self.edge_output(nodes[src], edge, op, assignment, batch_size)
                     for edge, src, dst, op in live if dst == node]
            nodes.append(sum(terms) if terms else None)  # live edges never read a None
        return torch.zeros_like(x) if nodes[3] is None else nodes[3]

    def edge_output(self, x, edge, op, assignment, batch_size):
        if op in (CONV1X1, CONV3X3):
            return glow_op(x, op, edge, self.glow_blocks, assignment, batch_size)
        return x if op == SKIP else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


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
    """A GATES-style graph encoder of the arch, then per edge an MLP: a logit per block. Node 0
    starts learned, nodes 1-3 at zero; node j sends W h_j to node i, gated by edge j->i's op."""

    def __init__(self, num_blocks, sizes=GATE_WIDTHS, dropout=GATE_DROPOUT):
        super().__init__()
        embedding, hidden = sizes["embedding"], sizes["hidden"]
        self.op_embedding = nn.Embedding(len(OPS), embedding)
        self.input_node_embedding = nn.Parameter(torch.randn(embedding))
        self.lift = nn.Linear(embedding, hidden)
        widths = (hidden,) + tuple(sizes["graph_layers"])
        self.messages = nn.ModuleList(nn.Linear(a, b, bias=False)
                                      for a, b in zip(widths, widths[1:]))
        for message in self.messages:  # officially U(+-1/sqrt(width out)), not nn.Linear's width in
            bound = message.out_features ** -0.5
            nn.init.uniform_(message.weight, -bound, bound)
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
        """Active blocks, the curriculum level; those beyond are frozen (not their GATE rows)."""
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
        """(6, level) for an arch, (N, 6, level) for N; fp32, as bf16's rounding is larger than a
        fresh GATE's signal."""
        try:
            ops = torch.tensor(as_arch(archs))  # (6,)
        except ValueError:  # not an arch: a list of them
            ops = torch.tensor([as_arch(arch) for arch in archs]).view(-1, len(EDGES))
        device = self.gate.edge_src.device
        with torch.autocast(device.type, enabled=False):
            return self.gate(ops.to(device, non_blocking=True))[..., :self.level]

    def sharing_assignment(self, arch, eval_gate="sample", seed=0):
        """Vanilla: edge e on block e; level 1: block 0; training: a Gumbel draw from the GATE;
        scoring (eval mode): a draw seeded by `seed` and the arch (official), or the argmax."""
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
        arch = as_arch(arch)  # checked here, once for all cells
        assignment = assignment or self.sharing_assignment(arch)
        live = [(edge, src, dst, op) for edge, ((src, dst), op, on)
                in enumerate(zip(EDGES, arch, live_edges(arch))) if on]
        x = self.stem(images, batch_size)
        for layer in self.layers:
            x = (layer(x, live, assignment, batch_size) if isinstance(layer, Cell)
                 else layer(x, batch_size))
        return self.head(x, batch_size)

    def get_extra_state(self):  # the level travels with the weights in state_dict()
        return {"level": self.level}

    def set_extra_state(self, state):
        self.level = state["level"]


# What the concepts above run on: memory layout, precision, batch norm per batch.
MEMORY_FORMAT = torch.channels_last  # faster for these small convolutions on CPU and GPU


def precision(device):
    """bf16 where the GPU has it natively (compute capability 8 and up), else fp32: older GPUs
    only emulate bf16, and a CPU gains nothing."""
    native = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    return torch.bfloat16 if native else torch.float32


def autocast(device):
    bf16 = precision(device) == torch.bfloat16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# BN uses batch statistics (the one-shot protocol) and keeps no running ones. A scoring pass of
# many batches normalises each alone, as a pass per batch would: forwards take `batch_size`.
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


def build_model(cfg, num_classes, device):
    torch.manual_seed(cfg.seed)  # training draws from torch's generators only
    model = CLOSENet(cfg.channels, cfg.cells, cfg.blocks, num_classes, cfg.baseline)
    return model.to(device, memory_format=MEMORY_FORMAT)


# --------------------------------------
# 4. Curriculum on the sharing extent
def curriculum_level(epoch, epochs, num_blocks):
    """Active blocks at 0-based `epoch`: one more every epochs/K (officially 200 of 1,000)."""
    return min(num_blocks, 1 + epoch * num_blocks // epochs)


def restart_epoch(epochs):
    """The 0-based epoch that restarts the learning rate: a new optimizer at --lr, no momentum, a
    new plateau count (officially epoch 401 of 1,000; no other growth restarts)."""
    return int(RESTART_FRACTION * epochs)


@torch.no_grad()
def add_glow_block(model):
    """WIT, in place: as the official code (not the paper's copy), the new block's fresh init and
    its GATE logit row get the parent's added; exact copies would give the GATE no gradient."""
    if model.level == model.num_blocks:
        raise ValueError(f"add_glow_block: all {model.num_blocks} blocks are at work already")
    new = model.level
    for cell in model.cells():
        parent = cell.glow_blocks[new - 1].parameters()
        for inherited, weight in zip(cell.glow_blocks[new].parameters(), parent):
            inherited.add_(weight)
    for row in (model.gate.mlp[-1].weight, model.gate.mlp[-1].bias):
        row[new] += row[new - 1]
    model.level = new + 1


# --------------------------------------
# 5. Training (the official recipe, scaled to --epochs)
def make_optimizer(model, cfg):
    """SGD over everything, the GATE included, one weight decay for all (official); the plateau
    schedule."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    optimizer.register_step_pre_hook(zero_missing_grads)
    patience = max(1, round(PLATEAU_PATIENCE * cfg.epochs))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=PLATEAU_FACTOR, patience=patience, threshold=PLATEAU_THRESHOLD)
    return optimizer, scheduler


def zero_missing_grads(optimizer, *_):
    """Officially gradients are zeroed, never dropped, so SGD decays and moves an op that the step's
    arch does not use; torch 2 drops them, so each trainable parameter without one gets a zero. The
    frozen blocks beyond the level join with their level (officially at first use)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)


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
    for step in range(steps):
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
    """Each epoch: WIT up to the curriculum level, the restart, a pass, the plateau step."""
    for epoch in range(state.epoch, cfg.epochs):
        while model.level < curriculum_level(epoch, cfg.epochs, model.num_blocks):
            add_glow_block(model)
        if epoch == restart_epoch(cfg.epochs) > 0:
            state.optimizer, state.scheduler = make_optimizer(model, cfg)
        started, lr = time.monotonic(), state.optimizer.param_groups[0]["lr"]
        finished = train_epoch(model, state.optimizer, data, cfg)
        loss = sum(finished["losses"].tolist()) / finished["images"]  # the epoch's mean
        state.scheduler.step(loss)
        state.epoch = epoch + 1
        epoch_done(finished | {"loss": loss, "lr": lr, "seconds": time.monotonic() - started})


# --------------------------------------
# 6. Evaluation: one-shot scores and ranking metrics
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
    """One-shot accuracy (%) and loss of arch, means over batches; dropout off, BN on each batch's
    statistics. images_per_pass (whole batches) go through at once (0: 40 batches on a GPU, where
    launches cost; 1 on a CPU, where cache misses do), the last, smaller batch alone."""
    if images_per_pass % batch_size:
        raise ValueError(f"images per pass ({images_per_pass}) must be 0 or a multiple of the "
                         f"batch size ({batch_size})")
    step = images_per_pass or batch_size * (40 if images.device.type == "cuda" else 1)
    whole = len(labels) - len(labels) % batch_size
    passes = [(start, min(start + step, whole), batch_size) for start in range(0, whole, step)]
    passes += [(whole, len(labels), len(labels) - whole)] if whole < len(labels) else []
    arch, accuracies, losses = as_arch(arch), [], []
    with evaluating(model):
        assignment = model.sharing_assignment(arch, eval_gate, seed)
        for start, end, group in passes:
            with autocast(images.device):  # bf16 on a recent GPU
                logits = model(images[start:end], arch, assignment, group).double()
            logits, y = logits.unflatten(0, (-1, group)), labels[start:end].view(-1, group)
            accuracies.append((logits.argmax(-1) == y).double().mean(1) * 100)
            losses.append(F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1))
    return torch.cat(accuracies).mean().item(), torch.cat(losses).mean().item()


def descending_ranks(values):
    """Rank 0 = the highest value; ties share their best rank."""
    return scipy.stats.rankdata(-np.asarray(values, dtype=float), method="min").astype(int) - 1


def ranking_metrics(predicted, truth, ratios=(0.01, 0.05, 0.1, 0.5)):
    """k = int(N * ratio); P@topK: share of the predicted top-k in the true top-k (P@bottomK
    likewise); BR/WR@K: 1 + best/worst true rank among them."""
    predicted, truth, n = np.asarray(predicted, float), np.asarray(truth, float), len(predicted)
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


# --------------------------------------
# 7. Search: regularized evolution, random search, REINFORCE (NB201's classic three)
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
    oldest member leaves. Returns the best arch, its fitness and the (arch, fitness) history."""
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


def reinforce(fitness, budget, seed=0, learning_rate=0.001, momentum=0.9):
    """REINFORCE as NB201 runs it: 6 x 5 op logits, 1e-3 * N(0, 1) at first; per evaluation a cell
    drawn from them, then an Adam step on -(fitness - baseline) * log p(cell), the baseline the
    fitnesses' moving average (`momentum`, bias-corrected, this one included)."""
    generator = torch.Generator().manual_seed(seed)
    logits = (1e-3 * torch.randn(len(EDGES), len(OPS), generator=generator)).requires_grad_()
    optimizer = torch.optim.Adam([logits], lr=learning_rate)
    history, average, weight = [], 0.0, 0.0
    for _ in range(budget):
        log_p = logits.log_softmax(-1)  # (6 edges, 5 ops)
        ops = torch.multinomial(log_p.detach().exp(), 1, generator=generator)  # (6, 1)
        arch = tuple(ops[:, 0].tolist())
        history.append((arch, fitness(arch)))
        average = momentum * average + (1 - momentum) * history[-1][1]
        weight = momentum * weight + (1 - momentum)  # average / weight: the unbiased mean
        loss = -(history[-1][1] - average / weight) * log_p.gather(1, ops).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    best = max(history, key=lambda member: member[1])
    return best[0], best[1], history


def search_with_supernet(model, images, labels, cfg, scores):
    """--search on one-shot accuracy (never the truth), scoring into `scores` on demand."""
    def fitness(arch):
        arch = canonical(arch)
        if arch not in scores:
            scores[arch] = score_arch(model, arch, images, labels, cfg.batch_size, cfg.eval_gate,
                                      cfg.eval_seed, cfg.images_per_pass)
        return scores[arch][0]

    if cfg.search == "evolution":
        best, _, history = regularized_evolution(fitness, cfg.search_budget, cfg.population,
                                                 cfg.tournament, cfg.seed)
    else:
        search = random_search if cfg.search == "random" else reinforce
        best, _, history = search(fitness, cfg.search_budget, cfg.seed)
    return {"strategy": cfg.search, "best": canonical(best), "budget": cfg.search_budget,
            "unique_evaluated": len({canonical(arch) for arch, _ in history})}


# --------------------------------------
# 8. One run: options, data, the curve, resume, outputs; runs compared and drawn
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


class UsageError(Exception):
    """Bad input: one line and exit code 2, before anything is written."""


class RunError(Exception):
    """A run that cannot go on: one line and exit code 1, its checkpoint and scores kept."""


class Interrupted(RunError):
    """Ctrl-C or SIGTERM: exit code 130."""


# What --resume DIR and --load CKPT may set anew: where and how fast the run goes, and the search.
RESETTABLE = ("device", "threads", "images_per_pass", "data_root", "search", "search_budget",
              "population", "tournament")
NB201_DATASETS = ("cifar10", "cifar100", "ImageNet16-120")  # the supernet trains on CIFAR-10
LOG_FIELDS = ("epoch", "level", "lr", "loss", "accuracy", "seconds", "images_per_s", "gate_spread")
SCORE_FIELDS = ("arch", "oneshot_accuracy", "oneshot_loss", "nb201_accuracy")
CURVE_FIELDS = ("epoch", "level", "lr", "mean_oneshot_accuracy", "kendall_tau", "spearman",
                "P@top5%", "seconds")


def check_config(cfg):
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


def use_machine(cfg):
    """--threads, and the device ('auto': the GPU where there is one)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        device = torch.device({"auto": "cuda" if torch.cuda.is_available() else "cpu"}.get(
            cfg.device, cfg.device))
        assert device.type == "cpu" or (device.index or 0) < torch.cuda.device_count()
    except (RuntimeError, AssertionError):
        raise UsageError(f"--device {cfg.device}: no such device here (--device cpu)") from None
    return device


def run_options(cfg, given, resume, load):
    """A resumed (DIR/config.json) or loaded (CKPT) run's options, and the checkpoint; typed
    beside them, only the RESETTABLE ones (for --load also --out and --nb201)."""
    path = Path(resume) / "config.json" if resume else Path(load)
    if resume and not path.exists():
        raise UsageError(f"--resume {resume}: no run there")
    checkpoint = load_checkpoint(path) if load else None
    try:
        saved = checkpoint["config"] if load else json.loads(path.read_text())
        assert [(k, type(v)) for k, v in saved.items()] == [
            (k, type(v)) for k, v in asdict(Config()).items()]
    except (OSError, ValueError, AttributeError, AssertionError):
        raise UsageError(f"{path}: not the options of a run of this close.py") from None
    allowed = RESETTABLE + (() if resume else ("out", "nb201"))
    if typed := [f"--{name.replace('_', '-')}" for name in given if name not in allowed]:
        raise UsageError(f"{'--resume' if resume else '--load'} runs on the run's own options: "
                         f"drop {' '.join(typed)}")
    cfg = Config(**saved | {name: getattr(cfg, name) for name in given})
    cfg.out = resume or (cfg.out if "out" in given else str(path.parent / "rescored"))
    return cfg, checkpoint


def claim_out(cfg, resume):
    """The run's folder (new, empty, or resumed) and whether it holds a finished run."""
    data = cfg.data if cfg.data in ("cifar10", "synthetic") else Path(cfg.data).name
    out = Path(cfg.out or f"runs/{'vanilla' if cfg.baseline else 'close'}-{data}-C"
                          f"{cfg.channels}x{cfg.cells}-{cfg.epochs}ep-seed{cfg.seed}")
    there = next(path for path in [out, *out.parents] if path.exists())
    if not there.is_dir() or not os.access(there, os.W_OK):
        raise UsageError(f"--out {out}: {there} is not a folder that can be written to")
    finished = (out / "metrics.json").exists()
    if not resume and out.is_dir() and any(out.iterdir()):
        held = "other files:" if not (out / "config.json").exists() else (
            "a finished run:" if finished else f"an unfinished run: --resume {out} goes on, or")
        raise UsageError(f"--out {out} holds {held} choose another --out")
    return out, finished


def load_dataset(cfg):
    """--data: CIFAR-10 split by position as officially (its order is random), an image folder
    by a seeded shuffle (it lists class by class); then --train-subset."""
    if cfg.data == "synthetic":
        data = synthetic_dataset(seed=cfg.seed)
    elif cfg.data == "cifar10":
        cifar10 = torchvision.datasets.CIFAR10(cfg.data_root, train=True, download=True)
        images = torch.from_numpy(cifar10.data).permute(0, 3, 1, 2).contiguous()
        data = split(images, torch.tensor(cifar10.targets), torch.arange(len(images)), 10)
    else:
        folder = torchvision.datasets.ImageFolder(
            Path(cfg.data) / "train", lambda image: TF.pil_to_tensor(TF.resize(image, [32, 32])))
        if len(folder.classes) < 2:
            raise ValueError(f"{len(folder.classes)} class folder; need at least 2")
        images = torch.stack([image for image, _ in with_progress(folder, f"decoding {cfg.data}")])
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        data = split(images, torch.tensor(folder.targets), order, len(folder.classes))
    if 0 < cfg.train_subset < len(data.train_labels):
        keep = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(
            cfg.seed))[:cfg.train_subset]
        data = Dataset(data.train_images[keep], data.train_labels[keep], data.heldout_images,
                       data.heldout_labels, data.num_classes)
    return data


def read_data(cfg):
    """load_dataset, its failure in one line; a failed download leaves nothing behind."""
    root = Path(cfg.data_root)
    new = next((path for path in [*reversed(root.parents), root] if not path.exists()), None)
    there = set(root.iterdir()) if root.is_dir() else set()
    try:
        return load_dataset(cfg)
    except (OSError, RuntimeError, ValueError) as error:  # offline: urllib's URLError, an OSError
        if cfg.data != "cifar10":
            raise UsageError(f"--data {cfg.data}: not 'synthetic', 'cifar10' or an image-folder "
                             f"tree DATA/train/<class>/<image> ({error})") from None
        for path in [new] if new else set(root.iterdir()) - there:  # what the download made
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise UsageError(f"CIFAR-10 could not be downloaded into {root} "
                         f"({str(error).splitlines()[0]}): use --data FOLDER, --data synthetic, "
                         f"or --data-root DIR") from None


def load_ground_truth(path):
    """--nb201, each complete column: {dataset: {arch: NB201 accuracy, its class's mean}} and
    {dataset: {arch: its class's rank of 6,466, 1 the best}}."""
    try:
        import nb201_api_slim
        table = nb201_api_slim.load(path)
    except ImportError:
        raise UsageError("--nb201 needs nb201_api_slim.py next to close.py") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"--nb201 {path}: {error}") from None
    class_of, accuracy, rank = _representatives(), {}, {}
    class_of_text = {text: class_of[str_to_arch(text)] for _, text in table}
    for dataset in (d for d in NB201_DATASETS if d in table.datasets):
        by_class = table.group_accuracies(class_of_text.__getitem__, dataset)
        if len(by_class) == len(unique_archs()):
            ranks = dict(zip(by_class, descending_ranks(list(by_class.values())).tolist()))
            accuracy[dataset] = {a: by_class[class_of[a]] for a in ALL_ARCHS}
            rank[dataset] = {a: 1 + ranks[class_of[a]] for a in ALL_ARCHS}
    if "cifar10" not in accuracy:
        raise UsageError(f"--nb201 {path}: no CIFAR-10 accuracy for each of the 6,466 classes")
    return accuracy, rank


def write(path, content, header=None):
    """Text, or CSV rows under `header`; written, then renamed: a kill leaves no broken file."""
    if header:
        csv.writer(text := io.StringIO()).writerows([header, *content])
        content = text.getvalue()
    path.with_name(path.name + ".tmp").write_text(content, newline="")
    os.replace(path.with_name(path.name + ".tmp"), path)


def load_checkpoint(path, model=None):
    """The checkpoint's dict; with a model, its weights loaded into it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model and model.load_state_dict(checkpoint["model"])
        assert {"config", "model", "log", "curve"} <= checkpoint.keys()
    except Exception:  # not torch's message: its advice to drop weights_only is unsafe
        raise UsageError(f"{path}: not a close.py checkpoint, or not of these options") from None
    return checkpoint


def routed_edges(arch):
    """The live edges whose op has weights: those a sharing assignment routes."""
    ops = as_arch(arch)
    return [e for e, live in enumerate(live_edges(ops)) if live and ops[e] in (CONV1X1, CONV3X3)]


@torch.no_grad()
def gate_spread(model):
    """Does the GATE route by arch? The std over 500 archs' routed edges of the logits centred
    per edge: below 0.05, no block's odds move by 5% between archs (BLIND)."""
    if model.gate is None or model.level == 1:
        return None
    archs = random.Random(0).sample(unique_archs(), 500)
    routed = torch.tensor([[e in routed_edges(arch) for e in range(len(EDGES))] for arch in archs])
    with evaluating(model):
        logits = model.gate_logits(archs)[routed.to(model.gate.edge_src.device)]  # (edges, level)
    return (logits - logits.mean(-1, keepdim=True)).std(0).mean().item()


def track(model, images, labels, archs, cfg, truth):
    """A point of the curve: the tracked archs scored as the final scoring does. Training goes on
    as if it had not been: score_arch keeps no graph, has generators of its own and restores
    train mode; fork_rng guards training's generators."""
    started, device = time.monotonic(), images.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        scores = [score_arch(model, arch, images, labels, cfg.batch_size, cfg.eval_gate,
                             cfg.eval_seed, cfg.images_per_pass) for arch in archs]
    ranking = ranking_metrics([s[0] for s in scores], [truth[a] for a in archs]) if truth else {}
    return {"mean_oneshot_accuracy": float(np.mean([s[0] for s in scores])),
            **{name: ranking.get(name) for name in CURVE_FIELDS[4:7]},
            "seconds": round(time.monotonic() - started, 3), "scores": scores}


def fit(model, data, cfg, out, truth):
    """train(), and after each epoch a log row, a point of the curve every --track-every epochs
    and after the last, the checkpoint, the CSV files and a line; resumed after the last epoch."""
    state, log, curve = TrainingState(*make_optimizer(model, cfg)), [], []
    if (out / "checkpoint.pt").exists():  # weights, optimizer, plateau schedule and RNG
        saved = load_checkpoint(out / "checkpoint.pt", model)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.epoch, log, curve, rng = saved["epoch"], saved["log"], saved["curve"], saved["rng"]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        print(f"resumed after epoch {state.epoch}")
    every = max(1, cfg.epochs // 10) if cfg.track_every == -1 else cfg.track_every
    archs, tracking = seeded_archs(cfg.track_archs, cfg.eval_seed), heldout_set(
        data, cfg, cfg.track_batches)

    def epoch_done(finished):
        if not math.isfinite(loss := finished["loss"]):
            raise RunError(f"the training loss became non-finite in epoch {state.epoch}; the "
                           f"checkpoint keeps the last good one")
        log.append({"epoch": state.epoch, "level": model.level, "lr": finished["lr"],
                    "loss": loss, "accuracy": 100 * finished["correct"].item() / finished["images"],
                    "seconds": round(finished["seconds"], 3), "gate_spread": gate_spread(model),
                    "images_per_s": round(finished["images"] / finished["seconds"], 1)})
        if every and (state.epoch % every == 0 or state.epoch == cfg.epochs):
            curve.append({"epoch": state.epoch, "level": model.level, "lr": finished["lr"],
                          **track(model, *tracking, archs, cfg, truth)})
        save(out, cfg, model, state, log, curve, archs)
        print(epoch_line(cfg, every, log[-1], curve), flush=True)

    train(model, data, cfg, state, epoch_done)
    return log, curve


def save(out, cfg, model, state, log, curve, archs):
    """The checkpoint, log.csv, curve.csv (its points) and curve_scores.csv (each arch's)."""
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"config": asdict(cfg), "model": model.state_dict(), "epoch": state.epoch,
                "optimizer": state.optimizer.state_dict(), "rng": rng, "log": log,
                "scheduler": state.scheduler.state_dict(), "curve": curve}, out / "ckpt.tmp")
    os.replace(out / "ckpt.tmp", out / "checkpoint.pt")
    write(out / "log.csv", [[row[k] for k in LOG_FIELDS] for row in log], LOG_FIELDS)
    write(out / "curve.csv", [["" if p[k] is None else p[k] for k in CURVE_FIELDS] for p in curve],
          CURVE_FIELDS)
    write(out / "curve_scores.csv", [[p["epoch"], arch_to_str(a), *s] for p in curve
                                     for a, s in zip(archs, p["scores"])],
          ("epoch", *SCORE_FIELDS[:3]))


def epoch_line(cfg, every, row, curve):
    """The epoch's numbers, the curve's point if one was made, and the time left: the epoch's and
    the last point's times again for each to come (later levels are slower)."""
    epoch, point = row["epoch"], curve[-1] if curve else {"epoch": 0, "seconds": 0}
    points = sum(every > 0 and (e % every == 0 or e == cfg.epochs)
                 for e in range(epoch + 1, cfg.epochs + 1))
    left = row["seconds"] * (cfg.epochs - epoch) + point["seconds"] * points
    tracked = "" if point["epoch"] != epoch else (
        f"tracked tau {point['kendall_tau']:.3f}" if point["kendall_tau"] is not None
        else f"tracked one-shot {point['mean_oneshot_accuracy']:.1f}%")
    return "  ".join(part for part in (
        f"epoch {epoch:4d}/{cfg.epochs}", f"loss {row['loss']:.4f}", f"acc {row['accuracy']:5.1f}%",
        f"lr {row['lr']:.4g}", "" if cfg.baseline else f"level {row['level']}",
        f"{row['images_per_s']:,.0f} img/s", tracked, describe_gate(row["gate_spread"]),
        f"{duration(left)} left or more" * (left > 0)) if part)


def describe_gate(spread):
    return "" if spread is None else f"GATE {'BLIND' if spread < 0.05 else 'routes'} ({spread:.2g})"


def score_archs(model, images, labels, cfg, archs, path):
    """One-shot scores, each appended to `path` as it comes (a stopped run's are reused); and how
    many were scored now."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # a row torn by a kill
    scores = {str_to_arch(arch): (float(accuracy), float(loss))
              for arch, accuracy, loss, *_ in csv.reader(lines[1:])}
    write(path, [[arch_to_str(a), *s] for a, s in scores.items()], SCORE_FIELDS[:3])
    todo = [arch for arch in archs if arch not in scores]
    with open(path, "a", newline="") as file:
        for arch in with_progress(todo, f"scoring {len(todo):,} archs on {len(labels):,} images"):
            scores[arch] = score_arch(model, arch, images, labels, cfg.batch_size, cfg.eval_gate,
                                      cfg.eval_seed, cfg.images_per_pass)
            csv.writer(file).writerow([arch_to_str(arch), *scores[arch]])
            file.flush()
    return scores, len(todo)


def run(cfg, given, resume=None, load=None):
    """Check every input, then train (tracking the curve), score, rank, search and summarise."""
    cfg, checkpoint = run_options(cfg, given, resume, load) if resume or load else (cfg, None)
    check_config(cfg)
    device, (out, finished) = use_machine(cfg), claim_out(cfg, resume)
    if finished:
        return print(f"{out} holds a finished run: nothing to resume")
    truth = load_ground_truth(cfg.nb201) if cfg.nb201 else ({}, {})
    if truth[0] and cfg.data == "synthetic":
        print("warning: --data synthetic: its ranking against NB201 means nothing")
    try:
        started, data = time.monotonic(), read_data(cfg).to(device)
        times = {"data_s": time.monotonic() - started}
        model = build_model(cfg, data.num_classes, device)
        print(f"{out.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{len(data.train_labels):,} train / {len(data.heldout_labels):,} held-out images, "
              f"{device}, {str(precision(device))[6:]}", flush=True)
        if checkpoint:
            load_checkpoint(load, model)
            print("--load: no training, so no curve")
        out.mkdir(parents=True, exist_ok=True)  # from here the folder is the run's
        write(out / "config.json", json.dumps(asdict(cfg), indent=2))
        log, curve = (checkpoint["log"], []) if checkpoint else fit(
            model, data, cfg, out, truth[0].get("cifar10"))
        times |= {"train_s": sum(r["seconds"] for r in log), "track_s": sum(
            p["seconds"] for p in curve)}
        return score_rank_search(model, data, cfg, out, truth, times)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: --resume {out} goes on" if (out / "config.json").exists()
                          else "interrupted: nothing was saved") from None
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            free, total = (size / 2**30 for size in torch.cuda.mem_get_info(device))
            device = f"{torch.cuda.get_device_name(device)}, {free:.1f} of {total:.1f} GiB free"
        raise RunError(f"out of memory ({device}; checkpoint and scores kept): --resume {out} "
                       f"with a smaller --images-per-pass if it was scoring, else train anew "
                       f"with a --batch-size below {cfg.batch_size}") from None


def score_rank_search(model, data, cfg, out, truth, times):
    """Score the --eval-archs, rank them against NB201, search; metrics.json, summary, picture."""
    (accuracy, rank), started, (images, labels) = truth, time.monotonic(), heldout_set(data, cfg)
    archs = seeded_archs(cfg.eval_archs, cfg.eval_seed)
    scores, scored = score_archs(model, images, labels, cfg, archs, out / "scores.csv")
    times["score_s"], cifar10 = time.monotonic() - started, accuracy.get("cifar10", {})
    write(out / "scores.csv", [[arch_to_str(a), *scores[a], cifar10.get(a, "")] for a in archs],
          SCORE_FIELDS)
    oneshot = [scores[a][0] for a in archs]
    ranking = ranking_metrics(oneshot, [cifar10[a] for a in archs]) if cifar10 else None
    started, search, searched = time.monotonic(), None, dict(scores)
    if cfg.search_budget:
        search = search_with_supernet(model, images, labels, cfg, searched)
        best = search["best"]
        search["best"] = {"arch": arch_to_str(best), "oneshot_accuracy": searched[best][0],
                          "oneshot_loss": searched[best][1]}
        if accuracy:  # the found cell on each of NB201's datasets, as NAS papers report it
            search["best"]["nb201"] = {d: {"accuracy": accuracy[d][best], "rank": rank[d][best]}
                                       for d in accuracy}
        write(out / "search.json", json.dumps(search, indent=2))
    times["search_s"] = time.monotonic() - started
    results = {"ranking": ranking, "search": search, "gate_spread": gate_spread(model),
               "times": {key: round(value, 1) for key, value in times.items()},
               "score_s_per_arch": round(times["score_s"] / scored, 4) if scored else None,
               "scored_archs": len(archs), "mean_oneshot_accuracy": float(np.mean(oneshot)),
               "heldout_images": len(labels), "device": str(images.device),
               "precision": str(precision(images.device))[6:], "threads": torch.get_num_threads()}
    write(out / "metrics.json", json.dumps(results, indent=2))
    print_summary(out, results)
    print(f"ranking.png: {plot_run(out)}" if pyplot() else
          f"no matplotlib, no ranking.png (pip install matplotlib; close.py --plot {out})")
    return results


def print_summary(out, results):
    print(f"\n== {out}: {results['scored_archs']:,} archs, mean one-shot accuracy "
          f"{results['mean_oneshot_accuracy']:.1f}% ({results['heldout_images']:,} images)")
    print(", ".join(f"{k} {v:.3g}" for k, v in (results["ranking"] or {}).items() if v is not None)
          or "no Kendall tau without the NB201 table (--nb201; README: NB201 ground truth)")
    if search := results["search"]:
        print(f"search ({search['strategy']}, {search['budget']} evaluations) found "
              f"{search['best']['arch']}" + "".join(
                  f"\n  NB201 {d}: {v['accuracy']:.2f}%, rank {v['rank']:,} of 6,466"
                  for d, v in search["best"].get("nb201", {}).items()))
    print(describe_gate(results["gate_spread"]) or "no GATE at work")
    print("time: " + ", ".join(f"{key[:-2]} {duration(s)}" for key, s in results["times"].items()))


def finished_run(folder):
    """A finished run's metrics.json, with its name, options and curve."""
    folder = Path(folder)
    try:
        run = json.loads((folder / "metrics.json").read_text()) | {"run": folder.name, "curve": []}
        run["config"] = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        raise UsageError(f"{folder} is not a finished run of close.py") from None
    if (folder / "curve.csv").exists():
        run["curve"] = [{key: float(text) if text else None for key, text in row.items()}
                        for row in csv.DictReader(open(folder / "curve.csv"))]
    return run


# A vanilla and a CLOSE run pair when only these options differ (vanilla has no blocks or GATE).
UNPAIRED_OPTIONS = ("seed", "baseline", "blocks", "eval_gate", "out", "device", "threads",
                    "images_per_pass", "track_every")


def compare(folders):
    """--compare: CLOSE - vanilla, paired by seed among runs that share the other options."""
    runs, groups, unpaired = [finished_run(folder) for folder in folders], {}, []
    for run in runs:
        options = json.dumps({k: v for k, v in run["config"].items() if k not in UNPAIRED_OPTIONS})
        groups.setdefault(options, {}).setdefault(run["config"]["seed"], []).append(run)
    for seeds in groups.values():
        pairs = {}
        for seed, group in sorted(seeds.items()):
            pair = sorted(group, key=lambda run: not run["config"]["baseline"])  # vanilla first
            if [r["config"]["baseline"] for r in pair] == [True, False] and all(
                    r["ranking"] for r in pair):
                pairs[seed] = pair
            else:
                unpaired += [run["run"] for run in group]
        if pairs:
            print_paired_differences(pairs)
    if unpaired:
        print(f"not paired: {', '.join(unpaired)} (a pair is a vanilla and a CLOSE run with "
              f"--nb201, of one seed and the same other options)")
    if pyplot() and (curved := [run for run in runs if run["curve"]]):
        print(f"curves drawn in {plot(Path('compare.png').resolve(), curved)}")


def print_paired_differences(pairs):
    """CLOSE - vanilla per seed, and the mean, sd and paired t-test p over the seeds: the final
    metrics, the found cell's CIFAR-10 accuracy, Kendall tau at each epoch tracked."""
    epochs = sorted({p["epoch"] for pair in pairs.values() for run in pair for p in run["curve"]})
    rows = {name: lambda run, name=name: run["ranking"][name]
            for name in ("kendall_tau", "spearman", "P@top5%")}
    rows["found CIFAR-10"] = lambda run: ((run["search"] or {}).get("best", {}).get(
        "nb201", {}).get("cifar10", {}).get("accuracy", np.nan))
    rows |= {f"tau, epoch {e:g}": lambda run, e=e: next(
        (p["kendall_tau"] for p in run["curve"] if p["epoch"] == e), np.nan) for e in epochs}
    heads = [*(f"seed {seed}" for seed in pairs), "mean", "sd", "p"]
    print(f"\nCLOSE - vanilla, paired by seed ({len(pairs)} pair{'s' * (len(pairs) > 1)}):")
    print(" " * 16 + "".join(f"{head:>9s}" for head in heads))
    for name, value in rows.items():
        vanilla, closenet = (np.array([value(pair[i]) for pair in pairs.values()], dtype=float)
                             for i in (0, 1))
        differences = closenet - vanilla
        kept = differences[~np.isnan(differences)]
        cells = ["-" if np.isnan(d) else f"{d:+.3f}" for d in differences]
        cells += [f"{kept.mean():+.3f}" if len(kept) else "-", "-", "-"]
        if len(kept) > 1:
            p = scipy.stats.ttest_rel(closenet, vanilla, nan_policy="omit").pvalue
            cells[-2:] = [f"{kept.std(ddof=1):.3f}", f"{p:.3f}"]
        print(f"{name:16s}" + "".join(f"{cell:>9s}" for cell in cells))
    if len(pairs) < 3:
        print("(fewer than 3 pairs: the mean, sd and p say nothing yet)")


def pyplot():
    """matplotlib's pyplot drawing into files; None where matplotlib is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    plt.switch_backend("Agg")
    return plt


def plot_run(out):
    """ranking.png: one-shot vs NB201 accuracy (without --nb201, their spread), and the curve."""
    run, scores = finished_run(out), list(csv.DictReader(open(Path(out) / "scores.csv")))
    oneshot = [float(row["oneshot_accuracy"]) for row in scores]

    def draw_scores(axis):
        if all(row["nb201_accuracy"] for row in scores):
            axis.scatter([float(row["nb201_accuracy"]) for row in scores], oneshot, s=8)
            axis.set(xlabel="NB201 CIFAR-10 test accuracy (%)", ylabel="one-shot accuracy (%)")
        else:
            axis.hist(oneshot, bins=30)
            axis.set(xlabel="one-shot accuracy (%)", ylabel="archs")
        axis.set_title(f"{run['run']}: {len(scores):,} archs")

    return plot(Path(out) / "ranking.png", [run] if run["curve"] else [], draw_scores)


def level_starts(epochs, num_blocks):
    """Each level's first epoch, counted from 1 as log.csv and curve.csv count."""
    levels = [curriculum_level(epoch, epochs, num_blocks) for epoch in range(epochs)]
    return {level: levels.index(level) + 1 for level in sorted(set(levels))}


def plot(path, runs, first_panel=None):
    """Into `path`: first_panel, then the runs' curves by epoch, Kendall tau and P@top5% (without
    NB201, mean one-shot accuracy): each kind's mean (each run faint behind), the levels marked."""
    names = [] if not runs else ["kendall_tau", "P@top5%"] if all(
        run["ranking"] for run in runs) else ["mean_oneshot_accuracy"]
    plt, panels = pyplot(), bool(first_panel) + len(names)
    figure, axes = plt.subplots(1, panels, squeeze=False, figsize=(5.5 * panels, 4.5))
    first_panel and first_panel(axes[0, 0])
    for axis, name in zip(axes[0, bool(first_panel):], names):
        for color, kind, baseline in (("C0", "vanilla", True), ("C1", "CLOSE", False)):
            curves = [{p["epoch"]: np.nan if p[name] is None else p[name] for p in run["curve"]}
                      for run in runs if run["config"]["baseline"] is baseline]
            for curve in curves if len(curves) > 1 else ():
                axis.plot(list(curve), list(curve.values()), color=color, alpha=0.25)
            if epochs := sorted(set.intersection(*map(set, curves))) if curves else []:
                axis.plot(epochs, [np.mean([c[e] for c in curves]) for e in epochs], "o-",
                          color=color, label=kind + f", mean of {len(curves)}" * (len(curves) > 1))
        if cfg := next((run["config"] for run in runs if not run["config"]["baseline"]), None):
            for level, epoch in level_starts(cfg["epochs"], cfg["blocks"]).items():
                axis.axvline(epoch, color="gray", linestyle=":")
                axis.annotate(f"level {level}", (epoch, 0), xycoords=("data", "axes fraction"))
        label = {"kendall_tau": "Kendall tau"}.get(name, name.replace("_", " "))
        axis.set(xlabel="epochs trained", ylabel=f"{label} of the tracked archs")
        axis.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


# --------------------------------------
# 9. Command line
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other bad input
        raise UsageError(message)


def parse_args(argv=None):
    """The options typed (a Config of them, and their names) and the other arguments."""
    parser = ArgumentParser(
        allow_abbrev=False, description="CLOSE on NAS-Bench-201: train, score archs, search.",
        epilog="NB201 files other than the compact CSV are pickles: loading one runs code from "
               "it, so use only files you trust.")
    for option in fields(Config):
        flag = isinstance(option.default, bool)
        shown = "" if flag or option.default == "" else f" (default: {option.default})"
        kind = {"action": "store_true"} if flag else {"type": type(option.default),
                                                      "choices": option.metadata["choices"]}
        parser.add_argument("--" + option.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=option.metadata["help"] + shown, **kind)
    other = parser.add_mutually_exclusive_group()
    other.add_argument("--resume", metavar="DIR", help="continue the run in DIR on its options")
    other.add_argument("--load", metavar="CKPT", help="no training: score and search CKPT")
    other.add_argument("--compare", nargs="+", metavar="RUN",
                       help="CLOSE - vanilla of finished runs, paired by seed")
    other.add_argument("--plot", metavar="RUN", help="draw RUN/ranking.png (needs matplotlib)")
    args = parser.parse_args(argv)
    given = [option.name for option in fields(Config) if hasattr(args, option.name)]
    return Config(**{name: getattr(args, name) for name in given}), args, given


def main(argv=None):
    try:
        cfg, args, given = parse_args(argv)
        if args.compare:
            compare(args.compare)
        elif args.plot and not pyplot():
            raise UsageError("--plot needs matplotlib: pip install matplotlib")
        else:
            print(plot_run(args.plot)) if args.plot else run(cfg, given, args.resume, args.load)
    except (UsageError, RunError) as error:
        print(f"close.py: {'error: ' * isinstance(error, UsageError)}{error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 130 if isinstance(error, Interrupted) else 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed job stops like Ctrl-C
    sys.exit(main())
