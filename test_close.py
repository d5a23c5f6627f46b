"""Tests of close.py and nb201_api_slim.py: invariants of the method, oracles, known values.

Run with `python -m pytest -q test_close.py`. The core runs on synthetic data; tests that read
../shared/data (real CIFAR-10 images, the NB201 accuracy table) skip when it is absent.
"""

import bz2
import csv
import contextlib
import dataclasses
import importlib.util
import io
import itertools
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
import torch.nn.functional as F

import close
import nb201_api_slim as nb

# The models here are tiny: a second thread saves nothing and, on a busy machine, waits for a core
# (the suite took 4x longer with 2 threads beside other jobs).
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BEST_CIFAR10 = (  # index 6111, NB201's best on CIFAR-10
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|"
    "+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|"
)
# The smallest runs that still exercise everything: 2 training steps per epoch, 12 archs scored on
# 64 images, 6 archs tracked on 64.
TINY = [
    "--data",
    "synthetic",
    "--device",
    "cpu",
    "--cells",
    "1",
    "--channels",
    "4",
    "--batch-size",
    "64",
    "--train-subset",
    "128",
    "--eval-archs",
    "12",
    "--eval-batches",
    "1",
    "--search-budget",
    "16",
    "--population",
    "6",
    "--tournament",
    "3",
    "--track-archs",
    "6",
    "--track-batches",
    "1",
]


def shared_file(name):
    """A file of ../shared/data (real CIFAR-10 images, the NB201 table): there in CI, absent on
    users' machines."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def error_line(capsys, argv, code=2):
    """The one line that close.main(argv) prints on stderr, exiting with `code`."""
    returned = close.main(argv)
    err = capsys.readouterr().err
    assert returned == code and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------
# 1. Search space
# ---------------------------------------------------------------------------------------------
def test_search_space_sizes():
    assert len(close.ALL_ARCHS) == 15625 == len(set(close.ALL_ARCHS))
    unique = close.unique_archs()
    assert len(unique) == 6466 == len(set(unique))
    assert all(close.canonical(arch) == arch for arch in unique)  # representatives are fixed points


def test_arch_string_round_trip_and_known_string():
    assert close.arch_to_str((3, 3, 3, 1, 3, 2)) == BEST_CIFAR10
    for arch in close.ALL_ARCHS:
        assert close.str_to_arch(close.arch_to_str(arch)) == arch


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "|nor_conv_3x3~0|",
        BEST_CIFAR10[:-1],
        BEST_CIFAR10.replace("~1|", "~0|", 1),
        BEST_CIFAR10.replace("conv_3x3", "conv_5x5", 1),
        BEST_CIFAR10 + "+|none~0|",
        BEST_CIFAR10.replace("|+|", "|+", 1),
        "|none~0|+|none~0|none~1|+|none~0|none~1|",
        None,
        42,
    ],
)
def test_bad_arch_strings_are_rejected_naming_the_string(bad):
    with pytest.raises(ValueError, match="not an NB201 architecture string") as error:
        close.str_to_arch(bad)
    assert repr(bad) in str(error.value)


def test_arch_string_errors_point_at_the_bad_token():
    with pytest.raises(ValueError, match="'skip_conect' is not an op"):
        close.str_to_arch(BEST_CIFAR10.replace("skip_connect", "skip_conect"))
    with pytest.raises(ValueError, match="should come from node 1"):
        close.str_to_arch(BEST_CIFAR10.replace("nor_conv_3x3~1", "nor_conv_3x3~2"))


def test_isomorphic_cells_share_a_representative():
    conv = close.CONV3X3
    # node 1 feeds nothing live: its input edge is dead, so the cell equals the one with 'none'
    # there
    assert close.canonical((conv, 0, 0, conv, 0, 0)) == close.canonical((0, 0, 0, conv, 0, 0))
    # a skip_connect into node 1 then a conv to the output computes the same as the conv alone
    assert close.canonical((close.SKIP, 0, 0, 0, conv, 0)) == close.canonical((0, 0, 0, conv, 0, 0))
    # the benchmark's rule is finer than function: node 2 always has an edge from node 1, so
    # swapping the ops of 0->1 and 0->2 gives another class even when 1->2 is none
    assert close.canonical((conv, 2, 0, 0, 1, 1)) != close.canonical((2, conv, 0, 0, 1, 1))
    # a different op on a live edge is a different cell
    assert close.canonical((0, 0, 0, conv, 0, 0)) != close.canonical((0, 0, 0, close.CONV1X1, 0, 0))
    # all-'none' cells and cells whose output is cut off are one class: the zero cell
    assert close.canonical((conv, conv, conv, 0, 0, 0)) == close.canonical((0,) * 6)


def test_live_edges():
    conv, skip = close.CONV3X3, close.SKIP
    assert close.live_edges((0,) * 6) == (False,) * 6
    assert close.live_edges((conv,) * 6) == (True,) * 6
    # 0->1 conv but node 1 reaches nothing: dead; 0->3 conv live
    assert close.live_edges((conv, 0, 0, conv, 0, 0)) == (False, False, False, True, False, False)
    # node 2 unreachable (0->2 and 1->2 none): its edge 2->3 is dead even though it is not 'none'
    assert close.live_edges((skip, 0, 0, 0, conv, skip)) == (True, False, False, False, True, False)


# ---------------------------------------------------------------------------------------------
# 2. Data
# ---------------------------------------------------------------------------------------------
def write_png(path, value):
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_split_is_shuffled_not_positional(tmp_path):
    for label, name in enumerate(("a", "b", "c", "d", "e")):
        folder = tmp_path / "train" / name
        folder.mkdir(parents=True)
        for i in range(10):
            write_png(folder / f"{i}.png", 40 * label)
    data = close.image_folder_dataset(tmp_path)
    assert data.num_classes == 5 and len(data.train_labels) == 40 and len(data.heldout_labels) == 10
    # a positional split would hold out the last class only
    assert len(set(data.heldout_labels.tolist())) >= 3
    # labels follow images
    assert all((data.train_images[i] == 40 * data.train_labels[i]).all() for i in range(40))


def test_torchvision_cifar10_is_split_by_position(monkeypatch):
    import torchvision

    class FakeCIFAR10:  # torchvision's: uint8 NHWC numpy images, a list of labels, random order
        def __init__(self, root, train, download):
            assert train and download
            self.data = (
                np.arange(50000 * 4, dtype=np.uint8)
                .reshape(50000, 1, 1, 4)
                .repeat(32, 1)
                .repeat(32, 2)[..., :3]
            )
            self.targets = [i % 10 for i in range(50000)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = close.cifar10_dataset("unused")
    assert data.train_images.shape == (40000, 3, 32, 32) and data.heldout_images.shape == (
        10000,
        3,
        32,
        32,
    )
    assert data.train_labels[:3].tolist() == [0, 1, 2] and data.heldout_labels[0] == 40000 % 10
    # channels first
    assert data.heldout_images[0, :, 0, 0].tolist() == [(40000 * 4 + c) % 256 for c in range(3)]


def test_offline_cifar10_download_is_one_line_naming_the_alternatives(
    tmp_path, capsys, monkeypatch
):
    import torchvision
    import urllib.error

    def offline(root, train, download):  # as torchvision does: the folder, a partial archive
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    root = tmp_path / "data" / "cifar"
    err = error_line(
        capsys,
        TINY[2:] + ["--data", "cifar10", "--data-root", str(root), "--out", str(tmp_path / "run")],
    )
    assert "could not be downloaded" in err and "--data synthetic" in err and "--data-root" in err
    assert sorted(tmp_path.iterdir()) == []  # the failed attempt leaves nothing behind
    root.mkdir(parents=True)
    # an existing folder: only what the attempt added goes
    (root / "mine.txt").write_text("the user's")
    error_line(
        capsys,
        TINY[2:] + ["--data", "cifar10", "--data-root", str(root), "--out", str(tmp_path / "run")],
    )
    assert [p.name for p in root.iterdir()] == ["mine.txt"]


def test_train_subset_is_seeded_and_keeps_the_heldout_split():
    full = close.load_dataset(close.Config(data="synthetic"))
    small = close.load_dataset(close.Config(data="synthetic", train_subset=100))
    assert len(small.train_labels) == 100 and torch.equal(small.heldout_images, full.heldout_images)
    assert torch.equal(
        small.train_images,
        close.load_dataset(close.Config(data="synthetic", train_subset=100)).train_images,
    )
    rows = {tuple(image.flatten().tolist()) for image in full.train_images}
    assert all(tuple(image.flatten().tolist()) in rows for image in small.train_images)


def test_augment_is_a_per_image_crop_and_flip():
    torch.manual_seed(0)
    images = (
        torch.arange(2 * 3 * 32 * 32, dtype=torch.int64)
        .reshape(2, 3, 32, 32)
        .float()
        .add(1)
        .repeat(32, 1, 1, 1)
    )
    out = close.augment(images)
    assert out.shape == images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    distinct = set()
    for i in range(len(images)):  # each output is one crop of the padded image, possibly mirrored
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(
                out[i],
                (
                    padded[i, :, dy : dy + 32, dx : dx + 32].flip(-1)
                    if flip
                    else padded[i, :, dy : dy + 32, dx : dx + 32]
                ),
            )
        ]
        assert len(matches) == 1
        distinct.add(matches[0])
    assert len(distinct) > 20  # drawn per image, not once per batch


def test_real_cifar10_folder(tmp_path):
    with zipfile.ZipFile(shared_file("cifar10-jpg.zip")) as archive:
        members = [
            m for m in archive.namelist() if m.startswith("cifar10/train/") and m.endswith(".jpg")
        ]
        archive.extractall(tmp_path, members=[m for m in members if int(Path(m).stem) < 200])
    data = close.image_folder_dataset(tmp_path / "cifar10")
    assert data.num_classes == 10 and len(data.train_labels) + len(data.heldout_labels) == 2000
    assert len(set(data.heldout_labels.tolist())) == 10
    mean = data.train_images.float().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(close.CIFAR10_MEAN), atol=0.03)


# ---------------------------------------------------------------------------------------------
# 3. CLOSENet: the parameter pool, the sharing assignment, the GATE
# ---------------------------------------------------------------------------------------------
def n_params(module):
    return sum(p.numel() for p in module.parameters())


def small_batch(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(
        10, (n,), generator=generator
    )


def grown(model, level):
    while model.level < level:
        close.add_glow_block(model)
    return model


def gated_assignment(model, arch):
    """The GATE's straight-through assignment, also at level 1 (where the model skips the gate)."""
    logits = model.gate_logits(arch)
    gate = F.gumbel_softmax(logits, tau=close.GUMBEL_TEMPERATURE, hard=True)
    return close.SharingAssignment(gate=gate, chosen=gate.argmax(-1))


def loss_and_grads(model, images, labels, arch, assignment):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same head dropout mask in both formulations
    loss = F.cross_entropy(model(images, arch, assignment), labels)
    loss.backward(retain_graph=True)  # the assignment's graph (the GATE) is reused by the oracle
    grads = {
        name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in model.named_parameters()
    }
    return loss.detach(), grads


def close_layer_index(model, cell_number):
    return [i for i, layer in enumerate(model.layers) if isinstance(layer, close.Cell)][cell_number]


def test_parameter_counts_match_the_official_supernets():
    vanilla = close.CLOSENet(baseline=True)
    assert n_params(vanilla) == 1_686_106  # the classic NB201 supernet: one block (op set) per edge
    assert vanilla.num_blocks == 6 and vanilla.gate is None
    assert vanilla.sharing_assignment((3,) * 6).blocks == [0, 1, 2, 3, 4, 5]
    closenet = close.CLOSENet(num_blocks=5)
    # official 1,664,335 keeps the zero embedding of nodes 1-3 as a frozen parameter; here it is
    # a constant
    assert n_params(closenet) == 1_664_335 - 48
    assert n_params(closenet.gate) == 247_029 - 48


def test_parameters_grow_linearly_with_blocks_not_with_archs():
    counts = [n_params(close.CLOSENet(num_blocks=k)) for k in (1, 2, 3, 4)]
    gate_growth = 201  # one more logit row in the GATE's last layer
    # one block = one op-weight set over 15 cells
    assert np.diff(counts).tolist() == [268_800 + gate_growth] * 3


def test_level_one_puts_every_edge_on_block_zero_without_the_gate():
    model = close.CLOSENet(channels=4, cells=1, num_blocks=3)
    assignment = model.sharing_assignment((3,) * 6)
    assert model.level == 1 and assignment.blocks == [0] * 6 and assignment.gate is None


@pytest.mark.parametrize("level", [1, 3])
def test_an_arch_string_means_the_same_network_everywhere(level):
    torch.manual_seed(0)
    model = grown(close.CLOSENet(channels=4, cells=1, num_blocks=3), level).eval()
    vanilla = close.CLOSENet(channels=4, cells=1, baseline=True).eval()
    images, labels = small_batch()
    for net in (model, vanilla):
        assert torch.equal(net(images, BEST_CIFAR10), net(images, close.str_to_arch(BEST_CIFAR10)))
        assert close.score_arch(net, BEST_CIFAR10, images, labels, 8) == close.score_arch(
            net, list(close.str_to_arch(BEST_CIFAR10)), images, labels, 8
        )
        assert not torch.equal(net(images, BEST_CIFAR10), net(images, (close.AVG_POOL,) * 6))
    assert close.canonical(BEST_CIFAR10) == close.canonical(close.str_to_arch(BEST_CIFAR10))
    cell, x = model.cells()[0], model.stem(images)  # a piece on its own reads the arch alike
    assignment = model.sharing_assignment(BEST_CIFAR10)
    assert torch.equal(
        cell(x, BEST_CIFAR10, assignment), cell(x, close.str_to_arch(BEST_CIFAR10), assignment)
    )
    for bad in ("|nor_conv_3x3~0|", (3, 3, 3), (3, 3, 3, 1, 3, 7), (3, 3, 3, 1, 3, True), 42):
        calls = (
            lambda: model(images, bad),
            lambda: cell(x, bad, assignment),
            lambda: model.sharing_assignment(bad),
            lambda: vanilla.sharing_assignment(bad),
            lambda: close.arch_to_str(bad),
        )
        for call in calls:
            with pytest.raises(ValueError, match="not an NB201 architecture"):
                call()


AWKWARD_ARCHS = [
    (3, 3, 3, 1, 3, 2),  # every op with weights, skip to the output
    (0,) * 6,  # nothing reaches the output
    (3, 0, 0, 1, 0, 0),  # a dead conv (node 1 feeds nothing)
    (1,) * 6,  # skips only
    (4,) * 6,  # pools only
    (2, 1, 4, 0, 2, 3),
    (0, 3, 2, 0, 0, 3),  # node 1 unreachable: its edges are dead
]


