"""Slim reader of NAS-Bench-201 ground truth: test accuracy of all 15,625 cells.

Reads, detecting the format from the path:
  * the NAS-Bench-201 files NAS-Bench-201-v1_0-e61699.pth / NAS-Bench-201-v1_1-096897.pth,
  * NATS-Bench's topology space (same 15,625 cells): the archive directory
    NATS-tss-v1_0-3ffb9-simple/ or the single file NATS-tss-v1_0-3ffb9.pickle.pbz2,
  * the compact CSV this module writes: ``index,arch,<column>...``, one row per
    architecture in official index order. Column ``<dataset>`` is the test accuracy (%)
    after the 200-epoch schedule, ``<dataset>@12`` after the 12-epoch one, both averaged
    over seeds (NATS-Bench ``get_more_info(i, dataset, hp, is_random=False)['test-accuracy']``).
    An empty field means the source has no result for that cell.

Getting the data: download an official file (links in the README of github.com/D-X-Y/NATS-Bench),
convert it once with ``python nb201_api_slim.py convert NATS-tss-v1_0-3ffb9-simple nb201.csv``,
then load only the CSV (it needs neither torch nor the official packages).

WARNING: the official files are pickles; loading one runs code from that file, so only
load files you trust. A .csv path is never unpickled.
"""
import argparse
import bz2
import csv
import pickle
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
DATASETS = ("cifar10", "cifar100", "ImageNet16-120", "cifar10-valid")  # column order
FULL_EPOCHS = 200
# The evaluation split the official API reports as 'test-accuracy'. cifar10 (trained on
# train+valid) and cifar10-valid (trained on train only) are both tested on the original
# CIFAR-10 test set. For cifar100 / ImageNet16-120, 'ori-test' is valid+test merged and
# the test half alone is 'x-test'.
TEST_SPLIT = {"cifar10": "ori-test", "cifar10-valid": "ori-test",
              "cifar100": "x-test", "ImageNet16-120": "x-test"}
# NAS-Bench-201 .pth files name the two schedules 'less'/'full'; NATS-Bench uses '12'/'200'.
HP_EPOCHS = {"less": 12, "full": 200}
PICKLE_WARNING = ("WARNING: the official .pth / .pickle.pbz2 files are pickles; loading one runs "
                  "code from that file. Only load files you trust. A .csv path is never unpickled.")
_COLUMN_NAME = re.compile(r"[A-Za-z0-9_.-]+(@[0-9]+)?")
# Node 1 | node 2 | node 3; "op~j" is the edge from node j, so the ops appear in edge order.
_ARCH_TEMPLATE = "|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|"
_OP_GROUP = "(" + "|".join(map(re.escape, OPS)) + ")"
_ARCH_PATTERN = re.compile(re.escape(_ARCH_TEMPLATE).replace(re.escape("{}"), _OP_GROUP))


class NB201FormatError(ValueError):
    """A benchmark path that is missing, corrupt or not laid out as expected."""


def ops_to_arch_string(ops):
    """(op index per edge 0->1, 0->2, 1->2, 0->3, 1->3, 2->3) -> official arch string."""
    ops = tuple(ops)
    if len(ops) != 6 or not all(isinstance(op, (int, np.integer)) and not isinstance(op, bool)
                                and 0 <= op < len(OPS) for op in ops):
        raise ValueError(f"architecture {ops!r} is not 6 op indices in 0..{len(OPS) - 1}")
    return _ARCH_TEMPLATE.format(*(OPS[op] for op in ops))


def arch_string_to_ops(arch):
    """Official arch string -> tuple of 6 op indices; ValueError naming a malformed one."""
    match = _ARCH_PATTERN.fullmatch(arch) if isinstance(arch, str) else None
    if match is None:
        raise ValueError(f"architecture {arch!r} is not a NAS-Bench-201 cell string "
                         f"like '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|' with ops from {OPS}")
    return tuple(OPS.index(op) for op in match.groups())


def column_name(dataset, epochs=FULL_EPOCHS):
    """Column holding `dataset` after `epochs`; a name from NB201.datasets passes through."""
    if epochs == FULL_EPOCHS:
        return dataset
    return f"{dataset}@{epochs}"


