"""Tests of close.py and nb201_api_slim.py: invariants of the method, oracles, known values.

Run with `python -m pytest -q test_close.py`. The core runs on synthetic data; tests that read
../shared/data (real CIFAR-10 images, the NB201 accuracy table) skip when it is absent.
"""
import bz2
import csv
import dataclasses
import itertools
import importlib.util
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

import close
import nb201_api_slim as nb

# Tiny models: a second thread saves nothing and, on a busy machine, waits for a core.
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BEST_CIFAR10 = ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|"
                "+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|")
BEST = (3, 3, 3, 1, 3, 2)  # index 6111, NB201's best on CIFAR-10
# The smallest runs that still exercise everything: 2 training steps per epoch, 12 archs scored on
# 64 images, 6 archs tracked on 64.
TINY = ("--data synthetic --device cpu --cells 1 --channels 4 --batch-size 64 --train-subset 128 "
        "--eval-archs 12 --eval-batches 1 --search-budget 16 --population 6 --tournament 3 "
        "--track-archs 6 --track-batches 1").split()


def shared_file(name):
    """A file of ../shared/data: there in CI, absent on users' machines."""
    if not (path := SHARED_DATA / name).exists():
        pytest.skip(f"{path} is absent")
    return path


def error_line(capsys, argv, code=2):
    """The one line that close.main(argv) prints on stderr, exiting with `code`."""
    returned, err = close.main(argv), capsys.readouterr().err
    assert returned == code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def quietly(argv, capsys):
    """close.main(argv) and what it printed."""
    return close.main(argv), capsys.readouterr().out


def on_call(monkeypatch, name, n, act):
    """close.<name> as it is, but its n-th call is act(real, *args): Ctrl-C, out of memory..."""
    real, calls = getattr(close, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return act(real, *args, **kwargs) if len(calls) == n else real(*args, **kwargs)

    monkeypatch.setattr(close, name, wrapper)
    return calls


def ctrl_c(real, *args, **kwargs):
    result = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)
    return result