def float64_model(baseline, level):
    torch.manual_seed(level)
    model = close.CLOSENet(channels=4, cells=1, num_blocks=5, baseline=baseline).double()
    model = grown(model, level).train()
    with torch.no_grad():  # make the blocks different, as training would
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_the_fused_glow_op_equals_the_papers_plain_sum_in_float64(level, monkeypatch):
    """sum_i gate_i * block_i(x), every active block with autograd, against the fused form: the
    loss and every gradient, the GATE's included."""
    model = float64_model(False, level)
    images, labels = (t.double() if t.is_floating_point() else t for t in small_batch(6))
    for arch in AWKWARD_ARCHS[:1] + AWKWARD_ARCHS[2:3] + AWKWARD_ARCHS[5:]:
        torch.manual_seed(100)
        assignment = gated_assignment(model, arch)
        monkeypatch.setattr(close, "FUSED_UNCHOSEN_BLOCKS", True)
        fused_loss, fused = loss_and_grads(model, images, labels, arch, assignment)
        monkeypatch.setattr(close, "FUSED_UNCHOSEN_BLOCKS", False)
        plain_loss, plain = loss_and_grads(model, images, labels, arch, assignment)
        assert (fused_loss - plain_loss).abs() < 1e-12
        assert all((fused[name] - plain[name]).abs().max() < 1e-12 for name in plain), arch
        # the plain sum ran every active block with autograd: each has a gradient, zero or not
        blocks = model.cells()[0].glow_blocks[:level]
        for e in close.routed_edges(arch):
            assert all(block.weight(arch[e]).grad is not None for block in blocks)
        gate_grad = torch.cat([g.flatten() for n, g in plain.items() if n.startswith("gate.")])
        if level == 1:
            assert not gate_grad.any()  # one block: softmax of one logit, no signal for the gate
        elif close.routed_edges(arch):
            assert gate_grad.abs().sum() > 0


def test_gate_is_hard_in_forward_and_only_chosen_blocks_get_gradient():
    torch.manual_seed(0)
    model = grown(close.CLOSENet(channels=4, cells=2, num_blocks=5), 4).train()
    images, labels = small_batch()
    arch = (3, 3, 2, 3, 2, 3)  # every edge parameterised and live
    for trial in range(5):
        assignment = model.sharing_assignment(arch)
        gate = assignment.gate
        assert gate.shape == (6, 4)
        assert ((gate == 0).sum(-1) == 3).all() and torch.allclose(gate.sum(-1), torch.ones(6))
        assert torch.equal(gate.argmax(-1), assignment.chosen) and assignment.blocks is None
        _, grads = loss_and_grads(model, images, labels, arch, assignment)
        used = {
            (close.CONV3X3 if op == close.CONV3X3 else close.CONV1X1, b)
            for op, b in zip(arch, assignment.chosen.tolist())
        }
        for c, cell in enumerate(model.cells()):
            for b in range(5):
                for op, name in ((close.CONV1X1, "conv1x1"), (close.CONV3X3, "conv3x3")):
                    grad = grads[
                        f"layers.{close_layer_index(model, c)}.glow_blocks.{b}.{name}.weight"
                    ]
                    assert bool(grad.any()) == ((op, b) in used), (trial, c, b, name)
        assert any(grads[n].any() for n in grads if n.startswith("gate."))


def test_scoring_uses_the_eval_gate_and_seed_it_is_given_and_batch_statistics():
    """Oracle: the forward pass on the assignment that eval_gate and seed pick, written out."""
    model = float64_model(False, 3)
    images, labels = (t.double() if t.is_floating_point() else t for t in small_batch(16))
    gates, losses = (("argmax", 0), ("sample", 0), ("sample", 3)), []
    for arch in AWKWARD_ARCHS[:1] + AWKWARD_ARCHS[5:]:
        for gate, seed in gates:
            with torch.no_grad(), close.evaluating(model):
                logits = model(images, arch, model.sharing_assignment(arch, gate, seed))
            expected = (
                ((logits.argmax(1) == labels).double().mean() * 100).item(),
                F.cross_entropy(logits, labels).item(),
            )
            scored = close.score_arch(model, arch, images, labels, 16, gate, seed)
            assert scored == pytest.approx(expected, rel=0, abs=1e-12), (arch, gate, seed)
            losses.append(expected[1])
    # each pick scores differently on some arch: a score that ignored the pick would show
    by_gate = [losses[i::3] for i in range(3)]
    assert by_gate[0] != by_gate[1] != by_gate[2] != by_gate[0]
    model = grown(close.CLOSENet(channels=4, cells=1, num_blocks=3), 3)
    images, labels = small_batch(16)
    model.eval()
    assert model.sharing_assignment((3,) * 6).gate is None
    # batch statistics: an image's logits depend on the other images in its batch (no running
    # statistics)
    a = model(images[:8], (3,) * 6)
    b = model(torch.cat([images[:4], images[8:12]]), (3,) * 6)
    assert not torch.allclose(a[:4], b[:4])


@pytest.mark.parametrize("baseline, level", [(True, 6), (False, 5)])
def test_scoring_in_one_pass_equals_the_per_batch_loop_in_float64(baseline, level):
    """Many batches in one pass, each normalised by its own statistics, score as one pass per batch
    (the oracle, written out), the last, smaller batch included; and a pass is one forward."""
    model = float64_model(baseline, level)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(70, 3, 32, 32, dtype=torch.float64, generator=generator)
    labels = torch.randint(10, (70,), generator=generator)

    def per_batch_loop(arch):
        accuracies, losses = [], []
        with torch.no_grad(), close.evaluating(model):
            assignment = model.sharing_assignment(arch)
            for start in range(0, 70, 16):
                logits, y = model(images[start : start + 16], arch, assignment), labels[start:][:16]
                accuracies.append((logits.argmax(1) == y).double().mean() * 100)
                losses.append(F.cross_entropy(logits, y))
        return torch.stack(accuracies).mean().item(), torch.stack(losses).mean().item()

    passes = []
    model.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    for arch in AWKWARD_ARCHS:
        expected = per_batch_loop(arch)
        for per_pass, sizes in ((0, [16] * 4 + [6]), (32, [32, 32, 6]), (96, [64, 6])):
            passes.clear()
            scored = close.score_arch(model, arch, images, labels, 16, "sample", 0, per_pass)
            assert passes == sizes  # 0 on a CPU: one batch per pass
            assert all(abs(a - b) < 1e-12 for a, b in zip(scored, expected)), arch
    with pytest.raises(ValueError, match="must be 0 or a multiple of the batch size"):
        close.score_arch(model, arch, images, labels, 16, images_per_pass=24)


def test_a_scoring_pass_out_of_gpu_memory_is_halved_and_scores_the_same(monkeypatch):
    model = float64_model(True, 6)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(70, 3, 32, 32, dtype=torch.float64, generator=generator)
    labels = torch.randint(10, (70,), generator=generator)
    expected = close.score_arch(model, AWKWARD_ARCHS[0], images, labels, 8, images_per_pass=16)
    real_forward, tried, fits = model.forward, [], 16

    def forward(images, *args):
        tried.append(len(images))
        if len(images) > fits:  # as CUDA's allocator would
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(images, *args)

    monkeypatch.setattr(model, "forward", forward)
    scored = close.score_arch(model, AWKWARD_ARCHS[0], images, labels, 8, images_per_pass=40)
    # 5 batches do not fit, 2 (half, in whole batches) do; the last, smaller batch alone
    assert tried == [40, 16, 16, 16, 16, 6] and scored == expected
    fits = 4  # not even one batch
    with pytest.raises(torch.OutOfMemoryError):
        close.score_arch(model, AWKWARD_ARCHS[0], images, labels, 8, images_per_pass=64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here")
def test_on_cuda_scoring_in_one_pass_agrees_with_the_per_batch_loop_in_bf16():
    torch.manual_seed(0)
    model = grown(close.CLOSENet(channels=8, cells=1, num_blocks=3), 3).cuda()
    model = model.to(memory_format=close.MEMORY_FORMAT)
    images = torch.randn(1000, 3, 32, 32, device="cuda")
    images = images.contiguous(memory_format=close.MEMORY_FORMAT)
    labels = torch.randint(10, (1000,), device="cuda")
    for arch in AWKWARD_ARCHS:
        per_batch = close.score_arch(model, arch, images, labels, 128, images_per_pass=128)
        one_pass = close.score_arch(model, arch, images, labels, 128)  # CUDA's default: 40 batches
        assert abs(one_pass[0] - per_batch[0]) < 0.5 and abs(one_pass[1] - per_batch[1]) < 0.01


def test_sampled_scoring_gate_is_seeded_per_arch():
    torch.manual_seed(0)
    model = grown(
        close.CLOSENet(channels=4, cells=1, num_blocks=5), 5
    ).eval()  # a flat GATE at init
    archs = close.unique_archs()[:40]
    draws = [model.sharing_assignment(arch, "sample", seed=3).blocks for arch in archs]
    # any order
    assert (
        draws
        == [model.sharing_assignment(arch, "sample", seed=3).blocks for arch in archs[::-1]][::-1]
    )
    assert draws != [model.sharing_assignment(arch, "sample", seed=4).blocks for arch in archs]
    assert len(set(sum(draws, []))) == 5  # a flat GATE's draws spread over the blocks ...
    argmax = [model.sharing_assignment(arch, "argmax").blocks for arch in archs]
    assert len(set(sum(argmax, []))) == 1  # ... where its argmax sends every edge to one block
    # the library's default is the command line's: --eval-gate sample, --eval-seed 0
    assert [model.sharing_assignment(arch).blocks for arch in archs] == [
        model.sharing_assignment(arch, "sample", seed=0).blocks for arch in archs
    ]


def test_gate_input_is_built_from_any_form_of_the_arch():
    torch.manual_seed(0)
    model = grown(close.CLOSENet(channels=4, cells=1, num_blocks=3), 3).eval()
    arch = close.str_to_arch(BEST_CIFAR10)
    one = model.gate_logits(arch)
    assert one.shape == (6, 3)
    for form in (BEST_CIFAR10, list(arch), np.array(arch), torch.tensor(arch)):
        assert torch.equal(model.gate_logits(form), one)
    many = model.gate_logits([arch, (0,) * 6, BEST_CIFAR10])
    assert many.shape == (3, 6, 3) and torch.equal(many[0], many[2])
    assert torch.allclose(many[0], one, rtol=1e-5, atol=1e-7)  # batched: rounding may differ
    assert torch.equal(model.gate_logits([torch.tensor(arch), np.zeros(6, int)]), many[:2])
    for bad in (
        (3, 3, 3),
        torch.tensor([3, 3, 3]),
        torch.tensor([[3, 3, 3, 1, 3, 9]]),
        torch.tensor(arch).float(),
        torch.tensor(arch) > 0,
        torch.zeros(2, 2, 6, dtype=torch.long),
    ):
        with pytest.raises(ValueError, match="not an NB201 architecture"):
            model.gate_logits(bad)


def test_scoring_leaves_the_model_in_the_callers_mode():
    torch.manual_seed(0)
    model = grown(close.CLOSENet(channels=4, cells=1, num_blocks=3), 2)
    images, labels = small_batch()
    for training in (True, False):
        model.train(training)
        close.score_arch(model, BEST_CIFAR10, images, labels, 8)
        close.edges_per_block(model, [BEST_CIFAR10], close.Config())
        close.gate_health(model, [BEST_CIFAR10])
        assert all(m.training == training for m in model.modules())


def test_adding_a_block_beyond_the_pool_is_a_clear_error():
    model = grown(close.CLOSENet(channels=4, cells=1, num_blocks=2), 2)
    with pytest.raises(ValueError, match="all 2 blocks are at work already"):
        close.add_glow_block(model)
    with pytest.raises(ValueError, match="all 6 blocks are at work already"):
        close.add_glow_block(close.CLOSENet(channels=4, cells=1, baseline=True))


def test_a_parameter_free_op_has_no_glow_weights():
    block = close.GlowBlock(4)
    assert block.weight(close.CONV1X1).shape == (4, 4, 1, 1) and block.weight(
        close.CONV3X3
    ).shape == (4, 4, 3, 3)
    for op in (close.NONE, close.SKIP, close.AVG_POOL):
        with pytest.raises(ValueError, match="has no weights"):
            block.weight(op)


# ---------------------------------------------------------------------------------------------
# 4. Curriculum and WIT
# ---------------------------------------------------------------------------------------------
def test_curriculum_schedule():
    levels = [close.curriculum_level(epoch, 250, 5) for epoch in range(250)]
    starts = [levels.index(level) for level in range(1, 6)]
    assert starts == [0, 50, 100, 150, 200]  # blocks added after epochs 0, 50, 100, 150, 200
    official = [close.curriculum_level(epoch, 1000, 5) for epoch in range(1000)]
    assert [official.index(level) for level in range(1, 6)] == [0, 200, 400, 600, 800]
    assert close.restart_epoch(close.Config(epochs=1000)) == 400


def trained_between_growths(levels=(2, 3, 4)):
    """Yield (model, level, outputs before the growth) with a little training between growths,
    so the blocks differ."""
    torch.manual_seed(0)
    model = close.CLOSENet(channels=4, cells=2, num_blocks=4)
    optimizer, _ = close.make_optimizer(model, close.Config())
    images, labels = small_batch()
    archs = close.unique_archs()[::700]
    for level in levels:
        for arch in archs[:3]:
            close.train_step(model, optimizer, images, labels, arch, 5.0)
        model.eval()
        before = {
            b: [model(images, arch, close.SharingAssignment([b] * 6)) for arch in archs]
            for b in range(level - 1)
        }
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        fresh = [
            [p.clone() for p in cell.glow_blocks[level - 1].parameters()] for cell in model.cells()
        ]
        last = model.gate.mlp[-1]
        fresh_rows = [last.weight[level - 1].clone(), last.bias[level - 1].clone()]
        close.add_glow_block(model)
        assert model.level == level
        assert {
            id(p) for p in model.parameters()
        } == held  # in place: the optimizer holds the same tensors
        for b in range(level - 1):  # blocks that existed compute exactly what they did
            assert all(
                torch.equal(model(images, arch, close.SharingAssignment([b] * 6)), out)
                for arch, out in zip(archs, before[b])
            )
        yield model, level, fresh, fresh_rows


def test_official_growth_adds_the_parent_to_the_fresh_init():
    for model, level, fresh, fresh_rows in trained_between_growths():
        assert len(model.cells()) == len(fresh) == 6
        for cell, fresh_block in zip(model.cells(), fresh):  # in every cell
            parent = cell.glow_blocks[level - 2].parameters()
            new = cell.glow_blocks[level - 1].parameters()
            assert all(torch.allclose(n, f + p) for n, f, p in zip(new, fresh_block, parent))
        # the GATE grows its own logit row, weights and bias: its init plus the parent's row
        last = model.gate.mlp[-1]
        for row, fresh_row in zip((last.weight, last.bias), fresh_rows):
            assert torch.allclose(row[level - 1], fresh_row + row[level - 2])
            assert not torch.allclose(row[level - 1], fresh_row)


def test_growth_gives_the_gate_a_gradient_where_twins_would_not():
    torch.manual_seed(0)
    model = close.CLOSENet(channels=4, cells=1, num_blocks=3)
    # straight after growth: block 1 descends from block 0, nothing trained since
    close.add_glow_block(model)
    images, labels = small_batch()
    arch = (3, 2, 3, 1, 3, 2)

    def hidden_gate_gradient():
        torch.manual_seed(1)
        _, grads = loss_and_grads(model, images, labels, arch, gated_assignment(model, arch))
        return torch.cat(
            [
                grads[n].flatten()
                for n in grads
                if n.startswith("gate.") and not n.startswith("gate.mlp.9")
            ]
        ).norm()

    assert hidden_gate_gradient() > 1e-5
    with torch.no_grad():  # an exact copy of block and logit row instead: twins
        for cell in model.cells():
            for twin, parent in zip(
                cell.glow_blocks[1].parameters(), cell.glow_blocks[0].parameters()
            ):
                twin.copy_(parent)
        for row in (model.gate.mlp[-1].weight, model.gate.mlp[-1].bias):
            row[1] = row[0]
    # no gradient into the encoder and hidden layers (but rounding)
    assert hidden_gate_gradient() < 1e-9


# ---------------------------------------------------------------------------------------------
# 5. Training
# ---------------------------------------------------------------------------------------------
def test_training_draws_from_the_unique_archs(monkeypatch):
    drawn = []

    def record(model, optimizer, images, labels, arch, grad_clip):
        drawn.append(arch)
        return torch.zeros(()), torch.zeros(len(labels), 10)

    monkeypatch.setattr(close, "train_step", record)
    torch.manual_seed(0)
    data = close.synthetic_dataset(train=3000, heldout=1)
    finished = close.train_epoch(
        close.CLOSENet(channels=4, cells=1), None, data, close.Config(batch_size=1)
    )
    assert len(drawn) == 3000 == finished["images"] and finished["losses"].shape == (3000,)
    # representatives only: isomorphs are never drawn twice over
    assert set(drawn) <= set(close.unique_archs())
    # uniform over 6,466 classes: 3,000 draws hit about 6466 * (1 - exp(-3000 / 6466)) = 2,400
    # distinct classes
    assert 2300 < len(set(drawn)) < 2530


def test_the_official_step_decays_every_active_weight_used_or_not_in_any_training_loop():
    torch.manual_seed(0)
    model = grown(close.CLOSENet(channels=4, cells=1, num_blocks=3), 2)
    cfg = close.Config()
    optimizer, _ = close.make_optimizer(model, cfg)
    # one decay for all
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.weight_decay]
    blocks = [cell.glow_blocks for cell in model.cells()]
    unused = [b[i].conv1x1.weight for b in blocks for i in (0, 1)]  # the arch has no nor_conv_1x1
    waiting = [p for b in blocks for p in b[2].parameters()]  # beyond the level: wait to grow
    before = [p.clone() for p in unused + waiting]
    images, labels = small_batch()
    optimizer.zero_grad()  # a plain loop of the user's own, with torch's default (set_to_none)
    F.cross_entropy(model(images, (3,) * 6), labels).backward()
    assert all(p.grad is None for p in unused + waiting)
    optimizer.step()
    shrink = 1 - cfg.lr * cfg.weight_decay  # a zero gradient: the first step is weight decay alone
    for p, old in zip(unused, before):
        assert torch.allclose(p, old * shrink, rtol=1e-6, atol=0) and not torch.equal(p, old)
    assert all(
        p.grad is None and torch.equal(p, old) for p, old in zip(waiting, before[len(unused) :])
    )
    assert not any(p.requires_grad for p in waiting)  # frozen until WIT brings them in
    close.add_glow_block(model)
    assert all(p.requires_grad for p in waiting)