class NB201:
    """Test accuracies of NAS-Bench-201 cells, one numpy column per (dataset, epochs)."""

    def __init__(self, archs, columns, source=""):
        self.archs = list(archs)
        self.source = str(source)
        self._index = {arch: i for i, arch in enumerate(self.archs)}
        if len(self._index) != len(self.archs):
            raise ValueError(f"{self.source}: architecture strings are not unique")
        self._columns = {name: np.asarray(values, dtype=float) for name, values in columns.items()}
        self.datasets = tuple(self._columns)

    def __len__(self):
        return len(self.archs)

    def __iter__(self):
        return iter(enumerate(self.archs))

    def __repr__(self):
        return f"NB201({len(self)} archs, datasets={self.datasets}, source={self.source!r})"

    def arch_string(self, index):
        return self.archs[self.index_of(index)]

    def index_of(self, arch):
        """Index of `arch`: an index, an arch string, or a tuple/list of 6 op indices."""
        if isinstance(arch, (int, np.integer)) and not isinstance(arch, bool):
            if 0 <= arch < len(self):
                return int(arch)
            raise ValueError(f"architecture index {arch} is outside 0..{len(self) - 1}")
        if isinstance(arch, str):
            if arch in self._index:
                return self._index[arch]
            arch_string_to_ops(arch)  # raises for a malformed string
            key = arch
        elif isinstance(arch, (tuple, list, np.ndarray)):
            key = ops_to_arch_string(arch)
        else:
            raise ValueError(f"architecture {arch!r} is not an index, string or 6-tuple of ops")
        if key not in self._index:
            raise ValueError(f"architecture {arch!r} is not in this table ({self.source})")
        return self._index[key]

    def accuracies(self, dataset="cifar10", epochs=FULL_EPOCHS):
        """Copy of one column in index order (NaN where the source has no result)."""
        return self._column(dataset, epochs).copy()

    def accuracy(self, arch, dataset="cifar10", epochs=FULL_EPOCHS):
        """Test accuracy in % of `arch`, mean over seeds."""
        values = self._column(dataset, epochs)
        index = self.index_of(arch)
        if np.isnan(values[index]):
            raise ValueError(f"{self.source} has no {column_name(dataset, epochs)} result "
                             f"for architecture {index} {self.archs[index]}")
        return float(values[index])

    def group_accuracies(self, key, dataset="cifar10", epochs=FULL_EPOCHS):
        """{key(arch string): mean accuracy over the archs sharing that key}; skips missing results."""
        values = self._column(dataset, epochs)
        groups = defaultdict(list)
        for index, arch in enumerate(self.archs):
            if not np.isnan(values[index]):
                groups[key(arch)].append(values[index])
        return {group: float(np.mean(accs)) for group, accs in groups.items()}

    def save_csv(self, path):
        """Write the compact CSV (4 decimals, empty field for a missing result)."""
        columns = [self._columns[name] for name in self.datasets]
        with open(path, "w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)  # default dialect: RFC 4180, '\r\n' line ends
            writer.writerow(["index", "arch", *self.datasets])
            for index, arch in enumerate(self.archs):
                writer.writerow([index, arch, *("" if np.isnan(column[index]) else f"{column[index]:.4f}"
                                                for column in columns)])

    def _column(self, dataset, epochs):
        name = column_name(dataset, epochs)
        if name not in self._columns:
            raise ValueError(f"no column {name!r} (dataset={dataset!r}, epochs={epochs!r}) in {self.source}; "
                             f"available: {', '.join(self.datasets)} ('<dataset>@<epochs>' for "
                             f"other than {FULL_EPOCHS} epochs)")
        return self._columns[name]


def load(path):
    """Read a .csv, .pth, .pickle.pbz2 or NATS archive directory into an NB201 table."""
    path = Path(path)
    if path.is_dir():
        return _load_nats_directory(path)
    if not path.is_file():
        raise NB201FormatError(f"{path}: no such file or directory (expected a NAS-Bench-201 "
                               f".csv, .pth, .pickle.pbz2 or NATS-tss-*-simple directory)")
    name = path.name.lower()
    if name.endswith(".csv"):
        return _load_csv(path)
    if name.endswith((".pth", ".pbz2", ".pickle", ".pkl")):
        _refuse_csv_content(path)
    if name.endswith(".pth"):
        return _table_from_benchmark(_torch_load(path), path)
    if name.endswith(".pbz2"):
        return _table_from_benchmark(_unpickle(path, bz2.open, "a bz2-compressed pickle"), path)
    if name.endswith((".pickle", ".pkl")):
        return _table_from_benchmark(_unpickle(path, open, "a pickle"), path)
    raise NB201FormatError(f"{path}: unknown format; expected a .csv, a NAS-Bench-201 .pth, a "
                           f"NATS-Bench .pickle.pbz2 file or a NATS-tss-*-simple directory")


def _refuse_csv_content(path):
    # A renamed CSV would otherwise reach the unpickler; say what it is instead.
    with open(path, "rb") as f:
        if f.read(10) == b"index,arch":
            raise NB201FormatError(f"{path}: looks like the compact CSV; name it *.csv "
                                   f"(CSV files are never unpickled)")


def _unpickle(path, opener, what):
    try:
        with opener(path, "rb") as f:
            return pickle.load(f)
    except Exception as exc:  # garbage raises UnpicklingError, OSError, EOFError, ... alike
        raise NB201FormatError(f"{path}: cannot read as {what} ({type(exc).__name__}: {exc})") from exc


def _torch_load(path):
    try:
        import torch  # only here: the CSV and NATS paths must work without torch
    except ImportError as exc:
        raise NB201FormatError(f"{path}: reading a .pth file needs torch (pip install torch)") from exc
    try:
        # weights_only=False: these are general pickles of the API's nested result dicts, written
        # before torch's restricted loader existed, which may refuse some of their contents.
        # This runs code from the file - the reason for the trusted-files warning.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise NB201FormatError(f"{path}: cannot read as a NAS-Bench-201 .pth file "
                               f"({type(exc).__name__}: {exc})") from exc


