"""Study-level fault injection (issue 22): faults must not change an answer.

* a kill (just before or just after) or a full disk at *every* file operation of a scheme save, of
  Table 4's files and of the report: each file is the old one or the new one, never half; nothing is
  left behind; a failed save raises an error that names the scheme; writing again gives the same files;
* kills at random points of an attribution job, then a resume: the scheme of an uninterrupted run, bit for bit;
* truncated or damaged scheme files (JSON, safetensors) and run files (``table4.csv``, ``config.json``):
  an error naming the file, never a number;
* two writers on one output (a scheme path, a run folder): the second is refused at once.

The faults are injected by :class:`Faults`, which counts the file operations (open for writing, write,
fsync, replace, unlink) of the code under test and fails the k-th.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from test_schemes import A, B, assert_same_scheme, make_attributions
from test_scorecard import fixture_run  # noqa: F401 (fixture)
from test_stability import _fake_estimate_seen, assert_bit_identical, collection, model_dir, tiny  # noqa: F401

from fastnig.common import CorruptFile, OutputLocked, exclusive_lock
from fastnig.evaluation.table4 import CSV_COLUMNS, PruningTable
from fastnig.neurons.scheme import Scheme
from fastnig.report.run_folder import RUN_LOCK, NotARunFolder, read_csv, read_run_config, run_lock

REPO = Path(__file__).resolve().parents[1]
SIZES = {A: 4, B: 6}


# ------------------------------------------------------------------ injector
class Faults:
    """Count the file operations of the code under test; with :meth:`at`, fail the k-th one.

    ``when="before"``: the operation does not happen (a kill just before it, or a disk that refuses it);
    ``"after"``: it happens, then the fault strikes (a kill just after it).
    """

    def __init__(self, monkeypatch):
        self.monkeypatch, self.ops = monkeypatch, []
        self.fail_at, self.error, self.when = None, None, "before"

    def _op(self, name, do):
        k = len(self.ops)
        self.ops.append(name)
        if k == self.fail_at and self.when == "before":
            raise self.error()
        result = do()
        if k == self.fail_at:
            raise self.error()
        return result

    @contextlib.contextmanager
    def at(self, k=None, error=None, when="before"):
        """Count (and with ``k``, fail the k-th of) the operations run inside the block."""
        self.ops, self.fail_at, self.error, self.when = [], k, error, when
        real_open, real_replace, real_fsync, real_unlink = builtins.open, os.replace, os.fsync, os.unlink
        faults = self

        class Writer:
            def __init__(self, f):
                self._f = f

            def write(self, data):
                return faults._op("write", lambda: self._f.write(data))

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def fake_open(file, mode="r", *args, **kwargs):
            if not any(c in mode for c in "wax+"):
                return real_open(file, mode, *args, **kwargs)
            return Writer(self._op("open", lambda: real_open(file, mode, *args, **kwargs)))

        with self.monkeypatch.context() as m:
            m.setattr(builtins, "open", fake_open)
            m.setattr(os, "replace", lambda src, dst: self._op("replace", lambda: real_replace(src, dst)))
            m.setattr(os, "fsync", lambda fd: self._op("fsync", lambda: real_fsync(fd)))
            m.setattr(os, "unlink", lambda path, *a, **k: self._op("unlink", lambda: real_unlink(path, *a, **k)))
            yield self


def disk_full():
    return OSError(errno.ENOSPC, "No space left on device")


FAULTS = {"disk full": (disk_full, "before"), "kill before": (KeyboardInterrupt, "before"),
          "kill after": (KeyboardInterrupt, "after")}


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch)


def listing(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------- scheme saves
def _scheme(num: int) -> Scheme:
    scheme = Scheme.empty(SIZES, {"model": "tiny", "dataset": "ms", "label": "relevant"})
    gen = torch.Generator().manual_seed(num)
    values = torch.randn(num, 10, generator=gen)
    return scheme.add(make_attributions({A: values[:, :4], B: values[:, 4:]}), [f"q{i % 3}\td{i}" for i in range(num)])


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_at_any_step_of_a_scheme_save_leaves_the_previous_scheme(tmp_path, faults, fault):
    """Tensor file, its fsync and rename, the JSON temp file, its fsync, the commit, the folder's fsync,
    deleting the old tensor file: a full disk or a kill at each."""
    error, when = FAULTS[fault]
    previous, new = _scheme(3), _scheme(4)
    previous.save(tmp_path / "count" / "P_ms")
    with faults.at():
        new.save(tmp_path / "count" / "P_ms")
    steps = list(faults.ops)
    assert steps.count("open") == 2 and "replace" in steps and "unlink" in steps, steps
    for k, step in enumerate(steps):
        folder = tmp_path / str(k)
        previous.save(folder / "P_ms")
        before = listing(folder)
        raised = None
        with faults.at(k, error, when):
            try:
                new.save(folder / "P_ms")
            except (OSError, KeyboardInterrupt) as exc:
                raised = exc
        loaded = Scheme.load(folder / "P_ms")  # never a mix, never unreadable
        committed = loaded.count == new.count
        assert_same_scheme(loaded, new if committed else previous)
        where = f"step {k} ({step}, {fault})"
        if fault == "disk full":
            if raised is not None:
                assert raised.errno == errno.ENOSPC and str(folder / "P_ms.json") in str(raised), where
                assert not committed and listing(folder) == before, where  # nothing of the save is left
            else:  # only what follows the commit may fail silently: the folder's fsync, deleting the old file
                assert committed and step in ("fsync", "unlink") and k >= steps.index("replace", 4), where
        elif not committed:
            assert isinstance(raised, KeyboardInterrupt) and listing(folder) == before, where
        # the next save commits and leaves exactly the scheme's two files
        new.save(folder / "P_ms")
        assert len(listing(folder)) == 2, where
        assert_same_scheme(Scheme.load(folder / "P_ms"), new)


def test_a_failed_save_of_a_new_scheme_leaves_no_file(tmp_path, faults):
    with faults.at(0, disk_full):
        with pytest.raises(OSError, match="could not save scheme.*No space left.*P_ms.json"):
            _scheme(3).save(tmp_path / "P_ms")
    assert list(tmp_path.iterdir()) == [] and not Scheme.exists(tmp_path / "P_ms")


# ------------------------------------------------------ Table 4 and the report
def _row(set_name, level, dataset, drop):
    row = {c: 0 for c in CSV_COLUMNS}
    row.update({"set": set_name, "level_percent": level, "dataset": dataset, "group": "TREC-DL", "num_neurons": 21,
                "num_queries": 43, "num_candidates": 900, "ndcg_original": 0.7, "ndcg_pruned": 0.7 - drop / 100,
                "drop_percent": drop, "p_value": 0.03, "significant": True, "random_repetitions": 50,
                "random_ndcg_mean": 0.69, "random_drop_mean": 0.4, "random_drop_std": 0.1, "random_significant": 3})
    return row


OLD_TABLE = PruningTable([_row("P_ms", 1.0, "dl19", 1.25), _row("F_A", 1.0, "dl19", 2.5)])
NEW_TABLE = PruningTable([_row("P_ms", 1.0, "dl19", 3.125), _row("F_A", 1.0, "dl19", 0.75),
                          _row("P_ms", 1.0, "dl20", 1.5), _row("F_A", 1.0, "dl20", 4.0)])


def _sweep_writes(tmp_path, faults, fault, write_old, write_new, names):
    """Every file operation of ``write_new`` (into a folder ``write_old`` filled) failed once: each file in
    ``names`` is then the old one or the new one, no temp file is left, and writing again gives the new."""
    error, when = FAULTS[fault]

    def contents(folder):  # (the report names its folder)
        return {n: (folder / n).read_bytes().replace(str(folder).encode(), b"<folder>") for n in names}

    reference = tmp_path / "reference"
    write_old(reference)
    write_new(reference)
    new = contents(reference)
    with faults.at():
        write_new(reference)
    steps = list(faults.ops)
    for k, step in enumerate(steps):
        folder = tmp_path / str(k)
        write_old(folder)
        old = contents(folder)
        assert old != new
        with faults.at(k, error, when):
            with pytest.raises((OSError, KeyboardInterrupt)) as info:
                write_new(folder)
        where = f"step {k} ({step}, {fault})"
        if isinstance(info.value, OSError):
            assert info.value.errno == errno.ENOSPC and any(n in str(info.value) for n in names), where
        now = contents(folder)
        for n in names:
            assert now[n] in (old[n], new[n]), f"{n} is half-written after {where}"
        left = [p.name for p in folder.rglob(".*")]
        assert not left, f"{left} left after {where}"
        write_new(folder)
        assert contents(folder) == new, where


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_while_writing_table4_leaves_old_or_new_files(tmp_path, faults, fault):
    names = ("table4.csv", "table4.md", "table4.tex")
    _sweep_writes(tmp_path, faults, fault, OLD_TABLE.write, NEW_TABLE.write, names)
    assert PruningTable.from_csv(tmp_path / "reference" / "table4.csv").rows == NEW_TABLE.rows


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_while_writing_the_report_leaves_old_or_new_files(tmp_path, faults, fault, fixture_run):  # noqa: F811
    from fastnig.report.document import write_report

    settings = json.loads((fixture_run / "config.json").read_text())

    def copy_of_run(folder):
        if not folder.exists():
            shutil.copytree(fixture_run, folder)

    def old(folder):
        copy_of_run(folder)
        write_report(folder, settings, {"attribution_s": 1.0}, {})

    def new(folder):
        write_report(folder, settings, {"attribution_s": 2.0}, {})

    _sweep_writes(tmp_path, faults, fault, old, new, ("report.md", "report.html", "scorecard.md", "scorecard.csv"))


def test_write_atomic_names_the_file_when_the_disk_is_full(tmp_path, faults):
    from fastnig.common import write_atomic

    write_atomic(tmp_path / "a.json", "old")
    with faults.at(1, disk_full):
        with pytest.raises(OSError, match=r"could not write the file \(No space left.*a\.json"):
            write_atomic(tmp_path / "a.json", "new")
    assert (tmp_path / "a.json").read_text() == "old" and listing(tmp_path).keys() == {"a.json"}
    # the temp file of a writer that was killed (SIGKILL: no clean-up) is removed by the next write
    (tmp_path / ".a.json.tmp999999999").write_text("half")
    write_atomic(tmp_path / "a.json", "new")
    assert listing(tmp_path) == {"a.json": b"new"}


# ----------------------------------------------------- attribution kill/resume
def _attribute(model, tokenizer, collection, out, **kw):  # noqa: F811
    from fastnig.engine.settings import AttributionSettings
    from fastnig.study.attribution_job import attribute_dataset

    kw = {"label": "relevant", "settings": AttributionSettings(steps=4, max_length=48), "chunk_pairs": 2,
          "progress": False, "num_pairs": 24, "stop_when": {"level": 1, "overlap": 0.9, "first_round": 4}, **kw}
    return attribute_dataset(model, tokenizer, collection, out=out, **kw)


@pytest.mark.slow
def test_attribution_killed_at_random_points_resumes_to_the_uninterrupted_scheme(tmp_path, tiny, collection,  # noqa: F811
                                                                                  faults, monkeypatch):
    """Kills at seeded random file operations of a job with the agreement filter and early-stopping rounds
    (each save, each check): the resumed scheme is the uninterrupted one, bit for bit, and its folder holds
    the scheme's two files and its lock."""
    import fastnig.neurons.stability as stab

    monkeypatch.setattr(stab, "stability", _fake_estimate_seen(8))  # stops at 16 (8 and 16 pass)
    whole = _attribute(*tiny, collection, tmp_path / "whole" / "P")  # (also fills the data caches once)
    with faults.at():
        _attribute(*tiny, collection, tmp_path / "count" / "P")
    steps = len(faults.ops)
    assert whole.extra["stopping"]["pairs_sampled"] == 16 and whole.num_dropped > 0
    rng = random.Random(22)
    for k in sorted(rng.sample(range(steps), 4)):
        when = rng.choice(["before", "after"])
        out = tmp_path / f"{k}-{when}" / "P"
        with faults.at(k, KeyboardInterrupt, when):
            with pytest.raises(KeyboardInterrupt):
                _attribute(*tiny, collection, out)
        resumed = _attribute(*tiny, collection, out)
        assert_bit_identical(resumed, whole)
        assert resumed.extra == whole.extra, (k, when)
        assert sorted(p.name for p in out.parent.iterdir() if not p.name.endswith(".safetensors")) == [
            ".P.lock", "P.json"], (k, when)