def test_the_level_travels_with_the_weights_and_freezes_the_blocks_beyond_it():
    trained = grown(close.CLOSENet(channels=4, cells=1, num_blocks=4), 3)
    model = close.CLOSENet(channels=4, cells=1, num_blocks=4)
    model.load_state_dict(trained.state_dict())
    assert model.level == 3
    for cell in model.cells():
        assert [b.conv3x3.weight.requires_grad for b in cell.glow_blocks] == [True] * 3 + [False]


def test_train_step_is_the_official_step_bit_for_bit():
    """The official trainer (torch 1.x): gradients zeroed in place, never dropped, so every weight
    that has had one keeps being decayed and moved by momentum; oracle: a plain SGD loop whose
    active parameters all start with a zero gradient."""
    archs = [(3, 0, 0, 3, 0, 0), (2, 1, 4, 0, 2, 3), (4, 4, 4, 4, 4, 4), (3, 3, 3, 1, 3, 2)]
    images, labels = small_batch()
    cfg = close.Config()

    def train(level, official, zero_grad_to_none=False):
        torch.manual_seed(0)
        model = grown(close.CLOSENet(channels=4, cells=1, num_blocks=3), level)
        if official:
            optimizer = torch.optim.SGD(
                model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            for cell in model.cells():
                for p in cell.glow_blocks[level:].parameters():
                    p.grad = None  # blocks beyond the level are out of the official graph
        else:
            optimizer, _ = close.make_optimizer(model, cfg)
        for step, arch in enumerate(archs):
            torch.manual_seed(step)  # the same dropout and Gumbel draws in both loops
            if official:
                loss = F.cross_entropy(model(images, arch), labels)
                optimizer.zero_grad(set_to_none=zero_grad_to_none)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
            else:
                close.train_step(model, optimizer, images, labels, arch, cfg.grad_clip)
        return [p.detach().clone() for p in model.parameters()]

    for level in (1, 2):  # level 1: the GATE is decayed although it is out of the graph
        ours, official = train(level, False), train(level, True)
        assert all(torch.equal(a, b) for a, b in zip(ours, official))
    # torch 2's default, set_to_none, is another rule: unused weights escape the decay
    other = train(2, True, zero_grad_to_none=True)
    assert not all(torch.equal(a, b) for a, b in zip(train(2, False), other))


def test_train_step_clips_the_gradient_norm():
    model = grown(close.CLOSENet(channels=4, cells=1, num_blocks=3), 2)
    optimizer, _ = close.make_optimizer(model, close.Config())
    images, labels = small_batch()
    close.train_step(model, optimizer, images, labels, (3, 2, 1, 3, 4, 2), grad_clip=0.01)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])) == pytest.approx(0.01)


def test_train_restarts_the_learning_rate_and_momentum_at_40_percent(monkeypatch):
    """Officially at epoch 401 of 1,000: a new optimizer (lr back to --lr, no momentum) and a new
    plateau schedule; no other growth restarts."""
    cfg = close.Config(epochs=10, blocks=5)
    model = close.CLOSENet(channels=4, cells=1, num_blocks=5)
    state = close.TrainingState(*close.make_optimizer(model, cfg))
    seen = []

    def one_pass(model, optimizer, data, cfg):  # as if the plateau had cut lr, with momentum
        seen.append((optimizer, optimizer.param_groups[0]["lr"], len(optimizer.state)))
        optimizer.param_groups[0]["lr"] /= 4
        optimizer.state[next(model.parameters())]["momentum_buffer"] = torch.ones(1)
        return {"losses": torch.ones(1), "correct": torch.zeros(()), "images": 1}

    monkeypatch.setattr(close, "train_epoch", one_pass)
    close.train(model, None, cfg, state)
    restart = close.restart_epoch(cfg)
    assert restart == 4 and len(seen) == 10
    new = [e for e in range(1, 10) if seen[e][0] is not seen[e - 1][0]]
    assert new == [restart] and seen[restart][1:] == (cfg.lr, 0)
    assert all(lr < cfg.lr for _, lr, _ in seen[1:restart] + seen[restart + 1 :])
    assert state.optimizer is seen[-1][0] and state.scheduler.optimizer is state.optimizer


def test_train_step_takes_an_arch_as_a_tensor_of_its_ops():
    images, labels = (t.double() if t.is_floating_point() else t for t in small_batch(8))
    weights = []
    for arch in ((3, 2, 1, 3, 4, 2), torch.tensor([3, 2, 1, 3, 4, 2])):
        model = float64_model(False, 2)
        optimizer = close.make_optimizer(model, close.Config())[0]
        torch.manual_seed(0)
        close.train_step(model, optimizer, images, labels, arch, 5.0)
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


# ---------------------------------------------------------------------------------------------
# 6. Evaluation: the GATE's health, block preference, ranking metrics
# ---------------------------------------------------------------------------------------------
def test_arch_subsets_are_drawn_by_their_seed():
    subset = close.seeded_archs(6, 3)
    assert subset == close.seeded_archs(6, 3) != close.seeded_archs(6, 4)
    assert len(set(subset)) == 6 and set(subset) <= set(close.unique_archs())
    assert close.seeded_archs(0, 3) == close.seeded_archs(7000, 3) == close.unique_archs()