def _require_keys(data, keys, path):
    if not isinstance(data, dict) or not all(key in data for key in keys):
        found = sorted(map(str, data))[:8] if isinstance(data, dict) else type(data).__name__
        raise NB201FormatError(f"{path}: expected a dict with keys {list(keys)}, found {found}")


def _check_archs(meta_archs, path):
    if not isinstance(meta_archs, (list, tuple)) or not meta_archs:
        raise NB201FormatError(f"{path}: 'meta_archs' should be a non-empty list of arch strings")
    for index, arch in enumerate(meta_archs):
        try:
            arch_string_to_ops(arch)
        except ValueError as exc:  # e.g. NATS-Bench's size space, which this module does not read
            raise NB201FormatError(f"{path}: meta_archs[{index}]: {exc}") from exc
    return list(meta_archs)


def _mean_test_accuracy(all_results, dataset, seeds):
    """Mean over seeds of the test split's accuracy after the last epoch (API's iepoch=None)."""
    accs = []
    for seed in seeds:
        trial = all_results[(dataset, seed)]
        last_epoch = trial["epochs"] - 1
        accs.append(float(trial["eval_acc1es"][f"{TEST_SPLIT[dataset]}@{last_epoch}"]))
    return sum(accs) / len(accs)


def _add_arch_results(columns, index, per_hp, n_archs, where):
    """Put one architecture's {hp: ArchResults state dict} into columns[(dataset, epochs)]."""
    try:
        if not 0 <= index < n_archs:
            raise ValueError(f"index outside 0..{n_archs - 1}")
        for hp_key, arch_results in per_hp.items():
            epochs = HP_EPOCHS.get(hp_key) or int(hp_key)
            for dataset, seeds in arch_results["dataset_seed"].items():
                if dataset in TEST_SPLIT and seeds:
                    column = columns.setdefault((dataset, epochs), np.full(n_archs, np.nan))
                    column[index] = _mean_test_accuracy(arch_results["all_results"], dataset, seeds)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        raise NB201FormatError(
            f"{where}: architecture {index!r}: unexpected layout ({type(exc).__name__}: {exc}); expected "
            f"{{hp: {{'dataset_seed': {{dataset: [seeds]}}, 'all_results': {{(dataset, seed): "
            f"{{'epochs': E, 'eval_acc1es': {{'<split>@<epoch>': acc}}}}}}}}}}") from exc


def _ordered_columns(columns):
    """{(dataset, epochs): values} -> {column name: values}, 200 epochs first, DATASETS order."""
    order = sorted(columns, key=lambda key: (key[1] != FULL_EPOCHS, -key[1], DATASETS.index(key[0])))
    return {column_name(dataset, epochs): columns[(dataset, epochs)] for dataset, epochs in order}


def _table_from_benchmark(data, path):
    """The single-file layout (.pth and .pickle.pbz2): meta_archs + arch2infos[index][hp]."""
    _require_keys(data, ("meta_archs", "arch2infos", "evaluated_indexes"), path)
    archs = _check_archs(data["meta_archs"], path)
    columns = {}
    for index, per_hp in data["arch2infos"].items():
        _add_arch_results(columns, index, per_hp, len(archs), path)
    if not columns:
        raise NB201FormatError(f"{path}: no test accuracies found in 'arch2infos'")
    return NB201(archs, _ordered_columns(columns), source=path)