def out_of_memory(real, *args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


# 1. Search space
def test_search_space_sizes_and_strings():
    assert len(close.ALL_ARCHS) == 15625 == len(set(close.ALL_ARCHS))
    unique = close.unique_archs()
    assert len(unique) == 6466 == len(set(unique))
    assert all(close.canonical(arch) == arch for arch in unique)  # representatives: fixed points
    assert close.arch_to_str(BEST) == BEST_CIFAR10 == nb.ops_to_arch_string(BEST)
    assert all(close.str_to_arch(close.arch_to_str(arch)) == arch for arch in close.ALL_ARCHS)


BAD_STRINGS = ["", "|nor_conv_3x3~0|", BEST_CIFAR10[:-1], BEST_CIFAR10.replace("~1|", "~0|", 1),
               BEST_CIFAR10.replace("conv_3x3", "conv_5x5", 1), BEST_CIFAR10 + "+|none~0|",
               BEST_CIFAR10.replace("|+|", "|+", 1), "|none~0|+|none~0|none~1|+|none~0|none~1|",
               None]


BAD_OPS = [(3, 3, 3, 1, 3), (3, 3, 3, 1, 3, 5), (3, 3, 3, 1, 3, -1), (3, 3, 3, 1, 3, True),
           ("3", 3, 3, 1, 3, 2), (3, 3, 3, 1, 3, 2.0)]


@pytest.mark.parametrize("parse, message, bad", [
    *[(close.str_to_arch, "not an NB201 architecture string", bad) for bad in BAD_STRINGS],
    *[(nb.arch_string_to_ops, "not a NAS-Bench-201 cell string", bad) for bad in BAD_STRINGS],
    *[(close.arch_to_str, "not an NB201 architecture", bad) for bad in BAD_OPS],
    *[(nb.ops_to_arch_string, "6 op indices", bad) for bad in BAD_OPS]])
def test_bad_archs_are_rejected_naming_what_was_given(parse, message, bad):
    with pytest.raises(ValueError, match=message) as error:
        parse(bad)
    assert repr(bad) in str(error.value) or message == "6 op indices"


def test_live_edges():
    conv, skip = close.CONV3X3, close.SKIP
    assert close.live_edges((0,) * 6) == (False,) * 6
    assert close.live_edges((conv,) * 6) == (True,) * 6
    assert close.live_edges((conv, 0, 0, conv, 0, 0)) == (False, False, False, True, False, False)
    # node 2 unreachable: its edge 2->3 is dead although it is not 'none'
    assert close.live_edges((skip, 0, 0, 0, conv, skip)) == (True, False, False, False, True, False)


# 2. Data
def write_png(path, value):
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_split_is_shuffled_not_positional(tmp_path):
    for label, name in enumerate("abcde"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(10):
            write_png(tmp_path / "train" / name / f"{i}.png", 40 * label)
    data = close.load_dataset(close.Config(data=str(tmp_path)))
    assert data.num_classes == 5 and len(data.train_labels) == 40 and len(data.heldout_labels) == 10
    assert len(set(data.heldout_labels.tolist())) >= 3  # by position: the last class alone
    assert all((data.train_images[i] == 40 * data.train_labels[i]).all() for i in range(40))


def test_torchvision_cifar10_is_split_by_position(monkeypatch):
    class FakeCIFAR10:  # torchvision's: uint8 NHWC numpy images, a list of labels, random order
        def __init__(self, root, train, download):
            assert train and download
            self.data = np.arange(50000 * 3, dtype=np.uint8).reshape(50000, 1, 1, 3).repeat(32, 1)
            self.data = self.data.repeat(32, 2)
            self.targets = [i % 10 for i in range(50000)]

    monkeypatch.setattr(close.torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = close.load_dataset(close.Config())
    assert len(data.train_images) == 40000 == 4 * len(data.heldout_images)
    assert data.train_labels[:3].tolist() == [0, 1, 2] and data.heldout_labels[0] == 40000 % 10
    assert data.heldout_images[0, :, 0, 0].tolist() == [(40000 * 3 + c) % 256 for c in range(3)]


def test_offline_cifar10_download_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import urllib.error

    def offline(root, train, download):  # as torchvision does: the folder, a partial archive
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(close.torchvision.datasets, "CIFAR10", offline)
    root, argv = tmp_path / "data" / "cifar", TINY[2:] + ["--data", "cifar10", "--out", "x"]
    err = error_line(capsys, argv + ["--data-root", str(root)])
    assert "could not be downloaded" in err and "--data synthetic" in err and "--data-root" in err
    assert sorted(tmp_path.iterdir()) == []
    root.mkdir(parents=True)
    (root / "mine.txt").write_text("the user's")  # an existing folder: only what was added goes
    error_line(capsys, argv + ["--data-root", str(root)])
    assert [p.name for p in root.iterdir()] == ["mine.txt"]


def test_augment_is_a_per_image_crop_and_flip():
    torch.manual_seed(0)
    images = torch.arange(2 * 3 * 32 * 32).reshape(2, 3, 32, 32).float().add(1).repeat(32, 1, 1, 1)
    out, padded, distinct = close.augment(images), F.pad(images, (4,) * 4), set()
    for i in range(len(images)):  # each output is one crop of the padded image, maybe mirrored
        crops = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32].flip(-1) if flip
                                else padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert len(crops) == 1
        distinct.add(crops[0])
    assert len(distinct) > 20  # drawn per image, not once per batch


# 3. CLOSENet: the parameter pool, the sharing assignment, the GATE
def n_params(module):
    return sum(p.numel() for p in module.parameters())


def small_batch(n=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator, dtype=dtype)
    return images, torch.randint(10, (n,), generator=generator)


def grown(model, level):
    while model.level < level:
        close.add_glow_block(model)
    return model


def tiny_model(level=1, blocks=3, baseline=False, seed=0, cells=1):
    torch.manual_seed(seed)
    return grown(close.CLOSENet(4, cells, blocks, baseline=baseline), level)


def gated_assignment(model, arch):
    """The GATE's straight-through assignment, also at level 1 (where the model skips it)."""
    gate = F.gumbel_softmax(model.gate_logits(arch), tau=close.GUMBEL_TEMPERATURE, hard=True)
    return close.SharingAssignment(gate=gate, chosen=gate.argmax(-1))


def loss_and_grads(model, images, labels, arch, assignment):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same head dropout mask in both formulations
    loss = F.cross_entropy(model(images, arch, assignment), labels)
    loss.backward(retain_graph=True)  # the assignment's graph (the GATE) is reused
    return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for n, p in model.named_parameters()}


def test_parameter_counts_match_the_official_supernets():
    vanilla = close.CLOSENet(baseline=True)
    assert n_params(vanilla) == 1_686_106 and vanilla.num_blocks == 6 and vanilla.gate is None
    assert vanilla.sharing_assignment((3,) * 6).blocks == [0, 1, 2, 3, 4, 5]
    # the official 1,664,335 holds the zero embedding of nodes 1-3 as a frozen parameter
    assert n_params(close.CLOSENet(num_blocks=5)) == 1_664_335 - 48
    counts = [n_params(close.CLOSENet(num_blocks=k)) for k in (1, 2, 3)]
    # a block: one op-weight set over 15 cells, and one more logit row in the GATE's last layer
    assert np.diff(counts).tolist() == [268_800 + 201] * 2
    for layer in close.CLOSENet(num_blocks=5).gate.messages:  # U(+-1/sqrt(width out)), officially
        assert 0.99 < layer.weight.abs().max() * layer.out_features ** 0.5 <= 1
    assignment = tiny_model().sharing_assignment((3,) * 6)  # level 1: block 0, no GATE
    assert assignment.blocks == [0] * 6 and assignment.gate is None


FORMS = [BEST_CIFAR10, BEST, list(BEST), np.array(BEST), torch.tensor(BEST)]
BAD_ARCHS = ["|nor_conv_3x3~0|", (3, 3, 3), (3, 3, 3, 1, 3, 7), (3, 3, 3, 1, 3, True),
             torch.tensor(BEST).float(), torch.tensor(BEST) > 0]
ENTRY_POINTS = {
    "forward": lambda model, arch: model(small_batch()[0], arch),
    "score_arch": lambda model, arch: close.score_arch(model.eval(), arch, *small_batch(), 8),
    "sharing_assignment": lambda model, arch: model.sharing_assignment(arch).blocks,
    "gate_logits": lambda model, arch: model.gate_logits(arch),
    "arch_to_str": lambda model, arch: close.arch_to_str(arch),
    "canonical": lambda model, arch: close.canonical(arch),
    "train_step": lambda model, arch: one_step(model, arch),
}


def one_step(model, arch):
    torch.manual_seed(0)
    optimizer = close.make_optimizer(model, close.Config())[0]
    close.train_step(model.train(), optimizer, *small_batch(), arch, 5.0)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_arch_in_any_form_means_the_same_and_a_bad_one_is_refused(entry):
    call = ENTRY_POINTS[entry]
    first, *others = [call(tiny_model(level=3, seed=1).eval(), form) for form in FORMS]
    assert all(torch.equal(r, first) if torch.is_tensor(r) else r == first for r in others)
    for bad in BAD_ARCHS:
        with pytest.raises(ValueError, match="not an NB201 architecture"):
            call(tiny_model(level=3), bad)


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
    model = tiny_model(level, blocks=5, baseline=baseline, seed=level).double().train()
    with torch.no_grad():  # make the blocks differ, as training would
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("level", [1, 2, 3, 5])
def test_the_fused_glow_op_equals_the_papers_plain_sum_in_float64(level, monkeypatch):
    """sum_i gate_i * block_i(x), every active block with autograd, against the fused form: the
    loss and every gradient, the GATE's included."""
    model, (images, labels) = float64_model(False, level), small_batch(6, dtype=torch.float64)
    for arch in [AWKWARD_ARCHS[i] for i in (0, 2, 5, 6)]:
        torch.manual_seed(100)
        assignment = gated_assignment(model, arch)
        monkeypatch.setattr(close, "FUSED_UNCHOSEN_BLOCKS", True)
        fused_loss, fused = loss_and_grads(model, images, labels, arch, assignment)
        monkeypatch.setattr(close, "FUSED_UNCHOSEN_BLOCKS", False)
        plain_loss, plain = loss_and_grads(model, images, labels, arch, assignment)
        assert (fused_loss - plain_loss).abs() < 1e-12
        assert all((fused[name] - plain[name]).abs().max() < 1e-12 for name in plain), arch
        gate = torch.cat([g.flatten() for n, g in plain.items() if n.startswith("gate.")])
        # one block, or no routed edge: nothing for the GATE to learn
        assert bool(gate.abs().sum() > 0) == (level > 1 and bool(close.routed_edges(arch)))


def test_gate_is_hard_in_forward_and_only_chosen_blocks_get_gradient():
    model, (images, labels), arch = tiny_model(4, blocks=5, cells=2).train(), small_batch(), (
        3, 3, 2, 3, 2, 3)  # every edge parameterised and live
    for trial in range(5):
        assignment = model.sharing_assignment(arch)
        gate = assignment.gate
        assert gate.shape == (6, 4) and ((gate == 0).sum(-1) == 3).all()
        assert torch.allclose(gate.sum(-1), torch.ones(6)) and assignment.blocks is None
        assert torch.equal(gate.argmax(-1), assignment.chosen)
        _, grads = loss_and_grads(model, images, labels, arch, assignment)
        used = {(op, b) for op, b in zip(arch, assignment.chosen.tolist())}
        for c, cell in enumerate(model.cells()):
            for b, block in enumerate(cell.glow_blocks):
                for op in (close.CONV1X1, close.CONV3X3):
                    name = next(n for n, p in model.named_parameters() if p is block.weight(op))
                    assert bool(grads[name].any()) == ((op, b) in used), (trial, c, b, op)
        assert any(grads[n].any() for n in grads if n.startswith("gate."))


def test_scoring_uses_the_eval_gate_and_seed_it_is_given_and_batch_statistics():
    """Oracle: the forward pass on the assignment that eval_gate and seed pick, written out."""
    model, (images, labels) = float64_model(False, 3), small_batch(16, dtype=torch.float64)
    losses = []
    for arch in [AWKWARD_ARCHS[0], *AWKWARD_ARCHS[5:]]:
        for gate, seed in (("argmax", 0), ("sample", 0), ("sample", 3)):
            with torch.no_grad(), close.evaluating(model):
                logits = model(images, arch, model.sharing_assignment(arch, gate, seed))
            expected = ((logits.argmax(1) == labels).double().mean().item() * 100,
                        F.cross_entropy(logits, labels).item())
            scored = close.score_arch(model, arch, images, labels, 16, gate, seed)
            assert scored == pytest.approx(expected, rel=0, abs=1e-12), (arch, gate, seed)
            losses.append(expected[1])
    by_gate = [losses[i::3] for i in range(3)]  # a score that ignored the pick would show
    assert by_gate[0] != by_gate[1] != by_gate[2] != by_gate[0]
    model.eval()  # batch statistics: an image's logits depend on the others in its batch
    assert not torch.allclose(model(images[:8], BEST)[:4], model(images[[0, 1, 2, 3, 9]], BEST)[:4])


@pytest.mark.parametrize("baseline, level", [(True, 6), (False, 5)])
def test_scoring_in_one_pass_equals_the_per_batch_loop_in_float64(baseline, level):
    """Many batches in one pass, each normalised by its own statistics, score as one pass per
    batch (the oracle, written out), the last, smaller batch included."""
    model, (images, labels) = float64_model(baseline, level), small_batch(70, 1, torch.float64)
    passes = []
    model.register_forward_hook(lambda module, args, out: passes.append(len(args[0])))
    for arch in AWKWARD_ARCHS:
        with torch.no_grad(), close.evaluating(model):
            assignment, logits = model.sharing_assignment(arch), []
            logits = [model(images[i:i + 16], arch, assignment) for i in range(0, 70, 16)]
        expected = (np.mean([(x.argmax(1) == y).double().mean().item() * 100 for x, y in
                             zip(logits, labels.split(16))]),
                    np.mean([F.cross_entropy(x, y).item() for x, y in
                             zip(logits, labels.split(16))]))
        for per_pass, sizes in ((0, [16] * 4 + [6]), (32, [32, 32, 6]), (96, [64, 6])):
            passes.clear()
            scored = close.score_arch(model, arch, images, labels, 16, "sample", 0, per_pass)
            assert passes == sizes and scored == pytest.approx(expected, abs=1e-12), arch
    with pytest.raises(ValueError, match="must be 0 or a multiple of the batch size"):
        close.score_arch(model, arch, images, labels, 16, images_per_pass=24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here")
def test_on_cuda_scoring_in_one_pass_agrees_with_the_per_batch_loop_in_bf16():
    model = tiny_model(3).cuda().to(memory_format=close.MEMORY_FORMAT)
    images = torch.randn(1000, 3, 32, 32, device="cuda").to(memory_format=close.MEMORY_FORMAT)
    labels = torch.randint(10, (1000,), device="cuda")
    for arch in AWKWARD_ARCHS:
        per_batch = close.score_arch(model, arch, images, labels, 128, images_per_pass=128)
        one_pass = close.score_arch(model, arch, images, labels, 128)  # CUDA: 40 batches a pass
        assert abs(one_pass[0] - per_batch[0]) < 0.5 and abs(one_pass[1] - per_batch[1]) < 0.01


def test_gate_logits_of_many_archs_and_scoring_leaves_the_callers_mode():
    model = tiny_model(3).eval()
    many = model.gate_logits([BEST, (0,) * 6, BEST_CIFAR10])
    assert many.shape == (3, 6, 3) and torch.equal(many[0], many[2])
    assert torch.allclose(many[0], model.gate_logits(BEST), rtol=1e-5, atol=1e-7)
    for training in (True, False):
        model.train(training)
        close.score_arch(model, BEST, *small_batch(), 8)
        close.gate_spread(model)
        assert all(m.training == training for m in model.modules())


def test_a_block_beyond_the_pool_and_a_parameter_free_op_are_clear_errors():
    with pytest.raises(ValueError, match="all 2 blocks are at work already"):
        close.add_glow_block(tiny_model(2, blocks=2))
    with pytest.raises(ValueError, match="all 6 blocks are at work already"):
        close.add_glow_block(tiny_model(baseline=True))
    block = close.GlowBlock(4)
    assert block.weight(close.CONV1X1).shape == (4, 4, 1, 1)
    assert block.weight(close.CONV3X3).shape == (4, 4, 3, 3)
    for op in (close.NONE, close.SKIP, close.AVG_POOL):
        with pytest.raises(ValueError, match="has no weights"):
            block.weight(op)


# 4. Curriculum and WIT
def test_curriculum_schedule_restart_and_level_starts():
    levels = [close.curriculum_level(epoch, 250, 5) for epoch in range(250)]
    assert [levels.index(level) for level in range(1, 6)] == [0, 50, 100, 150, 200]
    official = [close.curriculum_level(epoch, 1000, 5) for epoch in range(1000)]
    assert [official.index(level) for level in range(1, 6)] == [0, 200, 400, 600, 800]
    assert close.restart_epoch(1000) == 400 and close.restart_epoch(10) == 4
    # the pictures' marks count epochs from 1, as log.csv and curve.csv: level 2 from epoch 51
    assert close.level_starts(250, 5) == {1: 1, 2: 51, 3: 101, 4: 151, 5: 201}
    assert close.level_starts(5, 5) == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}


def trained_between_growths(levels=(2, 3, 4)):
    """(model, level, fresh block, fresh logit rows), trained a little between growths."""
    model = tiny_model(blocks=4, cells=2)
    optimizer, images, labels = close.make_optimizer(model, close.Config())[0], *small_batch()
    archs = close.unique_archs()[::700]
    for level in levels:
        for arch in archs[:3]:
            close.train_step(model, optimizer, images, labels, arch, 5.0)
        model.eval()
        before = [[model(images, arch, close.SharingAssignment([b] * 6)) for arch in archs]
                  for b in range(level - 1)]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        fresh = [[p.clone() for p in cell.glow_blocks[level - 1].parameters()]
                 for cell in model.cells()]
        fresh_rows = [model.gate.mlp[-1].weight[level - 1].clone(),
                      model.gate.mlp[-1].bias[level - 1].clone()]
        close.add_glow_block(model)
        assert model.level == level and {id(p) for p in model.parameters()} == held  # in place
        for b in range(level - 1):  # blocks that existed compute exactly what they did
            assert all(torch.equal(model(images, arch, close.SharingAssignment([b] * 6)), out)
                       for arch, out in zip(archs, before[b]))
        yield model, level, fresh, fresh_rows


def test_official_growth_adds_the_parent_to_the_fresh_init():
    for model, level, fresh, fresh_rows in trained_between_growths():
        assert len(model.cells()) == len(fresh) == 6
        for cell, fresh_block in zip(model.cells(), fresh):  # in every cell
            new, parent = (cell.glow_blocks[i].parameters() for i in (level - 1, level - 2))
            assert all(torch.allclose(n, f + p) for n, f, p in zip(new, fresh_block, parent))
        last = model.gate.mlp[-1]  # the GATE's logit row grows too, weights and bias
        for row, fresh_row in zip((last.weight, last.bias), fresh_rows):
            assert torch.allclose(row[level - 1], fresh_row + row[level - 2])
            assert not torch.allclose(row[level - 1], fresh_row)


# 5. Training
def test_training_draws_from_the_unique_archs(monkeypatch):
    drawn = []
    monkeypatch.setattr(close, "train_step", lambda model, opt, images, labels, arch, clip: (
        drawn.append(arch), (torch.zeros(()), torch.zeros(len(labels), 10)))[1])
    torch.manual_seed(0)
    finished = close.train_epoch(close.CLOSENet(4, 1), None, close.synthetic_dataset(1500, 1),
                                 close.Config(batch_size=1))
    assert len(drawn) == 1500 == finished["images"] and finished["losses"].shape == (1500,)
    assert set(drawn) <= set(close.unique_archs())  # representatives only
    # uniform over 6,466 classes: 1,500 draws hit about 6466 * (1 - exp(-1500 / 6466)) = 1,339
    assert 1280 < len(set(drawn)) < 1400


def test_the_official_step_decays_every_active_weight_used_or_not_in_any_training_loop():
    model, cfg = tiny_model(2), close.Config()
    optimizer = close.make_optimizer(model, cfg)[0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.weight_decay]  # one for all
    blocks = model.cells()[0].glow_blocks
    unused = [blocks[0].conv1x1.weight, blocks[1].conv1x1.weight]  # the arch has no conv 1x1
    waiting = list(blocks[2].parameters())  # beyond the level: they wait to grow
    before = [p.clone() for p in unused + waiting]
    optimizer.zero_grad()  # a plain loop of the user's own, with torch's default (set_to_none)
    F.cross_entropy(model(small_batch()[0], (3,) * 6), small_batch()[1]).backward()
    assert all(p.grad is None for p in unused + waiting)
    optimizer.step()
    shrink = 1 - cfg.lr * cfg.weight_decay  # a zero gradient: the first step is weight decay alone
    assert all(torch.allclose(p, old * shrink, rtol=1e-6, atol=0) and not torch.equal(p, old)
               for p, old in zip(unused, before))
    assert all(p.grad is None and torch.equal(p, old) for p, old in zip(waiting, before[2:]))
    assert not any(p.requires_grad for p in waiting)  # frozen until WIT brings them in
    close.add_glow_block(model)
    assert all(p.requires_grad for p in waiting)
    restored = close.CLOSENet(4, 1, 4)  # the level travels with the weights, and freezes
    restored.load_state_dict(tiny_model(3, blocks=4).state_dict())
    assert restored.level == 3 and [b.conv3x3.weight.requires_grad for b in
                                    restored.cells()[0].glow_blocks] == [True] * 3 + [False]


def test_train_step_is_the_official_step_bit_for_bit():
    """The official trainer (torch 1.x): gradients zeroed in place, never dropped, so a weight
    that had one keeps being decayed and moved by momentum; oracle: a plain SGD loop whose active
    parameters all start with a zero gradient."""
    cfg, archs = close.Config(), [(3, 0, 0, 3, 0, 0), (2, 1, 4, 0, 2, 3), (4,) * 6, BEST]

    def train(level, official, to_none=False):
        model = tiny_model(level)
        optimizer = close.make_optimizer(model, cfg)[0]
        if official:
            optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay)
            for name, p in model.named_parameters():  # blocks beyond the level: out of the graph
                p.grad = None if any(f"blocks.{b}." in name for b in range(level, 3)) else (
                    torch.zeros_like(p))
        for step, arch in enumerate(archs):
            torch.manual_seed(step)  # the same dropout and Gumbel draws in both loops
            if not official:
                close.train_step(model, optimizer, *small_batch(), arch, cfg.grad_clip)
                continue
            loss = F.cross_entropy(model(small_batch()[0], arch), small_batch()[1])
            optimizer.zero_grad(set_to_none=to_none)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    for level in (1, 2):  # level 1: the GATE is decayed although it is out of the graph
        assert all(torch.equal(a, b) for a, b in zip(train(level, False), train(level, True)))
    # torch 2's default, set_to_none, is another rule: unused weights escape the decay
    assert not all(torch.equal(a, b) for a, b in zip(train(2, False), train(2, True, True)))