def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    for capability, precision in (
        ((7, 5), torch.float32),
        ((8, 0), torch.bfloat16),
        ((9, 0), torch.bfloat16),
        ((6, 1), torch.float32),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
        assert close.precision(torch.device("cuda:0")) == precision, capability
    assert close.precision(torch.device("cpu")) == torch.float32
    assert not close.autocast(torch.device("cpu"))._enabled


def test_gate_health_on_a_hand_built_gate(monkeypatch):
    model = grown(close.CLOSENet(channels=4, cells=1, num_blocks=3), 3)
    # the last has no live parameterised edge (0->1 is dead)
    archs = [(3,) * 6, (2,) * 6, (3, 0, 0, 1, 0, 0)]
    logits = torch.tensor([[[1.0, 0, 0]] * 6, [[0, 0, 1.0]] * 6, [[100.0, 0, 0]] * 6])
    monkeypatch.setattr(model, "gate_logits", lambda given: logits if given == archs else None)
    health = close.gate_health(model, archs)
    # the dead arch is left out
    centred = np.array([[2 / 3, -1 / 3, -1 / 3]] * 6 + [[-1 / 3, -1 / 3, 2 / 3]] * 6)
    assert health["spread"] == pytest.approx(centred.std(0, ddof=1).mean())
    assert health["off_dominant"] == pytest.approx(0.5)  # 6 edges on block 0, 6 on block 2
    assert health["entropy"] == pytest.approx(
        scipy.stats.entropy(scipy.special.softmax([1, 0, 0])) / np.log(3)
    )
    # level 1: no GATE at work
    assert (
        close.gate_health(close.CLOSENet(channels=4, cells=1, num_blocks=3), archs)["spread"]
        is None
    )
    words = [
        close.describe_gate({"spread": spread, "off_dominant": off, "entropy": 0.9})
        for spread, off in ((0.5, 0.0), (1e-4, 0.3), (1e-4, 0.0), (0.5, 0.3))
    ]
    assert [("BLIND" in w, "COLLAPSED" in w, "routes by arch" in w) for w in words] == [
        (False, True, False),
        (True, False, False),
        (True, True, False),  # both at once: both said
        (False, False, True),
    ]


def test_correlations_by_counting_pairs_and_average_ranks():
    """Independent oracles: Kendall tau-b from concordant and discordant pairs, Spearman as the
    Pearson correlation of average ranks, Pearson from its formula; ties on both sides."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=120).round(1)  # ties in the truth too
    predicted = truth + rng.normal(size=120)
    predicted[:20] = predicted[0]
    i, j = np.triu_indices(len(truth), 1)
    dx, dy = np.sign(predicted[i] - predicted[j]), np.sign(truth[i] - truth[j])
    pairs = len(i)
    tau_b = (np.sum(dx * dy > 0) - np.sum(dx * dy < 0)) / np.sqrt(
        (pairs - np.sum(dx == 0)) * (pairs - np.sum(dy == 0))
    )

    def average_ranks(x):
        return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        return np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))

    metrics = close.ranking_metrics(predicted, truth)
    assert np.sum(dy == 0) > 0 and np.sum(dx == 0) > 0
    assert metrics["kendall_tau"] == pytest.approx(tau_b, abs=1e-12)
    spearman = pearson(average_ranks(predicted), average_ranks(truth))
    assert metrics["spearman"] == pytest.approx(spearman, abs=1e-12)
    assert metrics["pearson"] == pytest.approx(pearson(predicted, truth), abs=1e-12)


def test_ranks_precision_and_best_worst_rank_with_ties_in_the_truth_by_hand():
    assert close.descending_ranks([3, 5, 5, 1]).tolist() == [2, 0, 0, 3]  # ties share the best
    truth = [90, 90, 80, 70, 70, 70, 60, 50, 40, 30]  # true ranks 0, 0, 2, 3, 3, 3, 6, 7, 8, 9
    predicted = [1, 10, 2, 9, 8, 7, 6, 5, 4, 3]  # order: archs 1, 3, 4, 5, 6, 7, 8, 9, 2, 0
    m = close.ranking_metrics(predicted, truth, ratios=(0.1, 0.2, 0.5))
    # top-1: arch 1, tied first: in the true top 1
    assert m["P@top10%"] == 1 and m["BR@10%"] == 1 and m["WR@10%"] == 1
    # {1, 3}: true ranks 0 and 3, one of them under 2
    assert m["P@top20%"] == 0.5 and m["BR@20%"] == 1 and m["WR@20%"] == 4
    # {1, 3, 4, 5, 6}: true ranks 0, 3, 3, 3, 6: four under 5
    assert m["P@top50%"] == 0.8 and m["BR@50%"] == 1 and m["WR@50%"] == 7
    # ranks from the bottom: archs 9, 8, 7, 6 -> 0-3, archs 3, 4, 5 -> 4, arch 2 -> 7, 0 and 1 -> 8
    # predicted bottom: {0, 2} -> 8, 7: none; {0, 2, 9, 8, 7} -> 8, 7, 0, 1, 2: three under 5
    assert m["P@bottom20%"] == 0 and m["P@bottom50%"] == 0.6


def test_perfect_and_reversed_rankings():
    truth = np.arange(100.0)
    perfect = close.ranking_metrics(truth * 2 + 1, truth)
    reverse = close.ranking_metrics(-truth, truth)
    assert perfect["kendall_tau"] == pytest.approx(1) and reverse["kendall_tau"] == pytest.approx(
        -1
    )
    for name, k in (("1%", 1), ("5%", 5), ("10%", 10), ("50%", 50)):
        assert perfect[f"P@top{name}"] == 1 and perfect[f"P@bottom{name}"] == 1
        assert perfect[f"BR@{name}"] == 1 and perfect[f"WR@{name}"] == k
        assert reverse[f"BR@{name}"] == 100 - k + 1 and reverse[f"WR@{name}"] == 100
    assert reverse["P@top10%"] == 0 and reverse["P@bottom10%"] == 0
    assert reverse["P@top50%"] == 0


def test_precision_and_best_worst_rank_by_hand():
    truth = [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]  # true ranks 0..9
    # predicted order: archs 1, 3, 8, 9, 0 | 6, 5, 4, 2, 7
    predicted = [5, 9, 1, 8, 2, 3, 4, 0, 7, 6]
    m = close.ranking_metrics(predicted, truth, ratios=(0.1, 0.2, 0.5))
    # top-1 is arch 1 (true rank 1)
    assert m["P@top10%"] == 0 and m["BR@10%"] == 2 and m["WR@10%"] == 2
    # {1, 3}: only 1 in true top-2
    assert m["P@top20%"] == 0.5 and m["BR@20%"] == 2 and m["WR@20%"] == 4
    assert m["P@top50%"] == 0.6 and m["BR@50%"] == 1 and m["WR@50%"] == 10  # {1,3,8,9,0} vs {0..4}
    # {7,2} vs {9,8}; {7,2,4,5,6} vs {5..9}
    assert m["P@bottom10%"] == 0 and m["P@bottom20%"] == 0 and m["P@bottom50%"] == 0.6
    assert close.ranking_metrics([1, 2, 3], [1, 2, 3])["P@top1%"] is None  # k = int(3 * 0.01) = 0


def test_ranking_metrics_reject_nan():
    with pytest.raises(ValueError, match="NaN in the truth"):
        close.ranking_metrics([1.0, 2.0, 3.0], [1.0, float("nan"), 3.0])


def test_nb201_truth_is_the_mean_of_each_class_by_hand():
    nb201_csv = shared_file("nb201_test_accuracy.csv")
    table = {row["arch"]: float(row["cifar10"]) for row in csv.DictReader(open(nb201_csv))}
    truth = close.load_ground_truth(str(nb201_csv))
    # One class worked out by hand from NB201's rule: node 3 = conv1x1(x) + two zeros. Nothing
    # from node 2 (two terms: never exactly zero); conv1x1 from the input and nothing from node 1
    # (no op, or node 1 zero), or conv1x1 through node 1 (skip then conv1x1, or the reverse).
    c1, skip, none = close.CONV1X1, close.SKIP, close.NONE
    members = [
        a
        for a in close.ALL_ARCHS
        if a[5] == none
        and (
            a[3] == c1
            and none in (a[0], a[4])
            or a[3] == none
            and (a[0], a[4]) in ((skip, c1), (c1, skip))
        )
    ]
    mean = np.mean([table[close.arch_to_str(a)] for a in members])
    assert len(members) == 275 and all(
        truth.accuracy["cifar10"][a] == pytest.approx(mean, abs=1e-9) for a in members
    )
    assert len({truth.rank["cifar10"][a] for a in members}) == 1
    # NB201's best (index 6111), a class of its own: 94.37%, rank 1
    assert truth.accuracy["cifar10"][close.str_to_arch(BEST_CIFAR10)] == table[BEST_CIFAR10]
    assert table[BEST_CIFAR10] == pytest.approx(94.37, abs=0.005)
    assert truth.rank["cifar10"][close.str_to_arch(BEST_CIFAR10)] == 1
    assert set(truth.accuracy) == set(truth.rank) == {"cifar10", "cifar100", "ImageNet16-120"}
    for dataset, ranks in truth.rank.items():  # each dataset ranks the 6,466 classes itself
        best = min(close.unique_archs(), key=ranks.__getitem__)
        assert ranks[best] == 1 and truth.accuracy[dataset][best] == max(
            truth.accuracy[dataset].values()
        )


# ---------------------------------------------------------------------------------------------
# 7. Search
# ---------------------------------------------------------------------------------------------
def test_regularized_evolution_finds_the_optimum_of_a_synthetic_fitness():
    calls = []

    def fitness(arch):  # unique optimum: every edge nor_conv_3x3, then nor_conv_1x1 counts half
        calls.append(arch)
        return sum(
            1.0 if op == close.CONV3X3 else 0.5 if op == close.CONV1X1 else 0.0 for op in arch
        )

    best, value, history = close.regularized_evolution(
        fitness, budget=400, population_size=20, tournament_size=5, seed=0
    )
    assert best == (close.CONV3X3,) * 6 and value == 6.0
    assert len(calls) == len(history) == 400  # the budget counts fitness calls
    assert all(arch in set(close.unique_archs()) for arch in calls)  # searches unique archs only


def test_mutation_changes_exactly_the_cell():
    import random

    rng = random.Random(0)
    for arch in close.unique_archs()[::97]:
        child = close.mutate(arch, rng)
        assert child != arch and close.canonical(child) == child


def test_search_does_not_start_from_the_scored_subset():
    import random

    first = []
    close.regularized_evolution(
        lambda arch: first.append(arch) or 0.0, budget=20, population_size=20, seed=0
    )
    # --seed 0 and --eval-seed 0 must not coincide
    assert first != random.Random(0).sample(close.unique_archs(), 20)
    assert len(set(first) & set(random.Random(0).sample(close.unique_archs(), 200))) < 5


def test_regularized_evolution_on_the_nb201_table():
    truth = close.load_ground_truth(str(shared_file("nb201_test_accuracy.csv")))
    fitness = truth.accuracy["cifar10"].__getitem__
    best, value, _ = close.regularized_evolution(fitness, budget=1000, seed=0)
    assert value > 94.0 and truth.rank["cifar10"][best] <= 10


def test_random_search_evaluates_distinct_archs_and_keeps_the_best():
    calls = []

    def fitness(arch):
        calls.append(arch)
        return float(close.arch_index(arch) % 997)

    best, value, history = close.random_search(fitness, budget=300, seed=4)
    assert len(calls) == len(set(calls)) == len(history) == 300  # distinct, the budget
    assert set(calls) <= set(close.unique_archs())
    assert (best, value) == max(history, key=lambda member: member[1])
    assert close.random_search(fitness, budget=300, seed=4)[0] == best  # seeded
    assert close.random_search(fitness, budget=300, seed=5)[0] != best
    _, _, everything = close.random_search(fitness, budget=10**5)
    assert len(everything) == 6466  # at most every unique arch, each once


def test_evolution_beats_random_search_on_the_nb201_table():
    """As in NB201's own comparison of REA and random search: 10 seeds, 300 evaluations."""
    fitness = close.load_ground_truth(str(shared_file("nb201_test_accuracy.csv"))).accuracy
    fitness = fitness["cifar10"].__getitem__
    evolution = [close.regularized_evolution(fitness, 300, seed=s)[1] for s in range(10)]
    random_search = [close.random_search(fitness, 300, seed=s)[1] for s in range(10)]
    assert np.mean(evolution) > np.mean(random_search) + 0.05 and np.mean(evolution) > 94.3


# ---------------------------------------------------------------------------------------------
# The method copied out whole: the top of close.py with sections 1-7, nothing of 8 and 9
# ---------------------------------------------------------------------------------------------
def close_sections(*numbers):
    """The top of close.py (imports, Config, the recipe's constants) and the sections `numbers`,
    cut out of the file by their headings."""
    top, *sections = re.split(r"(?m)^(?=# -+\n# \d+\. )", (ROOT / "close.py").read_text())
    by_number = {int(re.search(r"# (\d+)\. ", text).group(1)): text for text in sections}
    assert sorted(by_number) == list(range(1, 10))
    return top + "".join(by_number[n] for n in numbers)


def fresh_module(source, monkeypatch):
    module = types.ModuleType("close_copy")
    monkeypatch.setitem(sys.modules, "close_copy", module)  # where dataclasses look
    exec(compile(source, "close_copy.py", "exec"), module.__dict__)
    return module


def test_the_top_with_sections_1_and_3_alone_builds_a_closenet_that_trains_at_every_level(
    monkeypatch,
):
    copy = fresh_module(close_sections(1, 3), monkeypatch)
    assert not hasattr(copy, "add_glow_block") and not hasattr(copy, "train")
    torch.manual_seed(0)
    images, labels = small_batch()
    for model in (copy.CLOSENet(4, 1, num_blocks=3), copy.CLOSENet(4, 1, baseline=True)):
        for level in (1, 2, 3) if model.gate else (6,):
            model.level = level
            model.zero_grad(set_to_none=True)
            with copy.autocast(images.device):
                F.cross_entropy(model.train()(images, BEST_CIFAR10), labels).backward()
            grads = [b.conv3x3.weight.grad for b in model.cells()[0].glow_blocks[:level]]
            assert any(g is not None and g.any() for g in grads)
            if model.gate:  # the GATE takes part from level 2 on
                gate = [p.grad for p in model.gate.parameters() if p.grad is not None]
                assert any(g.any() for g in gate) == (level > 1)
            model.eval()(images, BEST_CIFAR10)  # scoring's draw per arch


def test_the_top_with_sections_1_to_7_runs_the_papers_loop_end_to_end(monkeypatch, capsys):
    copy = fresh_module(close_sections(1, 2, 3, 4, 5, 6, 7), monkeypatch)
    clock = itertools.count(0, 61)  # a minute passes at every look at the clock
    copy.time = types.SimpleNamespace(monotonic=lambda: next(clock))
    cfg = copy.Config(
        data="synthetic",
        channels=4,
        cells=1,
        blocks=3,
        epochs=3,
        batch_size=64,
        search_budget=12,
        population=4,
        tournament=2,
    )
    data = copy.synthetic_dataset(train=128, heldout=128)
    model = copy.build_model(cfg, data.num_classes, torch.device("cpu"))
    state = copy.TrainingState(*copy.make_optimizer(model, cfg))
    levels = []
    copy.train(model, data, cfg, state, lambda finished: levels.append(model.level))
    assert levels == [1, 2, 3] and state.epoch == 3  # every growth
    assert "steps: 1/2" in capsys.readouterr().out  # the progress line
    images, labels = copy.heldout_set(data, cfg)
    archs = copy.seeded_archs(16, cfg.eval_seed)
    scores = {arch: copy.score_arch(model, arch, images, labels, cfg.batch_size) for arch in archs}
    truth = [sum(op in (close.CONV1X1, close.CONV3X3) for op in arch) for arch in archs]
    ranking = copy.ranking_metrics([scores[arch][0] for arch in archs], truth)
    assert -1 <= ranking["kendall_tau"] <= 1
    found = copy.search_with_supernet(model, images, labels, cfg, dict(scores))
    assert found["best"] in copy.unique_archs() and found["unique_evaluated"] <= 12


# ---------------------------------------------------------------------------------------------
# 8. Runs: end to end, the curve, resume, outputs, bad input
# ---------------------------------------------------------------------------------------------
def fake_nb201_csv(path, datasets=("cifar10",)):
    """A made-up table over all 15,625 archs (not NB201's numbers): accuracy grows with conv ops,
    and differs between datasets by the op on one edge."""
    convs = np.array([sum(op in (2, 3) for op in a) for a in close.ALL_ARCHS])
    columns = {
        d: 50 - 10 * i + 5 * convs + np.array([a[i] for a in close.ALL_ARCHS])
        for i, d in enumerate(datasets)
    }
    nb.NB201([close.arch_to_str(a) for a in close.ALL_ARCHS], columns).save_csv(path)
    return path


@pytest.fixture(scope="module")
def fake_nb201(tmp_path_factory):
    return fake_nb201_csv(tmp_path_factory.mktemp("nb201") / "fake.csv", close.NB201_DATASETS)


def quietly(argv):
    """close.main(argv) and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = close.main(argv)
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fake_nb201):
    """One finished run, 2 epochs and 2 blocks, with --nb201, --eval-seed 3 and a curve point
    after each epoch, for the tests that read a run (a test that changes it works on a copy);
    and its output."""
    out = tmp_path_factory.mktemp("finished") / "a-run-with-a-rather-long-folder-name"
    argv = TINY + ["--epochs", "2", "--blocks", "2", "--nb201", str(fake_nb201), "--out", str(out)]
    code, printed = quietly(argv + ["--eval-seed", "3"])
    assert code == 0, printed
    return out, printed


def copied(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / run.name))


def run_rows(out):
    """log.csv (timings aside), scores.csv, the curve (timings aside) and the checkpoint."""
    log = [
        {k: v for k, v in row.items() if k not in ("seconds", "images_per_s")}
        for row in csv.DictReader(open(out / "log.csv"))
    ]
    curve = [{k: v for k, v in row.items() if k != "seconds"} for row in close.read_curve(out)]
    return (
        log,
        (out / "scores.csv").read_text(),
        curve,
        (out / "curve_scores.csv").read_text() if curve else None,
        torch.load(out / "checkpoint.pt", weights_only=True),
    )


def test_end_to_end_run_writes_every_output(finished_run):
    out, printed = finished_run
    for name in (
        "config.json",
        "log.csv",
        "checkpoint.pt",
        "scores.csv",
        "metrics.json",
        "search.json",
        "curve.csv",
        "curve_scores.csv",
    ):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranking"]["n"] == 12 and -1 <= metrics["ranking"]["kendall_tau"] <= 1
    assert set(metrics["times"]) == {"data_s", "train_s", "score_s", "search_s"}
    assert metrics["precision"] == "float32" and metrics["device"] == "cpu"
    with open(out / "scores.csv") as file:
        rows = list(csv.DictReader(file))
    live_conv_edges = sum(len(close.routed_edges(row["arch"])) for row in rows)
    assert (
        len(metrics["scoring_edges_per_block"]) == 2
        and sum(metrics["scoring_edges_per_block"]) == live_conv_edges
    )
    assert (
        set(metrics["gate"]) == {"spread", "off_dominant", "entropy"}
        and 0 <= metrics["gate"]["off_dominant"] <= 1
    )
    assert len(rows) == 12 and all(row["nb201_accuracy"] for row in rows)
    log = list(csv.DictReader(open(out / "log.csv")))
    assert [row["level"] for row in log] == ["1", "2"]
    search = json.loads((out / "search.json").read_text())
    assert search["budget"] == 16 and search["strategy"] == "evolution"
    assert set(search["best"]["nb201"]) == set(close.NB201_DATASETS)
    assert 1 <= search["best"]["nb201"]["cifar10"]["rank"] <= 6466
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["model"]["_extra_state"]["level"] == 2
    assert [point["epoch"] for point in state["curve"]] == [1, 2]  # epochs // 10, at least 1
    assert "kendall_tau" in printed and "search (evolution, 16 evaluations) found" in printed
    assert printed.splitlines()[0].endswith(", cpu, float32")  # the precision, first line


def test_the_curve_is_the_final_scorings_protocol_on_the_tracked_archs(finished_run, fake_nb201):
    """Its last point recomputed from the checkpoint: score_arch on the first --track-batches
    held-out batches, ranking_metrics against NB201, for the --eval-seed subset."""
    out, printed = finished_run
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = close.Config(**checkpoint["config"])
    data = close.load_dataset(cfg)
    model = close.build_model(cfg, data.num_classes, torch.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    images, labels = close.heldout_set(data, cfg, cfg.track_batches)
    archs = close.seeded_archs(cfg.track_archs, cfg.eval_seed)
    assert len(archs) == 6 and len(labels) == 64
    scores = [
        close.score_arch(model, a, images, labels, cfg.batch_size, cfg.eval_gate, cfg.eval_seed)
        for a in archs
    ]
    truth = close.load_ground_truth(str(fake_nb201)).accuracy["cifar10"]
    ranking = close.ranking_metrics([s[0] for s in scores], [truth[a] for a in archs])
    last = close.read_curve(out)[-1]
    assert (last["epoch"], last["level"], last["lr"]) == (2, 2, cfg.lr)
    assert last["mean_oneshot_accuracy"] == np.mean([s[0] for s in scores])
    for name in ("kendall_tau", "spearman", "P@top5%"):
        assert last[name] == ranking[name] or last[name] is ranking[name] is None, name
    rows = list(csv.DictReader(open(out / "curve_scores.csv")))
    assert [row["epoch"] for row in rows] == ["1"] * 6 + ["2"] * 6
    assert [
        (close.str_to_arch(r["arch"]), float(r["oneshot_accuracy"]), float(r["oneshot_loss"]))
        for r in rows[6:]
    ] == [(a, *s) for a, s in zip(archs, scores)]
    # the epoch line and the summary carry the curve
    assert f"tracked tau {last['kendall_tau']:.3f}" in printed.split("epoch    2/2")[1]
    table = printed.split("curve (")[1].splitlines()
    assert table[1].split() == ["epoch", *close.CURVE_FIELDS[1:7]]
    assert table[3].split()[:3] == ["2", "2", "0.050"]


def test_tracking_leaves_training_bit_identical(straight_run, tmp_path):
    """The same run without tracking: the same weights, log, scores and search."""
    untracked = tmp_path / "untracked"
    assert quietly(RESUME_ARGS + ["--track-every", "0", "--out", str(untracked)])[0] == 0
    log_a, scores_a, curve_a, _, state_a = run_rows(straight_run)
    log_b, scores_b, curve_b, _, state_b = run_rows(untracked)
    assert [p["epoch"] for p in curve_a] == [2, 3] and curve_b == []
    assert log_a == log_b and scores_a == scores_b
    assert all(
        torch.equal(t, state_b["model"][k])
        for k, t in state_a["model"].items()
        if k != "_extra_state"
    )
    assert (straight_run / "search.json").read_text() == (untracked / "search.json").read_text()


def test_random_search_and_the_found_cell_on_nb201s_three_datasets(finished_run, tmp_path):
    out = tmp_path / "random"
    code, printed = quietly(
        ["--load", str(finished_run[0] / "checkpoint.pt"), "--search", "random", "--out", str(out)]
    )
    assert code == 0
    search = json.loads((out / "search.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    truth, best = close.load_ground_truth(cfg["nb201"]), close.str_to_arch(search["best"]["arch"])
    assert search["strategy"] == "random" and search["unique_evaluated"] == 16
    assert search["best"]["nb201"] == {
        d: {"accuracy": truth.accuracy[d][best], "rank": truth.rank[d][best]}
        for d in close.NB201_DATASETS
    }
    assert json.loads((out / "metrics.json").read_text())["search"] == search
    assert "search (random, 16 evaluations) found" in printed and "no complete" not in printed
    for d in close.NB201_DATASETS:  # the summary's rows, as --compare prints them
        row = next(line for line in printed.splitlines() if line.startswith(f"found {d} "))
        assert row.endswith(f"{truth.accuracy[d][best]:.2f}% #{truth.rank[d][best]:,}")


def test_every_arch_gets_its_class_ground_truth(tmp_path, capsys):
    nb201 = fake_nb201_csv(tmp_path / "fake.csv")  # CIFAR-10 only
    dead_edge = (3, 0, 0, 2, 0, 0)  # 0->1 is dead: not the representative of its class
    assert close.canonical(dead_edge) != dead_edge
    table = {row["arch"]: float(row["cifar10"]) for row in csv.DictReader(open(nb201))}
    truth = close.load_ground_truth(str(nb201))
    assert "no complete cifar100, ImageNet16-120 column" in capsys.readouterr().out
    accuracy, rank = truth.accuracy["cifar10"], truth.rank["cifar10"]
    members = [a for a in close.ALL_ARCHS if close.canonical(a) == close.canonical(dead_edge)]
    assert len(members) > 1
    assert accuracy[dead_edge] == pytest.approx(
        np.mean([table[close.arch_to_str(a)] for a in members])
    )
    assert rank[dead_edge] == rank[close.canonical(dead_edge)] and set(truth.accuracy) == {
        "cifar10"
    }


def test_scoring_and_search_from_a_checkpoint_alone(finished_run, tmp_path):
    out = finished_run[0]
    again = tmp_path / "rescored"
    code, printed = quietly(["--load", str(out / "checkpoint.pt"), "--out", str(again)])
    assert code == 0 and printed.count("no curve") == 1 and not (again / "curve.csv").exists()
    for name in ("scores.csv", "search.json"):
        assert (again / name).read_text() == (out / name).read_text(), name


def test_the_python_api_scores_an_arch_as_the_command_line_does(finished_run):
    out = finished_run[0]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = close.Config(**checkpoint["config"])
    data = close.load_dataset(cfg)
    model = close.build_model(cfg, data.num_classes, torch.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    images, labels = close.heldout_set(data, cfg)
    for row in list(csv.DictReader(open(out / "scores.csv")))[:4]:  # level 2: the GATE decides
        scored = close.score_arch(
            model, row["arch"], images, labels, cfg.batch_size, cfg.eval_gate, cfg.eval_seed
        )
        assert scored == (float(row["oneshot_accuracy"]), float(row["oneshot_loss"]))


@pytest.fixture
def ctrl_c_interrupts():
    """Ctrl-C raises KeyboardInterrupt, as in a terminal, also when the suite runs as a background
    job (a shell starts those with SIGINT ignored, and os.kill(SIGINT) would then do nothing)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


# 3 epochs, 3 blocks, 2 steps per epoch: epoch 2 (index 1) starts with a growth and the learning
# rate restart; curve points after epoch 2 and after the last
RESUME_ARGS = TINY + ["--epochs", "3", "--blocks", "3", "--track-every", "2"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert quietly(RESUME_ARGS + ["--out", str(out)])[0] == 0
    return out


def stopped_run(out, monkeypatch, stop_at_call):
    """A run stopped by Ctrl-C after its stop_at_call-th training step."""
    real_train_step, calls = close.train_step, []

    def train_step_then_ctrl_c(*a, **k):
        calls.append(1)
        result = real_train_step(*a, **k)
        if len(calls) == stop_at_call:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        return result

    with monkeypatch.context() as patch:
        patch.setattr(close, "train_step", train_step_then_ctrl_c)
        assert quietly(RESUME_ARGS + ["--out", str(out)])[0] == 130
    checkpoint = out / "checkpoint.pt"
    saved = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else {"epoch": 0}
    assert saved["epoch"] == (stop_at_call - 1) // 2
    return saved


# before any checkpoint; and in epoch 3, after the restart, where the optimizer's momentum and
# the plateau schedule saved with epoch 2 are what the rest of the run goes on from
@pytest.mark.parametrize("stop_at_call", [1, 5])
def test_resume_is_bit_identical_to_an_uninterrupted_run(
    straight_run, tmp_path, monkeypatch, stop_at_call, ctrl_c_interrupts
):
    stopped_run(tmp_path / "resumed", monkeypatch, stop_at_call)
    # repeats the stopped epoch, and continues the curve: no point lost, none repeated
    assert quietly(RESUME_ARGS + ["--out", str(tmp_path / "resumed"), "--resume"])[0] == 0
    *rows_a, state_a = run_rows(straight_run)
    *rows_b, state_b = run_rows(tmp_path / "resumed")
    assert rows_a == rows_b and [p["epoch"] for p in rows_b[2]] == [2, 3]
    assert state_a["model"].keys() == state_b["model"].keys()
    for name, tensor in state_a["model"].items():
        assert name == "_extra_state" or torch.equal(tensor, state_b["model"][name]), name
    momentum = [s["momentum_buffer"] for s in state_b["optimizer"]["state"].values()]
    assert len(momentum) > 0 and all(
        torch.equal(m, state_a["optimizer"]["state"][i]["momentum_buffer"])
        for i, m in zip(state_b["optimizer"]["state"], momentum)
    )


def test_resume_goes_on_with_the_saved_plateau_schedule(tmp_path, monkeypatch, ctrl_c_interrupts):
    """A schedule saved one bad epoch from halving the learning rate halves it after the next."""
    out = tmp_path / "run"
    saved = stopped_run(out, monkeypatch, 5)  # checkpoint after epoch 2 of 3
    assert saved["scheduler"]["patience"] == 1
    saved["scheduler"] |= {"best": 0.0, "num_bad_epochs": 1}  # no loss gets below 0
    torch.save(saved, out / "checkpoint.pt")
    assert quietly(RESUME_ARGS + ["--out", str(out), "--resume"])[0] == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == close.Config().lr / 2
    assert state["scheduler"]["num_bad_epochs"] == 0  # reset by the halving


def test_scoring_resumes_from_partial_scores(finished_run, tmp_path, monkeypatch):
    out = copied(finished_run[0], tmp_path)
    complete = (out / "scores.csv").read_text()
    lines = complete.splitlines(keepends=True)
    (out / "scores.csv").write_text("".join(lines[:6]) + lines[6][:10])  # 5 rows and a torn one
    scored = []
    real_score_arch = close.score_arch
    monkeypatch.setattr(
        close,
        "score_arch",
        lambda model, arch, *a, **k: scored.append(arch) or real_score_arch(model, arch, *a, **k),
    )
    assert quietly(["--out", str(out), "--resume", "--search-budget", "0"])[0] == 0
    assert len(scored) == 12 - 5
    assert (out / "scores.csv").read_text() == complete


def test_resume_and_load_take_the_runs_own_options(finished_run, tmp_path, capsys):
    out = copied(finished_run[0], tmp_path)
    (out / "metrics.json").unlink()
    # nothing retyped: data, sizes and scoring come from the run
    assert quietly(["--resume", "--out", str(out)])[0] == 0
    assert json.loads((out / "metrics.json").read_text())["scored_archs"] == 12
    cfg, _ = close.settle_options(
        close.Config(data="/elsewhere"), {"data"}, False, str(out / "checkpoint.pt")
    )
    assert (
        cfg.channels == 4
        and cfg.eval_archs == 12
        and cfg.out == str(out / "rescored")
        and cfg.data == "/elsewhere"
    )
    assert "--channels (4 there, 8 now)" in error_line(
        capsys, ["--load", str(out / "checkpoint.pt"), "--channels", "8"]
    )
    for option in ("--track-archs", "--eval-seed"):  # a resumed curve keeps its protocol
        assert f"{option} (" in error_line(capsys, ["--resume", "--out", str(out), option, "7"])
    # a run from before tracking (no such options saved) resumes with the defaults
    config = json.loads((out / "config.json").read_text())
    for name in ("track_every", "track_archs", "track_batches"):
        del config[name]
    (out / "config.json").write_text(json.dumps(config))
    cfg, _ = close.settle_options(close.Config(out=str(out)), {"out"}, True, "")
    assert cfg.track_archs == close.Config().track_archs and cfg.channels == 4


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_train_step, calls = close.train_step, []

    def poisoned_train_step(model, optimizer, images, labels, arch, grad_clip):
        calls.append(arch)
        loss, logits = real_train_step(model, optimizer, images, labels, arch, grad_clip)
        return (
            loss * float("nan") if len(calls) == 2 + 2 else loss
        ), logits  # epoch 2 (2 steps/epoch), step 2

    monkeypatch.setattr(close, "train_step", poisoned_train_step)
    err = error_line(capsys, TINY + ["--epochs", "2", "--blocks", "2", "--out", str(out)], code=1)
    assert "non-finite in epoch 2" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_training_out_of_gpu_memory_is_one_line_and_keeps_the_last_epoch(
    tmp_path, capsys, monkeypatch
):
    out, real_train_step, calls = tmp_path / "run", close.train_step, []

    def step(*args):
        calls.append(1)
        return out_of_memory() if len(calls) == 3 else real_train_step(*args)  # epoch 2

    monkeypatch.setattr(close, "train_step", step)
    err = error_line(capsys, TINY + ["--epochs", "2", "--blocks", "2", "--out", str(out)], code=1)
    assert "out of GPU memory with one batch of --batch-size 64 (cpu)" in err and "--resume" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_scoring_out_of_gpu_memory_is_one_line_keeps_the_scores_and_resumes(
    finished_run, tmp_path, capsys, monkeypatch
):
    out = copied(finished_run[0], tmp_path)
    (out / "metrics.json").unlink()
    lines = (out / "scores.csv").read_text().splitlines(keepends=True)
    (out / "scores.csv").write_text("".join(lines[:4]))  # 3 archs scored
    real_score_arch, calls = close.score_arch, []

    def score_arch(*args, **kwargs):  # one batch does not fit at the 3rd arch of this session
        calls.append(1)
        return out_of_memory() if len(calls) == 3 else real_score_arch(*args, **kwargs)

    monkeypatch.setattr(close, "score_arch", score_arch)
    err = error_line(capsys, ["--out", str(out), "--resume"], code=1)
    assert "out of GPU memory" in err and "--batch-size 64" in err
    assert len((out / "scores.csv").read_text().splitlines()) == 1 + 3 + 2  # kept as they came
    monkeypatch.setattr(close, "score_arch", real_score_arch)
    assert quietly(["--out", str(out), "--resume"])[0] == 0
    assert (out / "scores.csv").read_text() == (finished_run[0] / "scores.csv").read_text()


def test_interrupt_before_anything_is_saved_says_so(tmp_path, capsys, monkeypatch):
    def ctrl_c(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(close, "load_dataset", ctrl_c)
    assert (
        close.main(TINY + ["--epochs", "1", "--blocks", "1", "--out", str(tmp_path / "run")]) == 130
    )
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--resume" not in err and not (tmp_path / "run").exists()


def test_library_callers_keep_sigterm(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    with close.StopRequest():
        # so `timeout pytest` can stop a training test
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) != signal.default_int_handler


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "tpu"], "unknown device"),
        (["--epochs", "2", "--blocks", "5"], "smaller than the 5 curriculum stages"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--blocks", "0"], "--blocks must be positive"),
        (["--nb201", "/nonexistent/nb201.csv"], "--nb201 /nonexistent/nb201.csv"),
        (["--data", "/nonexistent/folder"], "--data /nonexistent/folder"),
        (["--track-batches", "5"], "--track-batches 5: the held-out split has 4 batches of 64"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--momentum", "-0.5"], "--momentum must be in [0, 1)"),
        (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
        (["--population", "0"], "--population must be positive"),
        (["--tournament", "0"], "--tournament must be positive"),
        (["--grad-clip", "0"], "--grad-clip must be positive"),
        (["--eval-gate", "best"], "--eval-gate: invalid choice: 'best'"),
        (["--lr", "fast"], "--lr: invalid float value"),
        (["--images-per-pass", "100"], "--images-per-pass must be 0 or a multiple of --batch"),
        (["--images-per-pass", "-64"], "--images-per-pass must be 0 or more"),
        (["--track-every", "-2"], "--track-every must be 0 or more, or -1 (epochs // 10)"),
        (["--track-archs", "1"], "--track-archs must be 2 to 6,466, got 1"),
        (["--track-archs", "6467"], "--track-archs must be 2 to 6,466, got 6467"),
        (["--track-batches", "0"], "--track-batches must be positive"),
    ],
)
def test_bad_input_is_one_clear_line_and_touches_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    err = error_line(capsys, TINY + ["--epochs", "2", "--blocks", "2", "--out", str(out)] + extra)
    assert message in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert "CUDA is not available" in error_line(capsys, TINY + ["--device", "cuda"])


def test_bad_nb201_file_and_bad_image_folders(tmp_path, capsys):
    garbage = tmp_path / "nb201.pth"
    garbage.write_bytes(b"not a pickle")
    assert "--nb201" in error_line(
        capsys, TINY + ["--nb201", str(garbage), "--out", str(tmp_path / "a")]
    )
    unknown = tmp_path / "nb201.xyz"
    unknown.write_text("hello")
    assert "--nb201" in error_line(
        capsys, TINY + ["--nb201", str(unknown), "--out", str(tmp_path / "a")]
    )
    (tmp_path / "empty").mkdir()
    assert "not an image-folder tree" in error_line(
        capsys, TINY + ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "a")]
    )
    one_class = tmp_path / "one" / "train" / "cat"
    one_class.mkdir(parents=True)
    write_png(one_class / "0.png", 0)
    assert "need at least 2" in error_line(
        capsys, TINY + ["--data", str(tmp_path / "one"), "--out", str(tmp_path / "a")]
    )
    assert not (tmp_path / "a").exists()