# --------------------------------------------------------------- damaged files
def test_a_truncated_scheme_json_is_refused_naming_it(tmp_path):
    path = _scheme(5).save(tmp_path / "P_ms")
    text = path.read_bytes()
    for cut in range(0, len(text.rstrip()), 7):
        path.write_bytes(text[:cut])
        with pytest.raises(ValueError, match=str(path)):
            Scheme.load(path)
    path.write_bytes(b"\x00\xff" * 40)  # not even text
    with pytest.raises(CorruptFile, match=str(path)):
        Scheme.load(path)


def test_a_truncated_or_damaged_tensor_file_is_refused_naming_it(tmp_path):
    scheme = _scheme(5)
    path = scheme.save(tmp_path / "P_ms")
    tensor_file = next(tmp_path.glob("P_ms.*.safetensors"))
    data = tensor_file.read_bytes()
    for cut in list(range(0, len(data), 11)) + [len(data) - 1]:
        tensor_file.write_bytes(data[:cut])
        with pytest.raises(CorruptFile, match=str(tensor_file)):
            Scheme.load(path)
    for i in sorted(random.Random(5).sample(range(len(data)), 150)):  # one byte changed anywhere
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        tensor_file.write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match=f"{tensor_file}|{tensor_file.name}"):
            Scheme.load(path)
    tensor_file.write_bytes(data)
    assert_same_scheme(Scheme.load(path), scheme)