def test_train_step_clips_the_gradient_norm():
    model = tiny_model(2)
    optimizer = close.make_optimizer(model, close.Config())[0]
    close.train_step(model, optimizer, *small_batch(), (3, 2, 1, 3, 4, 2), grad_clip=0.01)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.linalg.vector_norm(grads) == pytest.approx(0.01)


def test_train_restarts_the_learning_rate_and_momentum_at_40_percent(monkeypatch):
    """A new optimizer (lr back to --lr, no momentum) and plateau schedule at epoch 4 of 10."""
    cfg, model, seen = close.Config(epochs=10, blocks=5), tiny_model(blocks=5), []
    state = close.TrainingState(*close.make_optimizer(model, cfg))

    def one_pass(model, optimizer, data, cfg):  # as if the plateau had cut lr, with momentum
        seen.append((optimizer, optimizer.param_groups[0]["lr"], len(optimizer.state)))
        optimizer.param_groups[0]["lr"] /= 4
        optimizer.state[next(model.parameters())]["momentum_buffer"] = torch.ones(1)
        return {"losses": torch.ones(1), "correct": torch.zeros(()), "images": 1}

    monkeypatch.setattr(close, "train_epoch", one_pass)
    close.train(model, None, cfg, state)
    new = [e for e in range(1, 10) if seen[e][0] is not seen[e - 1][0]]
    assert len(seen) == 10 and new == [4] and seen[4][1:] == (cfg.lr, 0)
    assert all(lr < cfg.lr for _, lr, _ in seen[1:4] + seen[5:])
    assert state.optimizer is seen[-1][0] and state.scheduler.optimizer is state.optimizer


# 6. Evaluation: ranking metrics, the GATE's spread, precision
def test_arch_subsets_are_drawn_by_their_seed():
    subset = close.seeded_archs(6, 3)
    assert subset == close.seeded_archs(6, 3) != close.seeded_archs(6, 4)
    assert len(set(subset)) == 6 and set(subset) <= set(close.unique_archs())
    assert close.seeded_archs(0, 3) == close.seeded_archs(7000, 3) == close.unique_archs()