def test_loading_a_file_that_is_not_a_checkpoint_gives_no_unsafe_advice(tmp_path, capsys):
    (tmp_path / "README.md").write_text("# not a checkpoint")
    err = error_line(capsys, ["--load", str(tmp_path / "README.md")])
    assert "not a close.py checkpoint" in err and "weights_only" not in err


def test_bad_runs_and_checkpoints_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (a_file := tmp_path / "a-file").write_text("mine")
    configs = {"corrupt": "{not json", "listed": "[1, 2]"}
    configs["typed"] = json.dumps(dataclasses.asdict(close.Config()) | {"epochs": "many"})
    configs["short"] = json.dumps({"epochs": 3})
    for name, text in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    cases = [
        (["--load", str(tmp_path / "dict.pt")], "dict.pt: not a close.py checkpoint"),
        (["--load", str(tmp_path / "tensor.pt")], "tensor.pt: not a close.py checkpoint"),
        (TINY + ["--out", str(a_file)], f"{a_file} is not a folder that can be written to"),
        (TINY + ["--out", str(a_file / "run")], f"{a_file} is not a folder that can be"),
        (["--resume", "--out", str(tmp_path / "corrupt")], "config.json is not readable JSON"),
        (["--resume", "--out", str(tmp_path / "listed")], "not the options of a close.py run"),
        (["--resume", "--out", str(tmp_path / "typed")], "not the options of a close.py run"),
        (["--resume", "--out", str(tmp_path / "short")], "not the options of a close.py run"),
    ]
    with monkeypatch.context() as patch:
        patch.setattr(close, "load_dataset", lambda cfg: pytest.fail("the data was read"))
        for argv, message in cases:
            assert message in error_line(capsys, argv), argv
    assert a_file.read_text() == "mine"
    # a checkpoint whose weights do not fit its options: found once the model is built
    config = dataclasses.asdict(close.Config(data="synthetic", channels=4, cells=1))
    torch.save({"config": config, "model": {"x": torch.zeros(1)}, "log": []}, tmp_path / "w.pt")
    err = error_line(capsys, ["--load", str(tmp_path / "w.pt"), "--device", "cpu"])
    assert "w.pt: its weights do not fit its options" in err
    assert not (tmp_path / "rescored").exists()