def test_a_scheme_json_that_lacks_a_field_is_refused_naming_it(tmp_path):
    path = _scheme(5).save(tmp_path / "P_ms")
    meta = json.loads(path.read_text())
    for key in ("sizes", "pair_ids", "model", "tensors", "token"):
        path.write_text(json.dumps({k: v for k, v in meta.items() if k != key}))
        with pytest.raises(ValueError, match=str(path)):
            Scheme.load(path)
    path.write_text(json.dumps({**meta, "pair_ids": meta["pair_ids"][:-1]}))  # one id lost
    with pytest.raises(CorruptFile, match=str(path)):
        Scheme.load(path)


def test_a_truncated_or_damaged_table4_csv_is_refused_naming_it(tmp_path):
    path = NEW_TABLE.to_csv(tmp_path / "table4.csv")
    data = path.read_bytes()
    line_ends = {i + 1 for i, b in enumerate(data) if b == ord("\n")}
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        if cut in line_ends:  # a cut at a line end is a shorter, intact table (fastnig's writes are atomic)
            assert PruningTable.from_csv(path).rows == NEW_TABLE.rows[:len(read_csv(path))]
            continue
        for read in (PruningTable.from_csv, read_csv):
            with pytest.raises(CorruptFile, match=str(path)):
                read(path)
    text = data.decode()
    for bad in (text.replace("3.125", "3.1x5"), text.replace(",True,", ",Tru,", 1),
                text.replace("0.03,", "0.03,,", 1), text.replace(",43,", ",", 1)):
        path.write_text(bad, newline="")
        for read in (PruningTable.from_csv, read_csv):
            with pytest.raises(CorruptFile, match=rf"{path}, line \d"):
                read(path)