def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    for capability, precision in (((7, 5), torch.float32), ((8, 0), torch.bfloat16),
                                  ((9, 0), torch.bfloat16), ((6, 1), torch.float32)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
        assert close.precision(torch.device("cuda:0")) == precision, capability
    assert close.precision(torch.device("cpu")) == torch.float32
    assert not close.autocast(torch.device("cpu"))._enabled


def test_gate_spread_on_a_hand_built_gate(monkeypatch):
    model = tiny_model(3)
    archs = random.Random(0).sample(close.unique_archs(), 500)
    routed = [close.routed_edges(arch) for arch in archs]
    logits = torch.randn(500, 6, 3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(model, "gate_logits", lambda given: logits if given == archs else None)
    centred = torch.cat([logits[i, r] - logits[i, r].mean(-1, keepdim=True)
                         for i, r in enumerate(routed)])  # (routed edges, 3)
    assert close.gate_spread(model) == pytest.approx(centred.std(0, correction=1).mean().item())
    assert close.gate_spread(tiny_model()) is None  # level 1: no GATE at work
    assert close.describe_gate(0.01).startswith("GATE BLIND") and "BLIND" not in (
        close.describe_gate(0.5))


def test_correlations_by_counting_pairs_and_average_ranks():
    """Independent oracles: Kendall tau-b from concordant and discordant pairs, Spearman as the
    Pearson correlation of average ranks, Pearson from its formula; ties on both sides."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=120).round(1)  # ties in the truth too
    predicted = truth + rng.normal(size=120)
    predicted[:20] = predicted[0]
    i, j = np.triu_indices(len(truth), 1)
    dx, dy = np.sign(predicted[i] - predicted[j]), np.sign(truth[i] - truth[j])
    tau_b = (np.sum(dx * dy > 0) - np.sum(dx * dy < 0)) / np.sqrt(
        (len(i) - np.sum(dx == 0)) * (len(i) - np.sum(dy == 0)))

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


@pytest.mark.parametrize("truth, predicted, expected", [
    # true ranks 0..9; predicted order: archs 1, 3, 8, 9, 0 | 6, 5, 4, 2, 7
    ([90, 80, 70, 60, 50, 40, 30, 20, 10, 0], [5, 9, 1, 8, 2, 3, 4, 0, 7, 6],
     {"P@top10%": 0, "BR@10%": 2, "WR@10%": 2, "P@top20%": 0.5, "BR@20%": 2, "WR@20%": 4,
      "P@top50%": 0.6, "BR@50%": 1, "WR@50%": 10, "P@bottom10%": 0, "P@bottom20%": 0,
      "P@bottom50%": 0.6}),
    # ties in the truth share the best rank: true ranks 0, 0, 2, 3, 3, 3, 6, 7, 8, 9; predicted
    # order 1, 3, 4, 5, 6, 7, 8, 9, 2, 0; from the bottom: 9, 8, 7, 6 -> 0-3, 3-5 -> 4, 2 -> 7
    ([90, 90, 80, 70, 70, 70, 60, 50, 40, 30], [1, 10, 2, 9, 8, 7, 6, 5, 4, 3],
     {"P@top10%": 1, "BR@10%": 1, "WR@10%": 1, "P@top20%": 0.5, "BR@20%": 1, "WR@20%": 4,
      "P@top50%": 0.8, "BR@50%": 1, "WR@50%": 7, "P@bottom20%": 0, "P@bottom50%": 0.6}),
    (list(range(100)), [2 * x + 1 for x in range(100)], {"kendall_tau": pytest.approx(1),
     "P@top1%": 1, "P@bottom5%": 1, "BR@5%": 1, "WR@5%": 5, "BR@50%": 1, "WR@50%": 50}),
    (list(range(100)), [-x for x in range(100)], {"kendall_tau": pytest.approx(-1),
     "P@top10%": 0, "P@bottom10%": 0, "P@top50%": 0, "BR@10%": 91, "WR@10%": 100}),
    ([1, 2, 3], [1, 2, 3], {"P@top1%": None, "BR@1%": None}),  # k = int(3 * 0.01) = 0
])
def test_ranking_metrics_by_hand(truth, predicted, expected):
    ratios = (0.01, 0.05, 0.1, 0.2, 0.5)
    metrics = close.ranking_metrics(predicted, truth, ratios)
    assert {name: metrics[name] for name in expected} == expected
    assert close.descending_ranks([3, 5, 5, 1]).tolist() == [2, 0, 0, 3]  # ties share the best


def test_nb201_truth_is_the_mean_of_each_class_by_hand():
    path = shared_file("nb201_test_accuracy.csv")
    table = {row["arch"]: float(row["cifar10"]) for row in csv.DictReader(open(path))}
    accuracy, rank = close.load_ground_truth(str(path))
    # One class worked out by hand from NB201's rule: node 3 = conv1x1(x) + two zeros. Nothing
    # from node 2 (two terms: never exactly zero); conv1x1 from the input and nothing from node 1
    # (no op, or node 1 zero), or conv1x1 through node 1 (skip then conv1x1, or the reverse).
    c1, skip, none = close.CONV1X1, close.SKIP, close.NONE
    members = [a for a in close.ALL_ARCHS if a[5] == none and (a[3] == c1 and none in (
        a[0], a[4]) or a[3] == none and (a[0], a[4]) in ((skip, c1), (c1, skip)))]
    mean = np.mean([table[close.arch_to_str(a)] for a in members])
    assert len(members) == 275 and len({rank["cifar10"][a] for a in members}) == 1
    assert all(accuracy["cifar10"][a] == pytest.approx(mean, abs=1e-9) for a in members)
    assert accuracy["cifar10"][BEST] == table[BEST_CIFAR10] == pytest.approx(94.37, abs=0.005)
    assert rank["cifar10"][BEST] == 1 and set(accuracy) == set(rank) == set(close.NB201_DATASETS)
    for dataset, ranks in rank.items():  # each dataset ranks the 6,466 classes itself
        best = min(close.unique_archs(), key=ranks.__getitem__)
        assert ranks[best] == 1 and accuracy[dataset][best] == max(accuracy[dataset].values())


# 7. Search
def conv_count(arch):  # a unique optimum: every edge nor_conv_3x3; nor_conv_1x1 counts half
    return sum(1.0 if op == close.CONV3X3 else 0.5 if op == close.CONV1X1 else 0.0 for op in arch)


def test_regularized_evolution_finds_the_optimum_of_a_synthetic_fitness():
    calls = []
    best, value, history = close.regularized_evolution(
        lambda arch: calls.append(arch) or conv_count(arch), 400, 20, 5, seed=0)
    assert best == (close.CONV3X3,) * 6 and value == 6.0
    assert len(calls) == len(history) == 400  # the budget counts fitness calls
    assert set(calls) <= set(close.unique_archs())  # searches unique archs only
    rng = random.Random(0)
    for arch in close.unique_archs()[::97]:  # a mutant is another cell
        child = close.mutate(arch, rng)
        assert child != arch and close.canonical(child) == child
    first = [a for a, _ in close.regularized_evolution(lambda arch: 0.0, 20, 20, seed=0)[2]]
    # --seed 0 and --eval-seed 0 must not draw the same archs
    assert len(set(first) & set(close.seeded_archs(200, 0))) < 5


def test_random_search_evaluates_distinct_archs_and_keeps_the_best():
    def fitness(arch):
        calls.append(arch)
        return float(close.arch_index(arch) % 997)

    calls = []
    best, value, history = close.random_search(fitness, budget=300, seed=4)
    assert len(calls) == len(set(calls)) == len(history) == 300  # distinct, the budget
    assert set(calls) <= set(close.unique_archs())
    assert (best, value) == max(history, key=lambda member: member[1])
    assert close.random_search(fitness, 300, seed=4)[0] == best != close.random_search(
        fitness, 300, seed=5)[0]
    assert len(close.random_search(fitness, budget=10**5)[2]) == 6466  # each unique arch once


def test_reinforce_is_seeded_draws_raw_cells_and_learns_at_a_larger_rate():
    runs = {lr: [close.reinforce(conv_count, 300, seed, learning_rate=lr) for seed in range(3)]
            for lr in (0.001, 0.1)}
    best, value, history = runs[0.001][0]
    assert len(history) == 300 and (best, value) == max(history, key=lambda member: member[1])
    assert history == close.reinforce(conv_count, 300, 0)[2] != runs[0.001][1][2]
    assert any(arch != close.canonical(arch) for arch, _ in history)  # any of the 15,625
    ops = np.bincount([op for arch, _ in history for op in arch], minlength=5) / 1800
    assert np.abs(ops - 0.2).max() < 0.04  # 1e-3 * N(0, 1) logits: near uniform, and stays so
    for lr, gain in ((0.001, (-0.4, 0.4)), (0.1, (1.5, 6))):  # the last 100 draws vs the first
        gains = [np.mean([f for _, f in h[-100:]]) - np.mean([f for _, f in h[:100]])
                 for _, _, h in runs[lr]]
        assert all(gain[0] < g < gain[1] for g in gains), (lr, gains)


def test_the_three_searches_on_the_nb201_table():
    """As NB201 compares them: 10 seeds of 300 evaluations each, the truth as fitness."""
    fitness = close.load_ground_truth(str(shared_file("nb201_test_accuracy.csv")))[0]["cifar10"]
    fitness, seeds = fitness.__getitem__, range(10)
    evolution = np.mean([close.regularized_evolution(fitness, 300, seed=s)[1] for s in seeds])
    random_search = np.mean([close.random_search(fitness, 300, seed=s)[1] for s in seeds])
    reinforce = np.mean([close.reinforce(fitness, 300, seed=s)[1] for s in seeds])
    uniform = np.mean([max(map(fitness, random.Random(s).choices(close.ALL_ARCHS, k=300)))
                       for s in seeds])  # REINFORCE's first policy, never updated
    assert evolution > random_search + 0.05 and evolution > 94.3
    assert random_search > reinforce and abs(reinforce - uniform) < 0.3  # seeds: sd ~0.05 each
    faster = np.mean([close.reinforce(fitness, 300, s, learning_rate=0.1)[1] for s in seeds])
    assert faster > reinforce + 0.1


# The method copied out whole: the top of close.py with sections 1-7, nothing of 8 and 9
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


def test_the_top_with_sections_1_and_3_builds_a_closenet_that_trains_at_every_level(monkeypatch):
    copy = fresh_module(close_sections(1, 3), monkeypatch)
    assert not hasattr(copy, "add_glow_block") and not hasattr(copy, "train")
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
                assert any(p.grad is not None and p.grad.any()
                           for p in model.gate.parameters()) == (level > 1)
            model.eval()(images, BEST_CIFAR10)  # scoring's draw per arch


def test_the_top_with_sections_1_to_7_runs_the_papers_loop_end_to_end(monkeypatch):
    copy = fresh_module(close_sections(1, 2, 3, 4, 5, 6, 7), monkeypatch)
    cfg = copy.Config(data="synthetic", channels=4, cells=1, blocks=3, epochs=3, batch_size=64,
                      search_budget=12, population=4, tournament=2, search="reinforce")
    data = copy.synthetic_dataset(train=128, heldout=128)
    model = copy.build_model(cfg, data.num_classes, torch.device("cpu"))
    state, levels = copy.TrainingState(*copy.make_optimizer(model, cfg)), []
    copy.train(model, data, cfg, state, lambda finished: levels.append(model.level))
    assert levels == [1, 2, 3] and state.epoch == 3  # every growth
    images, labels = copy.heldout_set(data, cfg)
    archs = copy.seeded_archs(16, cfg.eval_seed)
    scores = {arch: copy.score_arch(model, arch, images, labels, cfg.batch_size) for arch in archs}
    ranking = copy.ranking_metrics([scores[a][0] for a in archs], [conv_count(a) for a in archs])
    assert -1 <= ranking["kendall_tau"] <= 1
    found = copy.search_with_supernet(model, images, labels, cfg, scores)
    assert found["best"] in copy.unique_archs() and found["unique_evaluated"] <= 12


# 8. Runs: end to end, the curve, resume, outputs, bad input, comparison
def fake_nb201_csv(path, datasets=close.NB201_DATASETS):
    """A made-up table over all 15,625 archs (not NB201's numbers): accuracy grows with conv ops,
    and differs between datasets by the op on one edge."""
    convs = np.array([sum(op in (2, 3) for op in a) for a in close.ALL_ARCHS])
    columns = {d: 50 - 10 * i + 5 * convs + np.array([a[i] for a in close.ALL_ARCHS])
               for i, d in enumerate(datasets)}
    nb.NB201([close.arch_to_str(a) for a in close.ALL_ARCHS], columns).save_csv(path)
    return path


@pytest.fixture(scope="module")
def fake_nb201(tmp_path_factory):
    return fake_nb201_csv(tmp_path_factory.mktemp("nb201") / "fake.csv")


def run_quietly(argv):
    """close.main(argv) and what it printed, for module fixtures (no capsys there)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(printed := io.StringIO()):
        assert close.main(argv) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fake_nb201):
    """A finished run (2 epochs, 2 blocks, --nb201, --eval-seed 3, a curve point after each
    epoch) and what it printed; a test that changes it works on a copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    printed = run_quietly(TINY + ["--epochs", "2", "--blocks", "2", "--nb201", str(fake_nb201),
                                  "--eval-seed", "3", "--out", str(out)])
    return out, printed


def copied(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / run.name))


def run_rows(out):
    """log.csv and curve.csv (timings aside), scores.csv, curve_scores.csv and the checkpoint."""
    def rows(name, drop=("seconds", "images_per_s")):
        path = out / name
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(open(path))]

    return (rows("log.csv"), rows("curve.csv"), (out / "scores.csv").read_text(),
            (out / "curve_scores.csv").read_text(),
            torch.load(out / "checkpoint.pt", weights_only=True))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(t, b[k]) for k, t in a.items()
                                        if k != "_extra_state")


def test_end_to_end_run_writes_every_output_and_prints_its_numbers(finished_run):
    out, printed = finished_run
    assert {"config.json", "log.csv", "checkpoint.pt", "scores.csv", "metrics.json", "search.json",
            "curve.csv", "curve_scores.csv"} <= {p.name for p in out.iterdir()}
    metrics, search = (json.loads((out / name).read_text()) for name in ("metrics.json",
                                                                          "search.json"))
    assert metrics["ranking"]["n"] == metrics["scored_archs"] == 12 == len(
        [row for row in csv.DictReader(open(out / "scores.csv")) if row["nb201_accuracy"]])
    assert (metrics["heldout_images"], metrics["precision"], metrics["device"]) == (
        64, "float32", "cpu")
    assert [row["level"] for row in csv.DictReader(open(out / "log.csv"))] == ["1", "2"]
    assert search == metrics["search"] and (search["budget"], search["strategy"]) == (16,
                                                                                     "evolution")
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["model"]["_extra_state"]["level"] == 2
    summary = printed.split("\n== ")[1]  # metrics.json's numbers: each phase's time, tau, the cell
    assert all(f"{phase[:-2]} {close.duration(seconds)}" in summary
               for phase, seconds in metrics["times"].items()) and len(metrics["times"]) == 5
    assert f"kendall_tau {metrics['ranking']['kendall_tau']:.3g}, " in summary
    cell = search["best"]["nb201"]["cifar10"]
    assert f"found {search['best']['arch']}" in summary and set(search["best"]["nb201"]) == set(
        close.NB201_DATASETS)
    assert f"cifar10: {cell['accuracy']:.2f}%, rank {cell['rank']:,} of 6,466" in summary
    assert f"mean one-shot accuracy {metrics['mean_oneshot_accuracy']:.1f}%" in summary
    assert printed.startswith("warning: --data synthetic: its ranking against NB201 means nothing")
    assert printed.splitlines()[1].endswith(", cpu, float32")


def test_the_curve_is_the_final_scorings_protocol_on_the_tracked_archs(finished_run, fake_nb201):
    """Its last point recomputed from the checkpoint: score_arch on the first --track-batches
    held-out batches, ranking_metrics against NB201, for the --eval-seed subset."""
    out, printed = finished_run
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = close.Config(**checkpoint["config"])
    model = close.build_model(cfg, 10, torch.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    images, labels = close.heldout_set(close.load_dataset(cfg), cfg, cfg.track_batches)
    archs = close.seeded_archs(cfg.track_archs, cfg.eval_seed)
    scores = [close.score_arch(model, a, images, labels, 64, cfg.eval_gate, 3) for a in archs]
    truth = close.load_ground_truth(str(fake_nb201))[0]["cifar10"]
    ranking = close.ranking_metrics([s[0] for s in scores], [truth[a] for a in archs])
    last = close.finished_run(out)["curve"][-1]
    assert (last["epoch"], last["level"], last["lr"], len(archs)) == (2, 2, 0.05, 6)
    assert last["mean_oneshot_accuracy"] == np.mean([s[0] for s in scores])
    assert all(last[name] == ranking[name] for name in ("kendall_tau", "spearman", "P@top5%"))
    rows = list(csv.DictReader(open(out / "curve_scores.csv")))
    assert [row["epoch"] for row in rows] == ["1"] * 6 + ["2"] * 6
    assert [(close.str_to_arch(r["arch"]), float(r["oneshot_accuracy"]), float(r["oneshot_loss"]))
            for r in rows[6:]] == [(a, *s) for a, s in zip(archs, scores)]
    assert f"tracked tau {last['kendall_tau']:.3f}" in printed.split("epoch    2/2")[1]


# 3 epochs, 3 blocks, 2 steps per epoch: epoch 2 (index 1) starts with a growth and the learning
# rate restart; curve points after epoch 2 and after the last
RESUME_ARGS = TINY + ["--epochs", "3", "--blocks", "3", "--track-every", "2"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run_quietly(RESUME_ARGS + ["--out", str(out)])
    return out


def test_tracking_leaves_training_bit_identical(straight_run, tmp_path, capsys):
    untracked = tmp_path / "untracked"
    assert quietly(RESUME_ARGS + ["--track-every", "0", "--out", str(untracked)], capsys)[0] == 0
    (log_a, curve_a, scores_a, _, state_a), (log_b, curve_b, scores_b, _, state_b) = (
        run_rows(straight_run), run_rows(untracked))
    assert [p["epoch"] for p in curve_a] == ["2", "3"] and curve_b == []  # the last point too
    assert log_a == log_b and scores_a == scores_b and same_weights(state_a["model"],
                                                                    state_b["model"])
    assert (straight_run / "search.json").read_text() == (untracked / "search.json").read_text()


@pytest.fixture
def ctrl_c_interrupts():
    """Ctrl-C raises KeyboardInterrupt, also in a background job (started with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def stopped_run(out, monkeypatch, capsys, stop_at_call):
    """A run stopped by Ctrl-C after its stop_at_call-th training step; its checkpoint."""
    with monkeypatch.context() as patch:
        on_call(patch, "train_step", stop_at_call, ctrl_c)
        assert close.main(RESUME_ARGS + ["--out", str(out)]) == 130
    assert f"interrupted: --resume {out} goes on" in capsys.readouterr().err
    saved = torch.load(out / "checkpoint.pt", weights_only=True) if (out / "checkpoint.pt").exists(
        ) else {"epoch": 0}
    assert saved["epoch"] == (stop_at_call - 1) // 2
    return saved


# before any checkpoint; and in epoch 3, after the restart, where the optimizer's momentum and
# the plateau schedule saved with epoch 2 are what the rest of the run goes on from
@pytest.mark.parametrize("stop_at_call", [1, 5])
def test_resume_is_bit_identical_to_an_uninterrupted_run(
        straight_run, tmp_path, monkeypatch, capsys, stop_at_call, ctrl_c_interrupts):
    stopped_run(tmp_path / "run", monkeypatch, capsys, stop_at_call)
    assert close.main(["--resume", str(tmp_path / "run")]) == 0
    *rows_a, state_a = run_rows(straight_run)
    *rows_b, state_b = run_rows(tmp_path / "run")
    assert rows_a == rows_b and [p["epoch"] for p in rows_b[1]] == ["2", "3"]  # the curve goes on
    assert same_weights(state_a["model"], state_b["model"])
    momentum = [(i, s["momentum_buffer"]) for i, s in state_b["optimizer"]["state"].items()]
    assert momentum and all(torch.equal(m, state_a["optimizer"]["state"][i]["momentum_buffer"])
                            for i, m in momentum)


def test_resume_goes_on_with_the_saved_plateau_schedule(tmp_path, monkeypatch, capsys,
                                                        ctrl_c_interrupts):
    """A schedule saved one bad epoch from halving the learning rate halves it after the next."""
    saved = stopped_run(tmp_path / "run", monkeypatch, capsys, 5)  # after epoch 2 of 3
    assert saved["scheduler"]["patience"] == 1
    saved["scheduler"] |= {"best": 0.0, "num_bad_epochs": 1}  # no loss gets below 0
    torch.save(saved, tmp_path / "run" / "checkpoint.pt")
    assert close.main(["--resume", str(tmp_path / "run")]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == close.Config().lr / 2
    assert state["scheduler"]["num_bad_epochs"] == 0  # reset by the halving


def test_scoring_resumes_from_partial_scores(finished_run, tmp_path, monkeypatch, capsys):
    out = copied(finished_run[0], tmp_path)
    (out / "metrics.json").unlink()
    complete = (out / "scores.csv").read_text()
    lines = complete.splitlines(keepends=True)
    (out / "scores.csv").write_text("".join(lines[:6]) + lines[6][:10])  # 5 rows and a torn one
    calls = on_call(monkeypatch, "score_arch", 0, None)
    assert close.main(["--resume", str(out), "--search-budget", "0"]) == 0
    assert len(calls) == 12 - 5 and (out / "scores.csv").read_text() == complete


def test_resume_and_load_take_the_runs_own_options(finished_run, tmp_path, capsys):
    out = copied(finished_run[0], tmp_path)
    for argv, refused in ((["--resume", str(out), "--channels", "8", "--eval-seed", "3"],
                           "--channels --eval-seed"),
                          (["--load", str(out / "checkpoint.pt"), "--track-archs", "7"],
                           "--track-archs")):
        assert f"runs on the run's own options: drop {refused}" in error_line(capsys, argv)
    # a finished run: resuming it says so and changes nothing
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert quietly(["--resume", str(out), "--device", "cpu"], capsys) == (
        0, f"{out} holds a finished run: nothing to resume\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "metrics.json").unlink()  # unfinished: nothing retyped, scored with its own options
    assert quietly(["--resume", str(out)], capsys)[0] == 0
    assert json.loads((out / "metrics.json").read_text())["scored_archs"] == 12
    cfg, _ = close.run_options(close.Config(), [], None, str(out / "checkpoint.pt"))
    assert (cfg.channels, cfg.eval_seed, cfg.out) == (4, 3, str(out / "rescored"))


def test_load_scores_and_searches_as_the_run_did_and_reports_three_datasets(finished_run, tmp_path,
                                                                           capsys):
    out, again = finished_run[0], tmp_path / "again"
    code, printed = quietly(["--load", str(out / "checkpoint.pt"), "--out", str(again)], capsys)
    assert code == 0 and printed.count("no curve") == 1 and not (again / "curve.csv").exists()
    assert all((again / n).read_text() == (out / n).read_text() for n in ("scores.csv",
                                                                           "search.json"))
    accuracy, rank = close.load_ground_truth(json.loads((out / "config.json").read_text())["nb201"])
    assert quietly(["--load", str(out / "checkpoint.pt"), "--search", "reinforce", "--out",
                    str(tmp_path / "r")], capsys)[0] == 0
    found = json.loads((tmp_path / "r" / "search.json").read_text())
    best = close.str_to_arch(found["best"]["arch"])
    assert found["strategy"] == "reinforce" and found["unique_evaluated"] <= 16
    assert found["best"]["nb201"] == {d: {"accuracy": accuracy[d][best], "rank": rank[d][best]}
                                      for d in close.NB201_DATASETS}


def test_non_finite_loss_and_out_of_memory_stop_in_one_line_keeping_the_checkpoint(
        tmp_path, capsys, monkeypatch):
    def nan_loss(real, *args):
        loss, logits = real(*args)
        return loss * float("nan"), logits

    for act, message in ((nan_loss, "non-finite in epoch 2"),
                         (out_of_memory, "out of memory (cpu; checkpoint and scores kept): "
                                         "--resume")):
        out = tmp_path / message[:3]
        with monkeypatch.context() as patch:
            on_call(patch, "train_step", 3, act)  # epoch 2: 2 steps per epoch
            err = error_line(capsys, TINY + ["--epochs", "2", "--blocks", "2", "--out", str(out)],
                             code=1)
        assert message in err and torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_scoring_out_of_gpu_memory_keeps_the_scores_and_resumes(finished_run, tmp_path, capsys,
                                                                monkeypatch):
    out = copied(finished_run[0], tmp_path)
    (out / "metrics.json").unlink()
    (out / "scores.csv").write_text("".join(open(out / "scores.csv").readlines()[:4]))  # 3 rows
    on_call(monkeypatch, "score_arch", 3, out_of_memory)
    err = error_line(capsys, ["--resume", str(out)], code=1)
    assert "--images-per-pass" in err and "--batch-size below 64" in err
    assert len((out / "scores.csv").read_text().splitlines()) == 1 + 3 + 2  # kept as they came
    monkeypatch.undo()
    assert quietly(["--resume", str(out)], capsys)[0] == 0
    assert (out / "scores.csv").read_text() == (finished_run[0] / "scores.csv").read_text()


def test_interrupt_before_anything_is_saved_says_so(tmp_path, capsys, monkeypatch):
    def ctrl_c_now(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(close, "load_dataset", ctrl_c_now)
    assert close.main(TINY + ["--baseline", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "--resume" not in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("extra, message", [
    (["--device", "tpu"], "--device tpu: no such device here (--device cpu)"),
    (["--device", "cuda:7"], "--device cuda:7: no such device here (--device cpu)"),
    (["--epochs", "2", "--blocks", "5"], "smaller than the 5 curriculum stages"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--momentum", "-0.5"], "--momentum must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    (["--eval-gate", "best"], "--eval-gate: invalid choice: 'best'"),
    (["--lr", "fast"], "--lr: invalid float value"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),  # no abbreviations
    (["--images-per-pass", "100"], "--images-per-pass must be 0 or a multiple of --batch"),
    (["--track-every", "-2"], "--track-every must be 0 or more, or -1 (epochs // 10)"),
    (["--track-archs", "1"], "--track-archs must be 2 to 6,466, got 1"),
    (["--track-batches", "0"], "--track-batches must be positive"),
    (["--nb201", "/nonexistent/nb201.csv"], "--nb201 /nonexistent/nb201.csv"),
    (["--data", "/nonexistent/folder"], "--data /nonexistent/folder: not 'synthetic'"),
    (["--resume", "/nonexistent"], "--resume /nonexistent: no run there"),
])
def test_bad_input_is_one_clear_line_and_touches_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert message in error_line(capsys, TINY + ["--epochs", "2", "--blocks", "2", "--out",
                                                 str(out)] + extra)
    assert not out.exists()


def test_bad_files_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(close, "load_dataset", lambda cfg: pytest.fail("the data was read"))
    (tmp_path / "nb201.pth").write_bytes(b"not a pickle")
    (tmp_path / "README.md").write_text("# not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pt")
    (a_file := tmp_path / "a-file").write_text("mine")
    cases = [(TINY + ["--nb201", str(tmp_path / "nb201.pth")], "--nb201"),
             (["--load", str(tmp_path / "README.md")], "README.md: not a close.py checkpoint"),
             (["--load", str(tmp_path / "dict.pt")], "dict.pt: not a close.py checkpoint"),
             (TINY + ["--out", str(a_file / "run")], f"{a_file} is not a folder that can be")]
    for name, text in {"corrupt": "{not json", "listed": "[1, 2]", "short": '{"epochs": 3}',
                       "typed": json.dumps(dataclasses.asdict(close.Config()) | {"epochs": "9"})
                       }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        cases.append((["--resume", str(tmp_path / name)], "not the options of a run of this"))
    for argv, message in cases:
        err = error_line(capsys, argv)
        assert message in err and "weights_only" not in err, argv  # torch's advice is unsafe
    monkeypatch.undo()
    assert a_file.read_text() == "mine"
    for folder, message in (("empty", "an image-folder tree"), ("one", "need at least 2")):
        (tmp_path / folder / "train" / "cat").mkdir(parents=True)
        if folder == "one":
            write_png(tmp_path / folder / "train" / "cat" / "0.png", 0)
        assert message in error_line(capsys, TINY + ["--data", str(tmp_path / folder), "--out",
                                                     str(tmp_path / "x")])
    torch.save({"config": dataclasses.asdict(close.Config(data="synthetic", channels=4)),
                "model": {"x": torch.zeros(1)}, "log": [], "curve": []}, tmp_path / "w.pt")
    assert "w.pt: not a close.py checkpoint, or not of these options" in error_line(
        capsys, ["--load", str(tmp_path / "w.pt"), "--device", "cpu"])  # once the model is built
    assert not (tmp_path / "rescored").exists() and not (tmp_path / "x").exists()


def test_an_out_folder_holding_a_run_or_other_files_is_refused_untouched(finished_run, tmp_path,
                                                                         capsys, monkeypatch):
    out, mine, unfinished = finished_run[0], tmp_path / "mine", copied(finished_run[0], tmp_path)
    (unfinished / "metrics.json").unlink()
    mine.mkdir()
    (mine / "scores.csv").write_text("the user's own scores")
    before = {p: p.read_bytes() for folder in (out, unfinished, mine) for p in folder.iterdir()}
    monkeypatch.setattr(close, "load_dataset", lambda cfg: pytest.fail("the data was read first"))
    for folder, held in ((out, "a finished run: choose"), (mine, "other files: choose another"),
                         (unfinished, f"an unfinished run: --resume {unfinished} goes on, or ")):
        assert f"holds {held}" in error_line(capsys, TINY + ["--out", str(folder)])
    assert before == {p: p.read_bytes() for folder in (out, unfinished, mine)
                      for p in folder.iterdir()}
    (mine / "scores.csv").unlink()  # an empty folder is fine
    assert close.claim_out(close.Config(out=str(mine)), resume=None) == (mine, False)
    names = {close.claim_out(close.Config(**options), None)[0] for options in (
        {}, {"data": "synthetic"}, {"data": "/some/cifar10-jpg"}, {"channels": 8}, {"cells": 1},
        {"epochs": 10}, {"baseline": True})}
    assert len(names) == 7 and close.claim_out(close.Config(data="synthetic", seed=3), None)[0] == (
        Path("runs/close-synthetic-C16x5-250ep-seed3"))


def test_without_nb201_there_is_no_tau_and_the_summary_says_so(tmp_path, capsys):
    code, printed = quietly(TINY + ["--epochs", "1", "--blocks", "1", "--out", str(tmp_path / "r")],
                            capsys)
    assert code == 0 and "kendall_tau" not in printed and "warning" not in printed
    assert "no Kendall tau without the NB201 table (--nb201; README: NB201 ground truth)" in printed
    assert "tracked one-shot " in printed.split("epoch    1/1")[1].splitlines()[0]
    search = json.loads((tmp_path / "r" / "search.json").read_text())
    assert set(search) == {"strategy", "best", "budget", "unique_evaluated"}
    assert set(search["best"]) == {"arch", "oneshot_accuracy", "oneshot_loss"}


def test_the_epoch_line_counts_tracking_in_the_time_left():
    cfg, row = close.Config(epochs=10), {"epoch": 4, "level": 2, "lr": 0.05, "loss": 1.0,
                                          "accuracy": 50.0, "seconds": 10.0, "images_per_s": 5.0,
                                          "gate_spread": None}
    # every 3 epochs and after the last: points after 6, 9, 10 to come, 20 s each
    line = close.epoch_line(cfg, 3, row, [{"epoch": 3, "seconds": 20.0}])
    assert line.endswith("level 2  5 img/s  2.0 min left or more")  # 6 * 10 s + 3 * 20 s
    line = close.epoch_line(cfg, 0, row | {"epoch": 10}, [])
    assert "left" not in line


def finished(folder, seed, baseline, values, curve=(), **options):
    """A finished run by hand: tau, Spearman, P@top5%, the found cell's accuracy, a tau curve."""
    folder.mkdir()
    config = dataclasses.asdict(close.Config(seed=seed, baseline=baseline, **options))
    (folder / "config.json").write_text(json.dumps(config))
    tau, spearman, top5, found = values
    search = {"best": {"arch": "x", "nb201": {"cifar10": {"accuracy": found, "rank": 7}}}}
    ranking = {"n": 200, "kendall_tau": tau, "spearman": spearman, "P@top5%": top5}
    (folder / "metrics.json").write_text(json.dumps({"ranking": ranking, "search": search}))
    if curve:
        close.write(folder / "curve.csv", [[e, 1, 0.05, 40.0, tau, 0.5, 0.1, 1.0] for e, tau in
                                           curve], close.CURVE_FIELDS)
    return str(folder)


def paired_rows(printed):
    """The paired table: {row name: its cells}."""
    lines = printed.split("paired by seed")[1].splitlines()[2:]
    return {line[:16].strip(): line[16:].split() for line in lines if line and line[0] != "("
            and not line.startswith(("not paired", "curves"))}


def test_compare_pairs_vanilla_and_close_runs_by_seed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # compare.png's folder
    vanilla = {0: (0.30, 0.45, 0.1, 93.0), 1: (0.25, 0.40, 0.0, 92.0), 2: (0.40, 0.55, 0.2, 93.5),
               4: (0.2, 0.3, 0.1, 89.0)}
    closenet = {0: (0.35, 0.50, 0.3, 93.2), 1: (0.45, 0.60, 0.3, 92.5), 2: (0.38, 0.52, 0.2, 93.0),
                4: (0.3, 0.4, 0.1, 90.0)}
    # another device, speed option, eval gate, blocks or folder still pairs
    options = {0: {}, 1: {}, 2: {}, 4: {"device": "cuda", "eval_gate": "argmax", "blocks": 3}}
    runs = [finished(tmp_path / f"close-{s}", s, False, v, **options[s]) for s, v in
            closenet.items()]
    runs += [finished(tmp_path / f"vanilla-{s}", s, True, v, **({"threads": 3, "out": "x",
             "images_per_pass": 512} if s == 4 else {})) for s, v in vanilla.items()]
    runs.append(finished(tmp_path / "close-3", 3, False, (0.3, 0.4, 0.1, 90.0)))  # no partner
    runs.append(finished(tmp_path / "vanilla-e9", 0, True, (0.1, 0.2, 0.0, 90.0), epochs=9))
    code, printed = quietly(["--compare", *runs], capsys)
    assert code == 0 and "(4 pairs)" in printed and "fewer than 3" not in printed
    rows = paired_rows(printed)
    c, v = (np.array(list(side.values())) for side in (closenet, vanilla))
    p = scipy.stats.ttest_rel(c, v).pvalue
    for i, name in enumerate(("kendall_tau", "spearman", "P@top5%", "found CIFAR-10")):
        d = (c - v)[:, i]
        assert rows[name] == [f"{x:+.3f}" for x in d] + [
            f"{d.mean():+.3f}", f"{d.std(ddof=1):.3f}", f"{p[i]:.3f}"], name
    assert "not paired: close-3, vanilla-e9 (" in printed
    printed = quietly(["--compare", runs[0], runs[4], runs[1], runs[5]], capsys)[1]
    assert "(2 pairs)" in printed and "fewer than 3 pairs: the mean, sd and p say nothing" in (
        printed)
    printed = quietly(["--compare", runs[0], runs[1], runs[0]], capsys)[1]
    assert printed == "not paired: close-0, close-0, close-1 (a pair is a vanilla and a CLOSE " \
                      "run with --nb201, of one seed and the same other options)\n"
    (tmp_path / "close-0" / "config.json").unlink()
    assert "close-0 is not a finished run" in error_line(capsys, ["--compare", *runs])


def test_compare_gives_tau_paired_at_each_tracked_epoch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    taus = np.random.default_rng(0).uniform(-0.2, 0.8, (3, 2, 4))  # seed, kind, epoch 5 ... 20
    runs = []
    for seed in range(3):
        for kind, name in enumerate(("vanilla", "close")):
            curve = [(5 * (e + 1), taus[seed, kind, e]) for e in range(4 - (seed == kind == 1))]
            runs.append(finished(tmp_path / f"{name}-{seed}", seed, not kind, (0.1,) * 4, curve))
    rows = paired_rows(quietly(["--compare", *runs], capsys)[1])
    taus[1, 1, 3] = np.nan  # seed 1's CLOSE run has no point at epoch 20
    for e, epoch in enumerate((5, 10, 15, 20)):
        d = taus[:, 1, e] - taus[:, 0, e]
        kept = d[~np.isnan(d)]
        p = scipy.stats.ttest_rel(taus[:, 1, e], taus[:, 0, e], nan_policy="omit").pvalue
        assert rows[f"tau, epoch {epoch}"] == ["-" if np.isnan(x) else f"{x:+.3f}" for x in d] + [
            f"{kept.mean():+.3f}", f"{kept.std(ddof=1):.3f}", f"{p:.3f}"], epoch


def test_the_pictures_are_drawn_with_matplotlib(finished_run, tmp_path, capsys, monkeypatch):
    if importlib.util.find_spec("matplotlib") is None:
        assert "--plot needs matplotlib: pip install matplotlib" in error_line(
            capsys, ["--plot", str(finished_run[0])])
        assert "no matplotlib, no ranking.png" in finished_run[1]
        pytest.skip("matplotlib is not installed (it is not in requirements.txt)")
    out = copied(finished_run[0], tmp_path)
    (out / "ranking.png").unlink(missing_ok=True)
    assert quietly(["--plot", str(out)], capsys) == (0, f"{out / 'ranking.png'}\n")
    monkeypatch.chdir(tmp_path)
    runs = [finished(tmp_path / f"{kind}-{s}", s, kind == "vanilla", (0.1,) * 4, [(1, 0.1 * s),
                                                                                (2, 0.2)])
            for s in (0, 1) for kind in ("vanilla", "close")]
    assert f"curves drawn in {tmp_path / 'compare.png'}" in quietly(["--compare", *runs], capsys)[1]
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_progress_line_once_a_minute(capsys, monkeypatch):
    clock = iter([0.0, 20.0, 40.0, 80.0, 100.0, 120.0]).__next__  # at the start, after each item
    monkeypatch.setattr(close, "time", types.SimpleNamespace(monotonic=clock))
    assert list(close.with_progress(range(5), "scoring")) == list(range(5))
    # after item 3 (80 s: over a minute) 3 done at 0.0375/s, 2 left: 53 s; none after the last
    assert capsys.readouterr().out.splitlines() == ["scoring: 3/5  0.04/s  53 s left"]
    assert [close.duration(s) for s in (0.4, 59.4, 60, 150)] == ["0 s", "59 s", "1.0 min",
                                                                 "2.5 min"]


def test_the_command_line_alone_asks_for_nb201_api_slim(monkeypatch, capsys):
    """`python close.py ...` with close.py copied alone (no nb201_api_slim.py beside it): one
    line, exit code 2; a SIGTERM stops a run as Ctrl-C does."""
    import runpy

    monkeypatch.setitem(sys.modules, "nb201_api_slim", None)  # import fails
    monkeypatch.setattr(sys, "argv", ["close.py", "--data", "synthetic", "--nb201", "x.csv"])
    monkeypatch.setattr(signal, "signal", lambda *handler: handlers.append(handler))
    handlers = []
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / "close.py"), run_name="__main__")
    assert exit.value.code == 2 and handlers == [(signal.SIGTERM, signal.default_int_handler)]
    assert capsys.readouterr().err == (
        "close.py: error: --nb201 needs nb201_api_slim.py next to close.py\n")


# nb201_api_slim: a tiny benchmark in each official layout, CSV round trips, errors, the real table
NB201_ARCHS = [BEST_CIFAR10, "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # written by hand
               "|skip_connect~0|+|nor_conv_1x1~0|nor_conv_3x3~1|"
               "+|avg_pool_3x3~0|none~1|skip_connect~2|"]
NB201_ALL = ("cifar10", "cifar100", "ImageNet16-120", "cifar10-valid")
NB201_COLUMNS = NB201_ALL + tuple(f"{d}@12" for d in NB201_ALL)
# the splits each official trial records; the last is the one get_more_info calls 'test'
NB201_SPLITS = {"cifar10": ["ori-test"], "cifar10-valid": ["x-valid", "ori-test"],
                "cifar100": ["ori-test", "x-valid", "x-test"],
                "ImageNet16-120": ["ori-test", "x-valid", "x-test"]}


def nb201_expected(index, dataset, epochs):
    """Made-up mean test accuracy; arch 0 is best except on ImageNet16-120 (arch 2)."""
    bonus = {"cifar10": 5, "cifar100": -30, "ImageNet16-120": -40, "cifar10-valid": 3}[dataset]
    return [70.1234, 50.5, 55.25][index] + bonus + 20 * (dataset == "ImageNet16-120" and
                                                         index == 2) + 8 * (epochs == 200)


def nb201_arch_results(index, epochs, datasets):
    """An ArchResults state dict: per seed (their number varies, as in the real benchmark) a
    ResultsCount with per-epoch metrics '<split>@<epoch>'; other epochs and splits hold other
    numbers, so that reading the wrong key gives a wrong answer."""
    results = {}
    for dataset in datasets:
        seeds = {777: 0.0} if index == 1 else {777: -0.5, 888: 0.25, 999: 0.25}
        for seed, offset in seeds.items():
            accuracy = nb201_expected(index, dataset, epochs) + offset
            splits = NB201_SPLITS[dataset]
            accs = {f"{s}@{e}": accuracy - 30 + e * 0.01 - 2 * (s != splits[-1]) * (
                e == epochs - 1) for s in splits for e in range(epochs)}
            accs[f"{splits[-1]}@{epochs - 1}"] = accuracy
            results[(dataset, seed)] = {"name": dataset, "seed": seed, "epochs": epochs,
                                        "eval_names": splits, "eval_acc1es": accs,
                                        "arch_config": {"arch_str": NB201_ARCHS[index]}}
    return {"arch_index": index, "arch_str": NB201_ARCHS[index], "all_results": results,
            "dataset_seed": {d: [777] if index == 1 else [777, 888, 999] for d in datasets}}


def nb201_per_hp(index, less_key, full_key, less_datasets=NB201_ALL):
    return {less_key: nb201_arch_results(index, 12, less_datasets),
            full_key: nb201_arch_results(index, 200, NB201_ALL)}


def nb201_write_pbz2(obj, path):
    with bz2.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


@pytest.fixture(scope="module")
def nb201_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb201_sources")
    sources = {"pth": root / "NAS-Bench-201-v1_1-096897.pth",
               "pth_v1_0": root / "NAS-Bench-201-v1_0-e61699.pth",
               "pbz2": root / "NATS-tss-v1_0-3ffb9.pickle.pbz2",
               "nats_dir": root / "NATS-tss-v1_0-3ffb9-simple"}
    for key, layout, less in (("pth", "less", NB201_ALL), ("pth_v1_0", "less", ("cifar10-valid",)),
                              ("pbz2", "12", NB201_ALL)):  # v1_0: 12 epochs on cifar10-valid only
        data = {"meta_archs": NB201_ARCHS, "evaluated_indexes": [0, 1, 2], "arch2infos": {
            i: nb201_per_hp(i, layout, "full" if layout == "less" else "200", less)
            for i in range(3)}}
        torch.save(data, sources[key]) if key != "pbz2" else nb201_write_pbz2(data, sources[key])
    sources["nats_dir"].mkdir()
    nb201_write_pbz2({"meta_archs": NB201_ARCHS}, sources["nats_dir"] / "meta.pickle.pbz2")
    for i, name in enumerate(("000000", "000001", "2")):  # both names occur officially
        nb201_write_pbz2(nb201_per_hp(i, "12", "200"), sources["nats_dir"] / f"{name}.pickle.pbz2")
    return sources


def nb201_assert_expected_table(table, columns=NB201_COLUMNS):
    assert table.archs == NB201_ARCHS and table.datasets == columns
    assert list(table) == list(enumerate(NB201_ARCHS))
    for i, column in itertools.product(range(3), columns):
        dataset, _, epochs = column.partition("@")
        assert table.accuracy(i, dataset, int(epochs or 200)) == pytest.approx(
            nb201_expected(i, dataset, int(epochs or 200)), abs=5e-5)


@pytest.mark.parametrize("layout", ["pth", "pbz2", "nats_dir", "pth_v1_0"])
def test_nb201_each_official_layout_gives_mean_test_accuracy(nb201_sources, layout):
    table = nb.load(nb201_sources[layout])
    nb201_assert_expected_table(table, NB201_ALL + ("cifar10-valid@12",) if layout == "pth_v1_0"
                                else NB201_COLUMNS)
    forms = [2, np.int64(2), NB201_ARCHS[2], (1, 2, 3, 4, 0, 1), [1, 2, 3, 4, 0, 1]]
    assert {table.index_of(form) for form in forms} == {2}
    groups = table.group_accuracies(lambda arch: arch.count("none"))  # 0, 6, 2 nones
    assert groups == {0: pytest.approx(nb201_expected(0, "cifar10", 200)),
                      6: pytest.approx(nb201_expected(1, "cifar10", 200)),
                      1: pytest.approx(nb201_expected(2, "cifar10", 200))}
    for bad, message in (((0, 0, 0, 0, 0, 1), "not in this table"), (5, "outside 0..2"),
                         (True, "not an index"), ("|none~0|", "not a NAS-Bench-201 cell")):
        with pytest.raises(ValueError, match=message):
            table.accuracy(bad)
    with pytest.raises(ValueError, match="available: cifar10, cifar100, ImageNet16-120"):
        table.accuracy(0, "cifar10", epochs=100)


def test_nb201_csv_round_trip_never_unpickled_and_the_command_line(nb201_sources, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / "nb201.csv"
    assert nb.main(["convert", str(nb201_sources["nats_dir"]), str(out)]) == 0
    rows = list(csv.DictReader(open(out, newline="")))
    assert list(rows[0]) == ["index", "arch", *NB201_COLUMNS] and rows[0]["cifar10"] == "83.1234"
    capsys.readouterr()
    assert nb.main(["info", str(out)]) == 0 and f"index 2 {NB201_ARCHS[2]}" in [
        line for line in capsys.readouterr().out.splitlines() if "ImageNet16-120 " in line][0]

    def forbidden(*args, **kwargs):
        raise AssertionError("a CSV path reached an unpickler")

    monkeypatch.setattr(nb.pickle, "load", forbidden)
    monkeypatch.setattr(nb, "_torch_load", forbidden)
    nb201_assert_expected_table(nb.load(out))
    nb.load(out).save_csv(tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == out.read_bytes()
    (renamed := tmp_path / "nb201.pth").write_bytes(out.read_bytes())
    with pytest.raises(ValueError, match="looks like the compact CSV"):
        nb.load(renamed)  # a CSV under a pickle name is refused before unpickling
    with pytest.raises(SystemExit):
        nb.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "pickles" in text and "Only load files you trust" in text and "never unpickled" in text


def test_nb201_broken_inputs_fail_with_a_message_naming_the_path(tmp_path):
    good = f"index,arch,cifar10\n0,{NB201_ARCHS[0]},94.1\n"
    cases = {"absent.csv": (None, "no such file"), "g.pth": (b"PK\x03\x04garbage" * 10, ".pth"),
             "g.pickle.pbz2": (b"plain bytes", "bz2"), "t.txt": (good, "unknown format"),
             "h.csv": (good.replace("index", "idx"), "header"), "e.csv": ("", "header"),
             "i.csv": (good.replace("\n0,", "\n1,"), "expected index 0"),
             "v.csv": (good.replace("94.1", "high"), ":2: could not"),
             "d.csv": (good + f"1,{NB201_ARCHS[0]},1\n", "not unique"),
             "empty": ("folder", "meta.pickle.pbz2")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.mkdir() if content == "folder" else content is None or path.write_bytes(
            content if isinstance(content, bytes) else content.encode())
        with pytest.raises(nb.NB201FormatError) as error:
            nb.load(path)
        assert str(path) in str(error.value) and message in str(error.value), name
    partial = tmp_path / "NATS-tss-v1_0-3ffb9-simple"  # an archive file missing: NaN, said
    partial.mkdir()
    nb201_write_pbz2({"meta_archs": NB201_ARCHS}, partial / "meta.pickle.pbz2")
    nb201_write_pbz2(nb201_per_hp(0, "12", "200"), partial / "000000.pickle.pbz2")
    table = nb.load(partial)
    assert np.isnan(table.accuracies()[1]) and table.accuracy(0) == pytest.approx(83.1234)
    with pytest.raises(ValueError, match="no cifar10 result for architecture 1"):
        table.accuracy(1)


def test_nb201_real_csv_known_facts_and_round_trips(tmp_path):
    table = nb.load(shared_file("nb201_test_accuracy.csv"))
    assert len(table) == 15625 and table.datasets == close.NB201_DATASETS
    assert int(np.argmax(table.accuracies("cifar10"))) == 6111 == table.index_of(BEST)
    assert table.arch_string(6111) == BEST_CIFAR10 and table.accuracy(6111) == pytest.approx(
        94.37, abs=0.005)
    # the best test accuracies reported in the NAS-Bench-201 paper
    assert np.max(table.accuracies("cifar100")) == pytest.approx(73.51, abs=0.005)
    assert np.max(table.accuracies("ImageNet16-120")) == pytest.approx(47.31, abs=0.005)
    assert not np.isnan(np.stack([table.accuracies(d) for d in table.datasets])).any()
    assert all(table.index_of(arch) == index == table.index_of(nb.arch_string_to_ops(arch))
               for index, arch in table) and len({arch for _, arch in table}) == 5**6
    table.save_csv(tmp_path / "copy.csv")
    assert (tmp_path / "copy.csv").read_bytes() == shared_file(
        "nb201_test_accuracy.csv").read_bytes()