def test_an_out_folder_holding_a_run_is_protected(finished_run, capsys, monkeypatch):
    out = finished_run[0]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(close, "load_dataset", lambda cfg: pytest.fail("the data was read first"))
    assert "already holds a run: --resume it or choose another --out" in error_line(
        capsys, TINY + ["--epochs", "3", "--blocks", "2", "--out", str(out)]
    )
    err = error_line(
        capsys,
        TINY + ["--epochs", "3", "--blocks", "2", "--seed", "1", "--out", str(out), "--resume"],
    )
    assert "--epochs (2 there, 3 now)" in err and "--seed (0 there, 1 now)" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_out_folder_of_other_files_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "scores.csv").write_text("the user's own scores")
    err = error_line(capsys, TINY + ["--epochs", "1", "--blocks", "1", "--out", str(out)])
    assert "already holds other files" in err
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [
        ("scores.csv", "the user's own scores")
    ]
    (out / "scores.csv").unlink()  # an empty folder is fine
    assert close.claim_out(close.Config(out=str(out)), resume=False) == out


def test_default_output_folders_differ_by_data_and_size():
    names = {
        close.default_out(close.Config(**options))
        for options in (
            {},
            {"data": "synthetic"},
            {"data": "/some/cifar10-jpg"},
            {"channels": 8},
            {"cells": 1},
            {"epochs": 10},
            {"baseline": True},
        )
    }
    assert (
        len(names) == 7
        and close.default_out(close.Config(data="synthetic", seed=3)).name
        == "close-synthetic-C16x5-250ep-seed3"
    )