def _load_nats_directory(path):
    """NATS archive directory: meta.pickle.pbz2 + one <index>.pickle.pbz2 per architecture."""
    meta_path = path / "meta.pickle.pbz2"
    if not meta_path.is_file():
        raise NB201FormatError(f"{path}: not a NATS-Bench archive directory; expected meta.pickle.pbz2 "
                               f"and 000000.pickle.pbz2, 000001.pickle.pbz2, ... inside")
    meta = _unpickle(meta_path, bz2.open, "a bz2-compressed pickle")
    _require_keys(meta, ("meta_archs",), meta_path)
    archs = _check_archs(meta["meta_archs"], meta_path)
    columns = {}
    for index in range(len(archs)):
        # The official reader tries the zero-padded name first, then the plain one.
        for arch_file in (path / f"{index:06d}.pickle.pbz2", path / f"{index}.pickle.pbz2"):
            if arch_file.is_file():
                per_hp = _unpickle(arch_file, bz2.open, "a bz2-compressed pickle")
                _add_arch_results(columns, index, per_hp, len(archs), arch_file)
                break
    if not columns:
        raise NB201FormatError(f"{path}: no per-architecture results (expected 000000.pickle.pbz2 .. "
                               f"{len(archs) - 1:06d}.pickle.pbz2 next to meta.pickle.pbz2)")
    return NB201(archs, _ordered_columns(columns), source=path)


def _load_csv(path):
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            names = _check_csv_header(next(rows, None), path)
            archs, values = [], []
            for line_no, row in enumerate(rows, start=2):
                if row:  # tolerate blank lines
                    arch, accs = _parse_csv_row(row, len(archs), len(names), f"{path}:{line_no}")
                    archs.append(arch)
                    values.append(accs)
        if not archs:
            raise ValueError("no architecture rows")
        columns = dict(zip(names, np.array(values, dtype=float).T))
        return NB201(archs, columns, source=path)
    except NB201FormatError:
        raise
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise NB201FormatError(f"{path}: not a valid NAS-Bench-201 compact CSV ({exc})") from exc


def _check_csv_header(header, path):
    names = header[2:] if header else []
    if (not header or header[:2] != ["index", "arch"] or not names or len(set(names)) != len(names)
            or not all(_COLUMN_NAME.fullmatch(name) for name in names)):
        raise NB201FormatError(f"{path}: header {header!r} is not 'index,arch,<dataset>[@<epochs>],...' "
                               f"(e.g. 'index,arch,cifar10,cifar100,ImageNet16-120')")
    return names


def _parse_csv_row(row, expected_index, n_columns, where):
    """-> (arch string, accuracies with NaN for empty fields); errors name path:line."""
    if len(row) != 2 + n_columns or row[0] != str(expected_index):
        raise NB201FormatError(f"{where}: expected index {expected_index}, an arch and "
                               f"{n_columns} accuracies, found {row[:3]!r}...")
    try:
        arch_string_to_ops(row[1])
        return row[1], [float(x) if x else np.nan for x in row[2:]]
    except ValueError as exc:
        raise NB201FormatError(f"{where}: {exc}") from exc


def _print_info(table):
    print(f"{table.source}: {len(table)} architectures; columns: {', '.join(table.datasets)}")
    for name in table.datasets:
        values = table.accuracies(name)
        known = int(np.sum(~np.isnan(values)))
        if known == 0:
            print(f"  {name:<18} no results")
            continue
        best = int(np.nanargmax(values))
        print(f"  {name:<18} best {values[best]:.4f}% index {best} {table.archs[best]} "
              f"({known} with results)")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="nb201_api_slim.py", epilog=PICKLE_WARNING,
        description="Read NAS-Bench-201 / NATS-Bench (topology) test accuracies; convert them to a compact CSV.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", epilog=PICKLE_WARNING,
                                  help="official file or directory (or CSV) -> compact CSV")
    convert.add_argument("source", help=".pth, .pickle.pbz2, NATS-tss-*-simple directory or .csv")
    convert.add_argument("out", help="CSV to write (all datasets the source holds)")
    info = commands.add_parser("info", epilog=PICKLE_WARNING,
                               help="number of archs, datasets and the best arch per dataset")
    info.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "convert" and not args.out.lower().endswith(".csv"):
        parser.error(f"OUT must end in .csv (the loader detects the format by name): {args.out}")
    try:
        table = load(args.source if args.command == "convert" else args.path)
    except NB201FormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "convert":
        table.save_csv(args.out)
        print(f"wrote {args.out}: {len(table)} architectures, columns {', '.join(table.datasets)}")
    else:
        _print_info(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