def test_a_damaged_run_folder_is_refused_by_the_report_naming_the_file(fixture_run):  # noqa: F811
    from fastnig.report.comparison import compare_runs
    from fastnig.report.document import write_report

    settings = json.loads((fixture_run / "config.json").read_text())
    table = fixture_run / "pruning" / "table4.csv"
    table.write_bytes(table.read_bytes()[:-5])
    with pytest.raises(CorruptFile, match=str(table)):
        write_report(fixture_run, settings, {}, {})
    with pytest.raises(CorruptFile, match=str(table)):
        compare_runs(fixture_run, fixture_run)
    config = fixture_run / "config.json"
    text = config.read_text()
    for cut in (0, 1, len(text) // 2, len(text.rstrip()) - 1):
        config.write_text(text[:cut])
        with pytest.raises(NotARunFolder, match=str(config)):
            read_run_config(fixture_run)
    config.write_text(json.dumps({"attribution": "x"}))
    with pytest.raises(NotARunFolder, match=str(config)):
        read_run_config(fixture_run)


# ------------------------------------------------------------- two writers
def test_a_second_holder_of_a_lock_is_refused_at_once(tmp_path):
    lock = tmp_path / "out" / ".lock"
    holding, release, errors = threading.Event(), threading.Event(), []

    def hold():
        try:
            with exclusive_lock(lock, "output out"):
                holding.set()
                release.wait(30)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            holding.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(30)
        started = time.perf_counter()
        with pytest.raises(OutputLocked, match=rf"output out is being written by another fastnig job \(pid "
                                               rf"{os.getpid()}, lock {lock}\)"):
            with exclusive_lock(lock, "output out"):
                pass
        assert time.perf_counter() - started < 1  # refused, not made to wait
    finally:
        release.set()
        thread.join()
    assert not errors
    with exclusive_lock(lock, "output out"):  # free again once the holder is done
        pass


HOLDER = textwrap.dedent("""
    import sys, time
    from fastnig.common import exclusive_lock
    with exclusive_lock(sys.argv[1], "run folder"):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.mark.slow
def test_a_lock_of_another_process_refuses_and_a_killed_holder_leaves_none(tmp_path):
    lock = tmp_path / RUN_LOCK
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=f"pid {child.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        child.send_signal(signal.SIGKILL)  # dies holding it: no stale lock
        child.wait(30)
    with run_lock(tmp_path):
        pass


def test_two_jobs_on_one_scheme_path_the_second_is_refused(tmp_path, tiny, collection, monkeypatch):  # noqa: F811
    import fastnig.study.attribution_job as job

    out = tmp_path / "P"
    inside, go_on, results = threading.Event(), threading.Event(), []
    real = job.attribute

    def held_open(*args, **kwargs):  # the first job waits inside its first chunk, holding the lock
        inside.set()
        assert go_on.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "attribute", held_open)
    first = threading.Thread(target=lambda: results.append(
        _attribute(*tiny, collection, out, num_pairs=4, stop_when=None, agreement_filter=False)))
    first.start()
    try:
        assert inside.wait(60)
        with pytest.raises(OutputLocked, match=f"scheme {out}.json is being written by another fastnig job"):
            _attribute(*tiny, collection, out, num_pairs=4, stop_when=None, agreement_filter=False)
    finally:
        go_on.set()
        first.join()
    assert len(results) == 1 and results[0].count == 4
    monkeypatch.undo()
    again = _attribute(*tiny, collection, out, num_pairs=4, stop_when=None, agreement_filter=False)  # lock freed
    assert again.pair_ids == results[0].pair_ids


def test_a_second_run_on_one_run_folder_is_refused(tmp_path, model_dir, monkeypatch):  # noqa: F811
    import fastnig.study.pipeline as pipeline
    from fastnig.study.config import load_config

    def no_lock_taken(*args, **kwargs):
        raise RuntimeError("run_study went on to the attribution stage with the run folder locked by another run")

    monkeypatch.setattr(pipeline, "stage_attribution", no_lock_taken)
    cfg = load_config({"name": "tiny", "model": str(model_dir), "output": str(tmp_path / "run"),
                       "attribution": {"datasets": {"cran": "cranfield"}, "pairs": 2, "steps": 2, "max_length": 32}})
    with run_lock(tmp_path / "run"):
        with pytest.raises(OutputLocked, match=f"run folder {tmp_path / 'run'} is being written by another"):
            pipeline.run_study(cfg, progress=False)
    assert not (tmp_path / "run" / "config.json").exists()  # refused before it writes anything