def test_summary_and_compare_say_what_their_numbers_are(finished_run, tmp_path, capsys):
    long_name, printed = finished_run
    assert f"== {long_name.name} (" in printed and "P@top/bottom K:" in printed
    assert "found cifar10" in printed and "rank among the 6,466" in printed
    epochs = [line for line in printed.splitlines() if re.match(r"epoch +\d+/", line)]
    log = list(csv.DictReader(open(long_name / "log.csv")))
    assert len(epochs) == len(log) == 2
    for row, line in zip(log, epochs):  # accuracy in percent
        assert f"acc {float(row['accuracy']):5.1f}%  lr 0.05  level {row['level']}  " in line
    left = close.duration(float(log[0]["seconds"]))  # one epoch of that length to go
    assert f"  {left} left or more  " in epochs[0] and " left" not in epochs[1]
    # the GATE's numbers, each in words
    gate = json.loads((long_name / "metrics.json").read_text())["gate"]
    assert f"likeliest block: one block for {1 - gate['off_dominant']:.0%} of the edges" in printed
    assert f"draws: {gate['entropy']:.0%} as random as a uniform pick" in printed
    assert "scoring (--eval-gate): edges per block [" in printed
    plotting = importlib.util.find_spec("matplotlib") is not None
    assert ("no ranking.png" in printed) != plotting
    if not plotting:
        assert "--plot needs matplotlib: pip install matplotlib" in error_line(
            capsys, ["--plot", str(long_name)]
        )
    assert close.main(["--compare", str(long_name), str(long_name)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [long_name.name] * 2 and table[1].split()[0] == "kendall_tau"
    assert any(line.startswith("mean one-shot") for line in table) and any(
        line.startswith("found cifar10") for line in table
    )
    no_truth = tmp_path / "no-truth"
    code, printed = quietly(TINY + ["--epochs", "1", "--blocks", "1", "--out", str(no_truth)])
    assert code == 0  # without --nb201: no rows of "-" for what was not measured
    assert "found cifar10" not in printed and "kendall_tau" not in printed
    assert "mean one-shot" in printed and "search (evolution, 16 evaluations) found" in printed
    assert "tracked one-shot " in printed.split("epoch    1/1")[1].splitlines()[0]
    assert close.main(["--compare", str(no_truth), str(long_name)]) == 0  # any run first
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:2] == ["kendall_tau", "-"] and table[1].split()[2] != "-"


def finished(folder, seed, baseline, values, curve=(), **options):
    """A finished run written by hand: its options, metrics with Kendall tau, Spearman, P@top5%
    and the found cell's CIFAR-10 accuracy set to `values`, and a curve: (epoch, Kendall tau,
    P@top5%) points."""
    folder.mkdir()
    config = dataclasses.asdict(close.Config(seed=seed, baseline=baseline, **options))
    (folder / "config.json").write_text(json.dumps(config))
    tau, spearman, top5, found = values
    ranking = {name: 0.5 for name in close.SUMMARY_METRICS} | {"n": 200, "kendall_tau": tau}
    metrics = {
        "ranking": ranking | {"spearman": spearman, "P@top5%": top5},
        "search": {
            "strategy": "evolution",
            "budget": 100,
            "best": {"arch": "x", "nb201": {"cifar10": {"accuracy": found, "rank": 7}}},
        },
        "mean_oneshot_accuracy": 50.0,
        "times": {"train_s": 1.0, "score_s": 2.0},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if curve:
        rows = [[epoch, 1, 0.05, 40.0, tau, 0.5, top5, 1.0] for epoch, tau, top5 in curve]
        (folder / "curve.csv").write_text(close.csv_text(close.CURVE_FIELDS, rows))
    return str(folder)


def paired_rows(printed, heading):
    """The rows of the paired table under `heading`: {first cell: the others}."""
    lines = printed.split(heading)[1].splitlines()[1:]
    header, rows = lines[0].split(), {}
    for line in lines[1:]:
        if not line.strip() or line.startswith("("):
            break
        rows[line.split()[0]] = line.split()[1:]
    return header, rows


def test_compare_pairs_vanilla_and_close_runs_by_seed(tmp_path, capsys):
    vanilla = {0: (0.30, 0.45, 0.1, 93.0), 1: (0.25, 0.40, 0.0, 92.0), 2: (0.40, 0.55, 0.2, 93.5)}
    closenet = {0: (0.35, 0.50, 0.3, 93.2), 1: (0.45, 0.60, 0.3, 92.5), 2: (0.38, 0.52, 0.2, 93.0)}
    runs = [finished(tmp_path / f"close-{s}", s, False, v) for s, v in closenet.items()]
    runs += [finished(tmp_path / f"vanilla-{s}", s, True, v) for s, v in vanilla.items()]
    runs.append(finished(tmp_path / "close-3", 3, False, (0.3, 0.4, 0.1, 90.0)))  # no partner
    runs.append(finished(tmp_path / "vanilla-e9", 0, True, (0.1, 0.2, 0.0, 90.0), epochs=9))
    runs.append(finished(tmp_path / "vanilla-t9", 1, True, (0.1, 0.2, 0.0, 90.0), track_archs=9))
    # another device, speed option, eval gate or output folder still pairs; other --epochs not
    runs.append(
        finished(
            tmp_path / "close-gpu",
            4,
            False,
            (0.3, 0.4, 0.1, 90.0),
            device="cuda",
            eval_gate="argmax",
            blocks=3,
        )
    )
    runs.append(
        finished(
            tmp_path / "vanilla-gpu",
            4,
            True,
            (0.2, 0.3, 0.1, 89.0),
            threads=3,
            images_per_pass=512,
            out="elsewhere",
        )
    )
    assert close.main(["--compare", *runs]) == 0
    printed = capsys.readouterr().out
    header, rows = paired_rows(printed, "paired by seed (4 pairs, the same other options):")
    assert header == "seed 0 seed 1 seed 2 seed 4 mean sd p".split()
    closenet[4], vanilla[4] = (0.3, 0.4, 0.1, 90.0), (0.2, 0.3, 0.1, 89.0)
    c, v = (np.array([side[s] for s in (0, 1, 2, 4)]) for side in (closenet, vanilla))
    p = scipy.stats.ttest_rel(c, v).pvalue
    for i, name in enumerate(close.PAIRED_METRICS + ("found",)):
        cells = rows[name][-7:]  # "found CIFAR-10" is two words
        expected = [f"{x:+.3f}" for x in (c - v)[:, i]] + [f"{(c - v)[:, i].mean():+.3f}"]
        assert cells == expected + [f"{(c - v)[:, i].std(ddof=1):.3f}", f"{p[i]:.3f}"], name
    assert "fewer than 3 pairs" not in printed and "no curve: " in printed
    assert (
        "not paired" in printed
        and "close-3, vanilla-e9, vanilla-t9" in printed.split("not paired")[1]
    )
    assert close.main(["--compare", runs[0], runs[3], runs[1], runs[4]]) == 0
    printed = capsys.readouterr().out
    assert "(2 pairs" in printed and "fewer than 3 pairs: the mean, sd and p say nothing" in printed
    assert close.main(["--compare", runs[0], runs[1]]) == 0  # CLOSE runs alone: nothing to pair
    assert "paired" not in capsys.readouterr().out
    # a seed with two runs of one kind and the same options: said, and not paired
    twin = finished(tmp_path / "close-0-again", 0, False, (0.1, 0.1, 0.1, 90.0), out="again")
    assert close.main(["--compare", runs[0], runs[3], twin]) == 0
    printed = capsys.readouterr().out
    assert "seed 0 has 2 CLOSE runs with the same options (close-0, close-0-again)" in printed
    assert "paired by seed" not in printed
    (tmp_path / "close-0" / "config.json").unlink()
    assert "close-0 is not a finished run" in error_line(capsys, ["--compare", *runs])


def test_compare_gives_the_curves_and_their_paired_differences_per_epoch(tmp_path, capsys):
    rng = np.random.default_rng(0)
    taus = rng.uniform(-0.2, 0.8, (3, 2, 4))  # seed, kind (vanilla, CLOSE), epoch 5, 10, 15, 20
    tops = rng.uniform(0, 1, (3, 2, 4)).round(2)
    runs = []
    for seed in range(3):
        for kind, name in enumerate(("vanilla", "close")):
            curve = [(5 * (e + 1), taus[seed, kind, e], tops[seed, kind, e]) for e in range(4)]
            if seed == 2 and kind == 1:
                curve = curve[:3]  # no point at epoch 20: that epoch has two pairs
            runs.append(finished(tmp_path / f"{name}-{seed}", seed, not kind, (0.1,) * 4, curve))
    runs.append(finished(tmp_path / "no-curve", 9, True, (0.1,) * 4))
    assert close.main(["--compare", *runs]) == 0
    printed = capsys.readouterr().out
    header, rows = paired_rows(printed, "\nkendall_tau during training (curve.csv):")
    assert header[1:] == [Path(run).name for run in runs[:6]]
    assert rows["20"][-1] == "-" and rows["5"][0] == f"{taus[0, 0, 0]:.3f}"
    assert "no curve: no-curve" in printed
    for metric, values in (("kendall_tau", taus), ("P@top5%", tops)):
        header, rows = paired_rows(printed, f"CLOSE - vanilla {metric} during training")
        assert header == "epoch seed 0 seed 1 seed 2 mean sd p".split()
        differences = values[:, 1] - values[:, 0]
        differences[2, 3] = np.nan
        for e, epoch in enumerate(("5", "10", "15", "20")):
            d = differences[:, e][~np.isnan(differences[:, e])]
            p = scipy.stats.ttest_rel(values[: len(d), 1, e], values[: len(d), 0, e]).pvalue
            assert rows[epoch] == [f"{x:+.3f}" for x in d] + ["-"] * (3 - len(d)) + [
                f"{d.mean():+.3f}",
                f"{d.std(ddof=1):.3f}",
                f"{p:.3f}",
            ], (metric, epoch)
    assert "fewer than 3 pairs: the mean, sd and p say nothing yet" not in printed


def test_the_pictures_are_drawn_with_matplotlib(finished_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = copied(finished_run[0], tmp_path)
    (out / "ranking.png").unlink(missing_ok=True)
    assert close.main(["--plot", str(out)]) == 0 and (out / "ranking.png").stat().st_size > 1000
    runs = [
        finished(
            tmp_path / f"{kind}-{s}",
            s,
            kind == "vanilla",
            (0.1,) * 4,
            [(1, 0.1 * s, 0.2), (2, 0.2, 0.3 * s)],
        )
        for s in (0, 1)
        for kind in ("vanilla", "close")
    ]
    (tmp_path / "compare.png").write_bytes(b"the user's own picture")
    assert close.main(["--compare", *runs]) == 0
    printed = capsys.readouterr().out
    assert f"curves drawn in {tmp_path / 'compare-2.png'}" in printed
    assert (tmp_path / "compare.png").read_bytes() == b"the user's own picture"
    assert close.main(["--compare", *runs]) == 0  # its own picture, drawn again in place
    assert f"curves drawn in {tmp_path / 'compare-2.png'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["compare-2.png", "compare.png"]


def test_help_shows_every_default_and_says_what_benchmark_times(capsys):
    with pytest.raises(SystemExit):
        close.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in dataclasses.fields(close.Config):  # zeros too: --seed, --eval-seed, --eval-archs
        if option.default != "" and not isinstance(option.default, bool):
            assert (
                f"{' '.join(option.metadata['help'].split())} (default: {option.default})" in text
            )
    assert "time training steps, vanilla and CLOSENet at each level, and scoring" in text


def test_progress_line_once_a_minute(capsys, monkeypatch):
    clock = iter([0.0, 20.0, 40.0, 80.0, 100.0, 120.0]).__next__  # at the start and after each item
    monkeypatch.setattr(close, "time", types.SimpleNamespace(monotonic=clock))
    assert list(close.with_progress(range(5), "scoring")) == list(range(5))
    # after item 3 (80 s: over a minute) 3 done at 0.0375/s, 2 left: 53 s; none after the last
    assert capsys.readouterr().out.splitlines() == ["scoring: 3/5  0.04/s  53 s left"]
    assert [close.duration(s) for s in (0.4, 59.4, 60, 150)] == [
        "0 s",
        "59 s",
        "1.0 min",
        "2.5 min",
    ]


# ---------------------------------------------------------------------------------------------
# 9. Command line, in a subprocess
# ---------------------------------------------------------------------------------------------
# as torch.set_num_threads(1) above, for a child process; without the caller's PYTHONPATH, which
# may hold this folder (a child must find close.py's neighbours as a user's run does)
ONE_THREAD = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


def child(args, cwd):
    """A child python, from a folder of its own: one started in a folder that no longer exists
    dies in `import torch` ("oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"), as when the
    suite's folder is removed while it runs."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=ONE_THREAD, cwd=cwd
    )


def test_close_py_alone_in_a_subprocess_asks_for_nb201_api_slim_and_benchmark(
    tmp_path, monkeypatch
):
    """A bad input's one line and exit code from a child process, close.py copied alone (no
    nb201_api_slim.py beside it) and the suite's own folder removed meanwhile."""
    shutil.copy(ROOT / "close.py", tmp_path / "close.py")
    gone = tmp_path / "gone"
    gone.mkdir()
    with monkeypatch.context() as here:  # the suite's own folder removed: the child still runs
        here.chdir(gone)
        gone.rmdir()
        result = child("close.py --data synthetic --nb201 x.csv --out run".split(), tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("close.py: error:")
    assert "nb201_api_slim.py" in result.stderr and "Traceback" not in result.stderr
    args = "--device cpu --cells 1 --channels 4 --blocks 2 --batch-size 4 --benchmark-steps 1"
    args += " --images-per-pass 160"  # the 40 scoring batches in one pass
    assert close.main(["--benchmark", *args.split(), "--out", str(tmp_path)]) == 0
    bench = json.loads((tmp_path / "benchmark.json").read_text())
    keys = {"vanilla_ms_per_step", "close_level1_ms_per_step", "close_level2_ratio"}
    keys |= {"vanilla_score_s_per_arch", "close_level2_score_s_per_arch", "close_level2_iqr_ms"}
    assert keys <= set(bench) and bench["score_images"] == 40 * 4
    assert bench["precision"] == "float32"


def test_threads_a_user_sets_are_honoured_also_under_torchrun(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for world, threads in ((2, 0), (2, 3), (1, 0), (1, 2)):
        monkeypatch.setattr(close, "WORLD", world)
        close.use_machine(close.Config(device="cpu", threads=threads))
    assert calls == [8, 3, 2]  # torchrun: the cores shared, or --threads; alone: torch's default


# A stand-in for torchvision's CIFAR-10 that downloads nothing: 400 synthetic images (320 train,
# 80 held out), a second of "download" into root when its archive is not there yet, and a line
# per download in root/downloads.txt naming the rank that made it.
FAKE_CIFAR10 = """
import os, time
from pathlib import Path
import torch
import close

class FakeCIFAR10:
    def __init__(self, root, train, download):
        archive = Path(root) / "cifar-10-python.tar.gz"
        if not archive.exists():
            Path(root).mkdir(parents=True, exist_ok=True)
            with open(Path(root) / "downloads.txt", "a") as downloads:
                downloads.write(f"rank {os.environ.get('RANK', 0)}\\n")
            time.sleep(1)
            archive.write_bytes(b"the archive")
        data = close.synthetic_dataset(train=320, heldout=80)
        images = torch.cat([data.train_images, data.heldout_images])
        self.data = images.permute(0, 2, 3, 1).numpy()  # NHWC, as torchvision's
        self.targets = torch.cat([data.train_labels, data.heldout_labels]).tolist()
"""
exec(FAKE_CIFAR10)
CIFAR10_ARGS = ["--data", "cifar10", "--data-root", "data/cifar"]

# Under torchrun: 2 ranks on the CPU (gloo), on the fake CIFAR-10. A stop is Ctrl-C on torchrun
# itself, which forwards it to every rank; this wrapper sends it from rank 0 after the N-th call
# of a close.py function.
WRAPPER = "import sys\nsys.path.insert(0, sys.argv.pop(1))\n" + FAKE_CIFAR10 + """
import signal, torchvision
torchvision.datasets.CIFAR10 = FakeCIFAR10
if os.environ["STOP_IN"]:
    real, calls = getattr(close, os.environ["STOP_IN"]), []
    def stop_after(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if close.RANK == 0 and len(calls) == int(os.environ["STOP_AT"]):
            os.kill(os.getppid(), signal.SIGINT)
        return result
    setattr(close, os.environ["STOP_IN"], stop_after)
sys.exit(close.main())
"""


def torchrun(tmp_path, argv, stop_in="", stop_at=0):
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(tmp_path / "wrapper.py"),
            str(ROOT),
            *argv,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**ONE_THREAD, "STOP_IN": stop_in, "STOP_AT": str(stop_at)},
    )


def test_torchrun_downloads_once_scores_exactly_as_one_process_and_resumes_after_stops(
    tmp_path, monkeypatch
):
    nb201 = fake_nb201_csv(tmp_path / "fake.csv")
    # the same threads per process (else CPU float rounding differs), whatever the core count;
    # 4 epochs of 2 steps, the learning rate restarted in epoch 2
    argv = TINY[2:] + CIFAR10_ARGS + ["--epochs", "4", "--blocks", "2", "--nb201", str(nb201)]
    argv += ["--threads", "1"]
    with monkeypatch.context() as patch:
        patch.chdir(tmp_path)
        patch.setattr(close.torchvision.datasets, "CIFAR10", FakeCIFAR10)
        assert quietly(argv + ["--out", "one"])[0] == 0
    shutil.rmtree(tmp_path / "data")
    # stopped in training epoch 3 of 4 (rank 0 trains, rank 1 waits): the checkpoint has epoch 2
    stopped = torchrun(tmp_path, argv + ["--out", "two"], "train_step", 5)
    assert stopped.returncode != 0 and "--resume continues" in stopped.stderr, stopped.stderr[
        -3000:
    ]
    # rank 0 downloaded before the ranks met; rank 1 found the data there
    downloads = tmp_path / "data" / "cifar" / "downloads.txt"
    assert downloads.read_text() == "rank 0\n"
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    # resumed, then stopped while scoring (after the curve's 6 archs at epochs 3 and 4, 3 archs
    # in): both ranks stop after the same round, rank 0 keeps it
    stopped = torchrun(tmp_path, ["--resume", "--out", "two"], "score_arch", 2 * 6 + 3)
    assert stopped.returncode != 0 and "stopped while scoring" in stopped.stderr, stopped.stderr[
        -3000:
    ]
    assert 2 <= len((tmp_path / "two" / "scores.csv").read_text().splitlines()) - 1 < 12
    finished = torchrun(tmp_path, ["--resume", "--out", "two"])
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-6000:]
    assert finished.stdout.count("== two (") == 1  # rank 0 alone prints
    for name in ("scores.csv", "search.json", "curve_scores.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    # log.csv and the curve, timings aside; the weights, after the resumed momentum
    assert run_rows(tmp_path / "one")[:3] == run_rows(tmp_path / "two")[:3]
    weights = [
        torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"]
        for run in ("one", "two")
    ]
    assert all(torch.equal(t, weights[1][k]) for k, t in weights[0].items() if k != "_extra_state")
    one, two = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert (
        one["ranking"] == two["ranking"]
        and one["scoring_edges_per_block"] == two["scoring_edges_per_block"]
    )
    assert one["threads"] == two["threads"] == 1  # --threads honoured under torchrun too
    assert downloads.read_text() == "rank 0\n"  # and no download since
    # nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data",
        "fake.csv",
        "one",
        "two",
        "wrapper.py",
    ]


def test_torchrun_onto_a_folder_holding_a_run_is_one_line_and_code_2_on_every_rank(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    result = torchrun(tmp_path, TINY + ["--epochs", "1", "--blocks", "1", "--out", "taken"])
    printed = result.stdout + result.stderr
    ours = [line for line in printed.splitlines() if line.startswith("close.py")]
    assert ours == [
        "close.py: error: --out taken already holds a run: --resume it or choose " "another --out"
    ], printed[-3000:]
    # each rank exits with code 2, unless torchrun ended it first (SIGTERM) on the other's exit
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", printed)
    assert "2" in codes and set(codes) <= {"2", "-15"}, printed[-3000:]
    assert "gloo" not in printed.lower()
    assert (tmp_path / "taken" / "config.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------------
# nb201_api_slim: tiny fixtures in each official layout, CSV round trips, errors, the real table
# ---------------------------------------------------------------------------------------------
NB201_MODULE = Path(nb.__file__).resolve()

# Five cells written out by hand (not generated by the module under test).
NB201_ARCHS = [
    BEST_CIFAR10,
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    "|skip_connect~0|+|nor_conv_1x1~0|nor_conv_3x3~1|+|avg_pool_3x3~0|none~1|skip_connect~2|",
    "|avg_pool_3x3~0|+|avg_pool_3x3~0|avg_pool_3x3~1|"
    "+|avg_pool_3x3~0|avg_pool_3x3~1|avg_pool_3x3~2|",
    "|nor_conv_1x1~0|+|skip_connect~0|none~1|+|nor_conv_3x3~0|nor_conv_1x1~1|avg_pool_3x3~2|",
]
NB201_OPS = [
    (3, 3, 3, 1, 3, 2),
    (0, 0, 0, 0, 0, 0),
    (1, 2, 3, 4, 0, 1),
    (4, 4, 4, 4, 4, 4),
    (2, 1, 0, 3, 2, 4),
]
NB201_ALL = ("cifar10", "cifar100", "ImageNet16-120", "cifar10-valid")
NB201_FULL_COLUMNS = NB201_ALL + tuple(f"{d}@12" for d in NB201_ALL)
# Splits each official trial records; the one get_more_info calls 'test' is listed in TEST.
NB201_SPLITS = {
    "cifar10": ["ori-test"],
    "cifar10-valid": ["x-valid", "ori-test"],
    "cifar100": ["ori-test", "x-valid", "x-test"],
    "ImageNet16-120": ["ori-test", "x-valid", "x-test"],
}
NB201_TEST = {
    "cifar10": "ori-test",
    "cifar10-valid": "ori-test",
    "cifar100": "x-test",
    "ImageNet16-120": "x-test",
}


def nb201_expected(index, dataset, epochs):
    """Made-up mean test accuracy; arch 0 is best except on ImageNet16-120 (arch 4)."""
    base = [70.1234, 50.5, 55.25, 45.0, 62.0][index]
    base += {"cifar10": 5, "cifar100": -30, "ImageNet16-120": -40, "cifar10-valid": 3}[dataset]
    if dataset == "ImageNet16-120" and index == 4:
        base += 10
    return base + (8 if epochs == 200 else 0)


def nb201_seeds(index, dataset, epochs):
    """Seed -> offset from the mean; the number of seeds varies like in the real benchmark."""
    if epochs == 12:
        return {111: -0.2, 777: 0.2} if dataset == "cifar10-valid" else {111: 0.0}
    if index == 1 and dataset == "cifar10":
        return {777: 0.0}
    if index == 4:
        return {888: -0.3, 999: 0.3}
    return {777: -0.5, 888: 0.25, 999: 0.25}


def nb201_trial(arch, dataset, seed, epochs, test_acc):
    """A ResultsCount state dict: per-epoch metrics keyed '<split>@<epoch>'. Other epochs and
    other splits hold different numbers, so reading the wrong key gives a wrong answer."""
    accs = {}
    for split_no, split in enumerate(NB201_SPLITS[dataset]):
        for epoch in range(epochs):
            accs[f"{split}@{epoch}"] = test_acc - 30 + epoch * 0.01
        if split != NB201_TEST[dataset]:
            accs[f"{split}@{epochs - 1}"] = test_acc - 2 - split_no
    accs[f"{NB201_TEST[dataset]}@{epochs - 1}"] = test_acc
    return {
        "name": dataset,
        "net_state_dict": None,
        "seed": seed,
        "epochs": epochs,
        "train_acc1es": {e: 99.0 for e in range(epochs)},
        "train_acc5es": None,
        "train_losses": {e: 0.1 for e in range(epochs)},
        "train_times": {e: 9.0 for e in range(epochs)},
        "arch_config": {"channel": 16, "num_cells": 5, "arch_str": arch, "class_num": 10},
        "params": 0.5,
        "flop": 50.0,
        "latency": [0.02],
        "eval_names": list(NB201_SPLITS[dataset]),
        "eval_acc1es": accs,
        "eval_losses": {k: 1.0 for k in accs},
        "eval_times": {k: 0.5 for k in accs},
    }


def nb201_arch_results(index, epochs, datasets):
    """An ArchResults state dict for one architecture and one training schedule."""
    arch = NB201_ARCHS[index]
    all_results, dataset_seed = {}, {}
    for dataset in datasets:
        seeds = nb201_seeds(index, dataset, epochs)
        dataset_seed[dataset] = sorted(seeds)
        for seed, offset in seeds.items():
            test_acc = nb201_expected(index, dataset, epochs) + offset
            all_results[(dataset, seed)] = nb201_trial(arch, dataset, seed, epochs, test_acc)
    return {
        "arch_index": index,
        "arch_str": arch,
        "all_results": all_results,
        "dataset_seed": dataset_seed,
        "clear_net_done": True,
    }


def nb201_per_hp(index, less_key, full_key, less_datasets=NB201_ALL):
    return {
        less_key: nb201_arch_results(index, 12, less_datasets),
        full_key: nb201_arch_results(index, 200, NB201_ALL),
    }


def nb201_benchmark(less_key, full_key, less_datasets=NB201_ALL):
    return {
        "meta_archs": list(NB201_ARCHS),
        "arch2infos": {i: nb201_per_hp(i, less_key, full_key, less_datasets) for i in range(5)},
        "evaluated_indexes": list(range(5)),
    }


def nb201_write_pbz2(obj, path):
    with bz2.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


@pytest.fixture(scope="module")
def nb201_sources(tmp_path_factory):
    """One tiny benchmark in each official layout."""
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("nb201_sources")
    sources = {
        "pth": root / "NAS-Bench-201-v1_1-096897.pth",
        "pth_v1_0": root / "NAS-Bench-201-v1_0-e61699.pth",
        "pbz2": root / "NATS-tss-v1_0-3ffb9.pickle.pbz2",
        "nats_dir": root / "NATS-tss-v1_0-3ffb9-simple",
    }
    torch.save(nb201_benchmark("less", "full"), sources["pth"])
    # v1_0 trained the 12-epoch schedule on cifar10-valid only.
    torch.save(
        nb201_benchmark("less", "full", less_datasets=("cifar10-valid",)), sources["pth_v1_0"]
    )
    nb201_write_pbz2(nb201_benchmark("12", "200"), sources["pbz2"])
    sources["nats_dir"].mkdir()
    nb201_write_pbz2({"meta_archs": list(NB201_ARCHS)}, sources["nats_dir"] / "meta.pickle.pbz2")
    for i in range(5):
        name = f"{i:06d}.pickle.pbz2" if i != 4 else "4.pickle.pbz2"  # both names occur officially
        nb201_write_pbz2(nb201_per_hp(i, "12", "200"), sources["nats_dir"] / name)
    return sources


@pytest.fixture(scope="module")
def nb201_tables(nb201_sources):
    """Tables loaded once, for tests that only query them."""
    return {layout: nb.load(path) for layout, path in nb201_sources.items()}


def nb201_assert_expected_table(table, columns=NB201_FULL_COLUMNS):
    assert len(table) == 5
    assert table.archs == NB201_ARCHS
    assert list(table) == list(enumerate(NB201_ARCHS))
    assert table.datasets == columns
    for i in range(5):
        for column in columns:
            dataset, _, epochs = column.partition("@")
            epochs = int(epochs or 200)
            assert table.accuracy(i, dataset, epochs) == pytest.approx(
                nb201_expected(i, dataset, epochs), abs=5e-5
            )


# ---- arch strings ---------------------------------------------------------------------------


def test_nb201_arch_string_and_ops_convert_both_ways():
    for arch, ops in zip(NB201_ARCHS, NB201_OPS):
        assert nb.ops_to_arch_string(ops) == arch
        assert nb.arch_string_to_ops(arch) == ops
    every_ops = [tuple(int(c) for c in np.base_repr(n, 5).zfill(6)) for n in range(5**6)]
    strings = {nb.ops_to_arch_string(ops) for ops in every_ops}
    assert len(strings) == 5**6
    assert all(nb.arch_string_to_ops(nb.ops_to_arch_string(ops)) == ops for ops in every_ops[::97])


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "|nor_conv_3x3~0|",
        NB201_ARCHS[0] + "|",
        NB201_ARCHS[0].replace("~1|", "~0|", 1),
        NB201_ARCHS[1].replace("none~0|+", "conv~0|+", 1),
        NB201_ARCHS[0].replace("+", "+ ", 1),
        "|none~0|+|none~0|none~1|+|none~0|none~1|",
        None,
    ],
)
def test_nb201_malformed_arch_string_is_rejected(bad):
    with pytest.raises(ValueError, match="not a NAS-Bench-201 cell string") as err:
        nb.arch_string_to_ops(bad)
    assert repr(bad) in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [
        (3, 3, 3, 1, 3),
        (3, 3, 3, 1, 3, 5),
        (3, 3, 3, 1, 3, -1),
        (3, 3, 3, 1, 3, True),
        ("3", 3, 3, 1, 3, 2),
        (3, 3, 3, 1, 3, 2.0),
    ],
)
def test_nb201_malformed_ops_are_rejected(bad):
    with pytest.raises(ValueError, match="6 op indices"):
        nb.ops_to_arch_string(bad)


# ---- official layouts -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["pth", "pbz2", "nats_dir"])
def test_nb201_each_official_layout_gives_mean_test_accuracy(nb201_sources, layout):
    table = nb.load(nb201_sources[layout])
    nb201_assert_expected_table(table)
    assert table.index_of((3, 3, 3, 1, 3, 2)) == 0 and table.arch_string(2) == NB201_ARCHS[2]


def test_nb201_all_layouts_agree_exactly(nb201_sources):
    tables = [nb.load(nb201_sources[k]) for k in ("pth", "pbz2", "nats_dir")]
    for column in NB201_FULL_COLUMNS:
        first = tables[0].accuracies(column)
        for other in tables[1:]:
            np.testing.assert_array_equal(other.accuracies(column), first)


def test_nb201_v1_0_has_12_epoch_results_for_cifar10_valid_only(nb201_sources):
    table = nb.load(nb201_sources["pth_v1_0"])
    nb201_assert_expected_table(table, NB201_ALL + ("cifar10-valid@12",))
    with pytest.raises(ValueError, match="cifar10-valid@12") as err:
        table.accuracy(0, "cifar10", epochs=12)
    assert "cifar10@12" in str(err.value)


def test_nb201_lookup_by_index_string_tuple_list_array_agree(nb201_tables):
    table = nb201_tables["pbz2"]
    forms = [
        2,
        np.int64(2),
        NB201_ARCHS[2],
        NB201_OPS[2],
        list(NB201_OPS[2]),
        np.array(NB201_OPS[2]),
    ]
    assert {table.index_of(form) for form in forms} == {2}
    assert [table.accuracy(form, "cifar100") for form in forms] == [
        pytest.approx(nb201_expected(2, "cifar100", 200))
    ] * 6
    assert table.accuracy(NB201_ARCHS[1]) == pytest.approx(nb201_expected(1, "cifar10", 200))
    # A dataset name from .datasets also works on its own.
    assert table.accuracy(3, "ImageNet16-120@12") == table.accuracy(3, "ImageNet16-120", epochs=12)


@pytest.mark.parametrize(
    "arch, message",
    [
        # valid, absent
        ("|none~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|", "not in this table"),
        ((0, 0, 0, 0, 0, 1), "not in this table"),
        ("|none~0|+|none~0|", "not a NAS-Bench-201 cell string"),
        ((0, 0, 0), "6 op indices"),
        (5, "outside 0..4"),
        (-1, "outside 0..4"),
        (True, "not an index"),
        (1.0, "not an index"),
    ],
)
def test_nb201_unknown_or_malformed_arch_names_it(nb201_tables, arch, message):
    table = nb201_tables["pbz2"]
    for call in (lambda: table.index_of(arch), lambda: table.accuracy(arch)):
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert str(arch) in str(err.value) or repr(arch) in str(err.value)


@pytest.mark.parametrize(
    "dataset, epochs", [("imagenet", 200), ("cifar10", 100), ("cifar10", "200"), ("cifar10@12", 12)]
)
def test_nb201_unknown_dataset_or_epochs_lists_what_is_available(nb201_tables, dataset, epochs):
    table = nb201_tables["pth_v1_0"]
    with pytest.raises(ValueError) as err:
        table.accuracy(0, dataset, epochs)
    assert "available: cifar10, cifar100, ImageNet16-120, cifar10-valid, cifar10-valid@12" in str(
        err.value
    )
    with pytest.raises(ValueError):
        table.group_accuracies(len, dataset, epochs)


def test_nb201_group_accuracies_averages_per_key(nb201_tables):
    table = nb201_tables["nats_dir"]
    groups = table.group_accuracies(lambda arch: arch.count("none"), "cifar100", epochs=12)
    # 'none' counts of the five archs: 0, 6, 1, 0, 1
    e = [nb201_expected(i, "cifar100", 12) for i in range(5)]
    assert groups == {
        0: pytest.approx((e[0] + e[3]) / 2),
        6: pytest.approx(e[1]),
        1: pytest.approx((e[2] + e[4]) / 2),
    }
    by_arch = table.group_accuracies(lambda arch: arch)
    assert by_arch == {
        a: pytest.approx(nb201_expected(i, "cifar10", 200)) for i, a in enumerate(NB201_ARCHS)
    }


def test_nb201_missing_archive_file_gives_clear_error_and_empty_csv_field(nb201_sources, tmp_path):
    partial = tmp_path / "NATS-tss-v1_0-3ffb9-simple"
    partial.mkdir()
    for f in nb201_sources["nats_dir"].iterdir():
        if f.name != "000002.pickle.pbz2":
            (partial / f.name).write_bytes(f.read_bytes())
    for table in (nb.load(partial), None):
        if table is None:  # the same checks after a CSV round trip
            table = nb.load(tmp_path / "partial.csv")
        else:
            table.save_csv(tmp_path / "partial.csv")
        with pytest.raises(ValueError, match="no cifar10 result for architecture 2"):
            table.accuracy(2)
        assert np.isnan(table.accuracies()[2]) and table.accuracy(3) == pytest.approx(
            nb201_expected(3, "cifar10", 200)
        )
        assert NB201_ARCHS[2] not in table.group_accuracies(lambda a: a)
    row_2 = (tmp_path / "partial.csv").read_text().splitlines()[3]
    assert row_2 == "2," + NB201_ARCHS[2] + ",,,,,,,,"


# ---- CSV and CLI ----------------------------------------------------------------------------


def test_nb201_csv_round_trip_and_plain_csv_readability(nb201_sources, tmp_path):
    table = nb.load(nb201_sources["pth"])
    out = tmp_path / "nb201.csv"
    table.save_csv(out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "arch", *NB201_FULL_COLUMNS]
    assert rows[0]["arch"] == NB201_ARCHS[0] and rows[0]["cifar10"] == "83.1234"
    assert rows[4]["ImageNet16-120@12"] == f"{nb201_expected(4, 'ImageNet16-120', 12):.4f}"
    nb201_assert_expected_table(nb.load(out))
    again = tmp_path / "again.csv"
    nb.load(out).save_csv(again)
    assert again.read_bytes() == out.read_bytes()


def test_nb201_csv_is_never_unpickled(nb201_sources, tmp_path, monkeypatch):
    out = tmp_path / "nb201.csv"
    nb.load(nb201_sources["pbz2"]).save_csv(out)

    def forbidden(*args, **kwargs):
        raise AssertionError("a CSV path reached an unpickler")

    monkeypatch.setattr(nb.pickle, "load", forbidden)
    monkeypatch.setattr(nb, "_torch_load", forbidden)
    nb201_assert_expected_table(nb.load(out))
    renamed = tmp_path / "nb201.pth"  # a CSV under a pickle name is refused before unpickling
    renamed.write_bytes(out.read_bytes())
    with pytest.raises(ValueError, match="looks like the compact CSV") as err:
        nb.load(renamed)
    assert str(renamed) in str(err.value)


def test_nb201_cli_convert_round_trips_and_info_prints_best(nb201_sources, tmp_path, capsys):
    out = tmp_path / "converted.csv"
    assert nb.main(["convert", str(nb201_sources["nats_dir"]), str(out)]) == 0
    nb201_assert_expected_table(nb.load(out))
    capsys.readouterr()
    assert nb.main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "5 architectures" in lines[0]
    best = {line.split()[0]: line for line in lines[1:]}
    assert set(best) == set(NB201_FULL_COLUMNS)
    assert f"index 0 {NB201_ARCHS[0]}" in best["cifar10"] and "83.1234%" in best["cifar10"]
    assert f"index 4 {NB201_ARCHS[4]}" in best["ImageNet16-120"]


def test_nb201_cli_convert_bad_source_fails_naming_it(tmp_path, capsys):
    bad, out = tmp_path / "broken.pth", tmp_path / "out.csv"
    bad.write_bytes(b"\x00not a torch file")
    assert nb.main(["convert", str(bad), str(out)]) == 1
    assert str(bad) in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        nb.main(["convert", str(bad), str(tmp_path / "out.txt")])


def test_nb201_cli_help_warns_that_official_files_are_pickles():
    for argv in (["--help"], ["convert", "--help"]):
        result = subprocess.run(
            [sys.executable, str(NB201_MODULE), *argv], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        assert (
            "pickles" in text and "Only load files you trust" in text and "never unpickled" in text
        )


# ---- broken inputs ---------------------------------------------------------------------------


def nb201_bad_inputs(root, torch):
    """name -> (path, text the error must contain besides the path)."""
    good_csv = "index,arch,cifar10\n0," + NB201_ARCHS[0] + ",94.1\n"
    no_eval = nb201_benchmark("less", "full")
    del no_eval["arch2infos"][3]["full"]["all_results"][("cifar100", 777)]["eval_acc1es"]
    files = {
        "missing": (root / "absent.csv", None, "no such file"),
        "garbage_pth": (root / "g.pth", b"PK\x03\x04garbage" * 10, "NAS-Bench-201 .pth"),
        "not_bz2": (root / "g.pickle.pbz2", b"plain bytes", "bz2"),
        "wrong_suffix": (root / "table.txt", good_csv.encode(), "unknown format"),
        "csv_header": (
            root / "h.csv",
            good_csv.replace("index,arch", "idx,arch").encode(),
            "header",
        ),
        "csv_no_columns": (
            root / "n.csv",
            b"index,arch\n0," + NB201_ARCHS[0].encode() + b"\n",
            "header",
        ),
        "csv_index": (
            root / "i.csv",
            good_csv.replace("\n0,", "\n1,").encode(),
            "expected index 0",
        ),
        "csv_value": (
            root / "v.csv",
            good_csv.replace("94.1", "high").encode(),
            ":2: could not convert",
        ),
        "csv_arch": (root / "a.csv", good_csv.replace("~2|", "~3|").encode(), ":2:"),
        "csv_fields": (
            root / "f.csv",
            good_csv.replace(",94.1", ",94.1,1").encode(),
            "expected index 0",
        ),
        "csv_empty": (root / "e.csv", b"", "header"),
        "csv_duplicate": (
            root / "d.csv",
            (good_csv + "1," + NB201_ARCHS[0] + ",1\n").encode(),
            "not unique",
        ),
        "empty_dir": (root / "empty_dir", "dir", "meta.pickle.pbz2"),
        "no_archives": (root / "NATS-tss-v1_0-3ffb9-simple", "meta", "no per-architecture results"),
    }
    made = {}
    for name, (path, content, expected) in files.items():
        if content == "dir":
            path.mkdir()
        elif content == "meta":
            path.mkdir()
            nb201_write_pbz2({"meta_archs": list(NB201_ARCHS)}, path / "meta.pickle.pbz2")
        elif content is not None:
            path.write_bytes(content)
        made[name] = (path, expected)
    objects = {
        "list_pbz2": ([1, 2], "meta_archs"),
        "size_space": (
            dict(nb201_benchmark("12", "200"), meta_archs=["64:64:64:64:64"] * 5),
            "not a NAS-Bench-201 cell string",
        ),
        "no_eval_key": (no_eval, "unexpected layout"),
    }
    for name, (obj, expected) in objects.items():
        nb201_write_pbz2(obj, root / f"{name}.pickle.pbz2")
        made[name] = (root / f"{name}.pickle.pbz2", expected)
    torch.save({"meta_archs": NB201_ARCHS}, root / "no_infos.pth")
    made["pth_missing_keys"] = (root / "no_infos.pth", "arch2infos")
    return made


def test_nb201_broken_inputs_fail_with_message_naming_the_path(tmp_path):
    torch = pytest.importorskip("torch")
    for name, (path, expected) in nb201_bad_inputs(tmp_path, torch).items():
        with pytest.raises(ValueError) as err:
            nb.load(path)
        message = str(err.value)
        assert isinstance(err.value, nb.NB201FormatError), name
        assert str(path) in message, (name, message)
        assert expected in message, (name, message)


# ---- the real table (../shared/data, absent on users' machines) -------------------------------


@pytest.fixture(scope="module")
def nb201_real():
    return nb.load(shared_file("nb201_test_accuracy.csv"))


def test_nb201_real_csv_known_facts(nb201_real):
    assert len(nb201_real) == 15625
    assert nb201_real.datasets == ("cifar10", "cifar100", "ImageNet16-120")
    best = int(np.argmax(nb201_real.accuracies("cifar10")))
    assert best == 6111
    assert nb201_real.arch_string(6111) == NB201_ARCHS[0]
    assert nb201_real.accuracy(6111) == pytest.approx(94.37, abs=0.005)
    assert nb201_real.index_of((3, 3, 3, 1, 3, 2)) == 6111
    # Best test accuracies reported in the NAS-Bench-201 paper.
    assert np.max(nb201_real.accuracies("cifar100")) == pytest.approx(73.51, abs=0.005)
    assert np.max(nb201_real.accuracies("ImageNet16-120")) == pytest.approx(47.31, abs=0.005)
    assert not np.isnan(np.stack([nb201_real.accuracies(d) for d in nb201_real.datasets])).any()


def test_nb201_real_csv_index_string_tuple_round_trip(nb201_real):
    seen = set()
    for index, arch in nb201_real:
        ops = nb.arch_string_to_ops(arch)
        assert nb201_real.index_of(arch) == index == nb201_real.index_of(ops)
        assert nb201_real.arch_string(index) == arch
        seen.add(ops)
    assert len(seen) == 5**6  # every cell exactly once


def test_nb201_real_csv_is_rewritten_byte_for_byte(nb201_real, tmp_path):
    out = tmp_path / "copy.csv"
    nb201_real.save_csv(out)
    assert out.read_bytes() == shared_file("nb201_test_accuracy.csv").read_bytes()
