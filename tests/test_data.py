"""fastnig.data on real collections, offline.

Cranfield and MEDLINE are the collections packaged with fastnig
(``fastnig/data/collections``): their archives are checked against
``checksums.json`` and ir_datasets' pinned md5, and their counts against the
raw files.  Cranfield goes through its real ir_datasets id in a subprocess:
ir_datasets reads IR_DATASETS_HOME when it is imported, so a temporary home
(into which fastnig places the packaged cran.tar.gz) must be set before that
import.  NFCorpus (not shippable) goes through local TREC-style files when
its folder is there, and a BEIR folder is written by the tests.  Expected
values are computed here from the raw files, independently of ir_datasets.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import ir_datasets  # noqa: F401  imported with the session's IR_DATASETS_HOME, before any test changes it
import pytest
import torch

from fastnig import data
from fastnig.data import (
    Collection,
    DatasetUnavailable,
    LabelledPair,
    MissingJudgments,
    filter_agreeing,
    load_collection,
    sample_pairs,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------- raw readers
def read_cranfield_queries(path: Path) -> list:
    """Query texts of cran.qry in file order (whitespace collapsed)."""
    texts, current, in_text = [], None, False
    with open(path) as f:  # universal newlines: cran.qry is CRLF
        for line in f:
            if line.startswith(".I "):
                if current is not None:
                    texts.append(" ".join(current))
                current, in_text = [], False
            elif line.startswith(".W"):
                in_text = True
            elif in_text:
                current += line.split()
    texts.append(" ".join(current))
    return texts


def read_cranqrel(path: Path) -> list:
    with open(path) as f:
        return [tuple(int(x) for x in line.split()) for line in f if line.strip()]


def read_tsv(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split("\t", 1) for line in f if line.strip())


def read_trec_qrels(path: Path) -> dict:
    qrels = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                qid, _, did, grade = line.split()
                qrels.setdefault(qid, {})[did] = int(grade)
    return qrels


# ---------------------------------------------------------------- Cranfield
CRANFIELD_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    from fastnig.data import load_collection, sample_pairs, DatasetUnavailable, MissingJudgments

    out = {}
    c = load_collection("cranfield")
    out["notes"] = c.notes
    out["queries"] = c.queries()
    out["qrels"] = c.qrels()
    out["docs_count"] = c.docs_count()
    out["iter_docs"] = sum(1 for _ in c.iter_docs())
    out["scoreddocs"] = c.scoreddocs()
    out["has_nonrelevant"] = c.has_nonrelevant
    out["texts"] = c.doc_texts(["5", "6", "90", "91", "471", "995", "no-such-doc"])
    out["sample"] = [p.to_dict() for p in sample_pairs(c, label=1, num_pairs=40, seed=0)]
    out["sample_again"] = [p.to_dict() for p in sample_pairs(c, label="relevant", num_pairs=40, seed=0)]
    out["sample_seed1"] = [p.to_dict() for p in sample_pairs(c, label=1, num_pairs=40, seed=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["sample_all"] = len(sample_pairs(c, label=1, num_pairs=5000, seed=0))
    out["sample_all_warning"] = [str(w.message) for w in caught]
    try:
        sample_pairs(c, label=0, num_pairs=5)
    except MissingJudgments as exc:
        out["label0_error"] = str(exc)
    for policy in ("nonrelevant", "drop"):
        other = load_collection("cranfield", source_paper=policy)
        out[policy] = {"qrels": other.qrels(), "has_nonrelevant": other.has_nonrelevant}
        if policy == "nonrelevant":
            out[policy]["sample0"] = [p.to_dict() for p in sample_pairs(other, label=0, num_pairs=10, seed=3)]
    for spec, kw in (("nf", {"offline": True}), ("tn", {}), ("cranfield", {"source_paper": "maybe"})):
        try:
            load_collection(spec, **kw)
        except (DatasetUnavailable, ValueError) as exc:
            out["error_" + spec] = [type(exc).__name__, str(exc)]
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def cran_raw(cran_tarball, tmp_path_factory):
    """The members of the packaged cran.tar.gz, unpacked with tarfile (not by ir_datasets)."""
    folder = tmp_path_factory.mktemp("cran_raw")
    with tarfile.open(cran_tarball) as tar:
        tar.extractall(folder, members=[m for m in tar.getmembers() if m.name in ("cran.qry", "cranqrel")])
    return folder


@pytest.fixture(scope="module")
def cranfield(tmp_path_factory):
    """Results of the Cranfield script, run with an empty temporary IR_DATASETS_HOME: fastnig places
    the packaged cran.tar.gz there itself (no network, no data folder)."""
    home = tmp_path_factory.mktemp("irds_home")
    env = dict(os.environ, IR_DATASETS_HOME=str(home), FASTNIG_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", CRANFIELD_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=str(home), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    result["home"] = str(home)
    result["placed"] = hashlib.sha256((home / "cranfield" / "cran.tar.gz").read_bytes()).hexdigest()
    return result


@pytest.mark.slow
def test_cranfield_counts(cranfield):
    assert cranfield["docs_count"] == 1400
    assert cranfield["iter_docs"] == 1400
    assert len(cranfield["queries"]) == 225
    assert sum(len(d) for d in cranfield["qrels"].values()) == 1837
    assert len(cranfield["qrels"]) == 225
    assert cranfield["scoreddocs"] is None
    from fastnig.data.packaged import checksums

    assert cranfield["placed"] == checksums()["cran.tar.gz"]["sha256"]  # the packaged original, byte for byte


def test_cranfield_query_ids_are_qrels_positions(cranfield, cran_raw):
    raw = read_cranfield_queries(cran_raw / "cran.qry")
    assert len(raw) == 225
    assert cranfield["queries"] == {str(k): text for k, text in enumerate(raw, start=1)}
    q3 = cranfield["queries"]["3"]
    assert q3 == "what problems of heat conduction in composite slabs have been solved so far ."
    for did in ("5", "6", "90", "91"):  # judged for query 3, all about composite-slab heat conduction
        assert did in cranfield["qrels"]["3"]
        assert "slab" in cranfield["texts"][did]


def test_cranfield_grades_higher_is_better(cranfield, cran_raw):
    rows = read_cranqrel(cran_raw / "cranqrel")
    assert Counter(code for _, _, code in rows) == {1: 128, 2: 387, 3: 734, 4: 363, -1: 225}
    expected = {"relevant": 4, "nonrelevant": 0, "drop": None}
    for policy, source_gain in expected.items():
        qrels = cranfield["qrels"] if policy == "relevant" else cranfield[policy]["qrels"]
        want = {}
        for q, d, code in rows:
            gain = source_gain if code == -1 else 5 - code
            if gain is not None:
                want.setdefault(str(q), {})[str(d)] = gain
        assert qrels == want, policy
    assert cranfield["qrels"]["1"]["486"] == 4  # query 1's source paper (-1) counts as relevant by default
    assert cranfield["nonrelevant"]["qrels"]["1"]["486"] == 0
    assert "486" not in cranfield["drop"]["qrels"]["1"]
    assert not cranfield["has_nonrelevant"] and not cranfield["drop"]["has_nonrelevant"]
    assert cranfield["nonrelevant"]["has_nonrelevant"]
    assert any("source paper" in note for note in cranfield["notes"])


def test_cranfield_sampled_pairs(cranfield):
    sample = [LabelledPair.from_dict(d) for d in cranfield["sample"]]
    assert len(sample) == 40 and len({(p.query_id, p.doc_id) for p in sample}) == 40
    for p in sample:
        assert p.label == 1
        assert p.grade == cranfield["qrels"][p.query_id][p.doc_id] >= 1
        assert p.query == cranfield["queries"][p.query_id]
        assert p.passage
    assert cranfield["sample_again"] == cranfield["sample"]
    assert cranfield["sample_seed1"] != cranfield["sample"]
    # every judged pair but doc 995 (empty: no title, no text) can be drawn
    assert cranfield["texts"]["995"] == "" and cranfield["texts"]["471"] == ""
    assert "no-such-doc" not in cranfield["texts"]
    assert cranfield["sample_all"] == 1837 - 1
    assert any("only 1836" in w for w in cranfield["sample_all_warning"])
    negatives = [LabelledPair.from_dict(d) for d in cranfield["nonrelevant"]["sample0"]]
    assert len(negatives) == 10
    for p in negatives:  # with source_paper="nonrelevant" the only grade-0 rows are the -1 rows
        assert p.label == 0 and p.grade == 0
        assert cranfield["qrels"][p.query_id][p.doc_id] == 4


def test_cranfield_errors(cranfield):
    message = cranfield["label0_error"]
    assert "'cranfield'" in message and "no non-relevant judgments" in message and "label 1" in message
    kind, message = cranfield["error_nf"]  # not in this IR_DATASETS_HOME, and offline
    assert kind == "DatasetUnavailable"
    assert "'nf'" in message and "beir/nfcorpus/test" in message
    assert "nfcorpus.zip" in message and os.path.join(cranfield["home"], "beir", "nfcorpus") in message
    assert "BEIR folder" in message and "\n" not in message
    kind, message = cranfield["error_tn"]  # licensed documents: fails up front with the provider's instructions
    assert kind == "DatasetUnavailable" and "licensed" in message
    assert "WashingtonPost.v2.tar.gz" in message and cranfield["home"] in message
    kind, message = cranfield["error_cranfield"]
    assert kind == "ValueError" and "source_paper" in message and "'drop'" in message


# ------------------------------------------------------ packaged collections
def _digests(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest(), "bytes": len(data)}


def test_packaged_files_match_their_checksums():
    from importlib import resources

    from fastnig.data.packaged import ARCHIVES, checksums

    sums = checksums()
    assert set(sums) == set(ARCHIVES.values()) == {"cran.tar.gz", "med.tar.gz"}
    folder = resources.files("fastnig.data").joinpath("collections")
    total = 0
    for name, expected in sums.items():
        data = folder.joinpath(name).read_bytes()
        total += len(data)
        assert _digests(data) == {k: expected[k] for k in ("sha256", "md5", "bytes")}, name
        with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        assert set(members) == set(expected["members"]), name
        for member, digest in expected["members"].items():
            assert _digests(members[member]) == digest, (name, member)
    assert total <= 3 * 2 ** 20  # the issue's budget for shipped data
    # cran.tar.gz is the original archive: the md5 and size ir_datasets pins for its download
    pinned = json.loads(Path(ir_datasets.__file__).with_name("etc").joinpath("downloads.json").read_text())
    cran = pinned["cranfield"]["main"]
    assert (cran["expected_md5"], cran["size_hint"]) == (sums["cran.tar.gz"]["md5"], sums["cran.tar.gz"]["bytes"])


def test_altered_packaged_file_is_refused(tmp_path, monkeypatch):
    from fastnig.data import packaged

    real = packaged._collections_dir()
    fake = tmp_path / "collections"
    fake.mkdir()
    (fake / "checksums.json").write_bytes(real.joinpath("checksums.json").read_bytes())
    data = bytearray(real.joinpath("med.tar.gz").read_bytes())
    data[-1] ^= 1
    (fake / "med.tar.gz").write_bytes(bytes(data))
    monkeypatch.setattr(packaged, "_collections_dir", lambda: fake)
    monkeypatch.setattr(packaged, "_VERIFIED", {})
    with pytest.raises(DatasetUnavailable, match="missing or altered") as err:
        packaged.packaged_archive("med")
    assert "reinstall fastnig" in str(err.value)
    (fake / "med.tar.gz").unlink()
    with pytest.raises(DatasetUnavailable, match="missing or altered"):
        packaged.packaged_archive("med")


def _smart(text: str) -> dict:
    """``.I id`` / ``.W`` records -> {id: text}, whitespace collapsed (an independent reader)."""
    records, current = {}, None
    for line in text.splitlines():
        if line.startswith(".I "):
            current = line.split()[1]
            records[current] = []
        elif line.strip() != ".W" and current is not None:
            records[current] += line.split()
    return {k: " ".join(v) for k, v in records.items()}


@pytest.fixture(scope="module")
def med(tmp_path_factory):
    from fastnig.data.packaged import packaged_archive

    with tarfile.open(packaged_archive("med")) as tar:
        raw = {name: tar.extractfile(name).read().decode("ascii") for name in ("MED.ALL", "MED.QRY", "MED.REL")}
    cache = tmp_path_factory.mktemp("med_cache")
    return load_collection("med", cache_dir=cache), raw, cache


def test_med_counts_and_texts(med):
    c, raw, _ = med
    assert c.name == "med" and "MEDLINE" in c.source
    assert c.docs_count() == 1033 and sum(1 for _ in c.iter_docs()) == 1033
    queries = c.queries()
    assert len(queries) == 30 and queries == _smart(raw["MED.QRY"])
    qrels = c.qrels()
    assert sum(len(d) for d in qrels.values()) == 696 and len(qrels) == 30
    assert {g for d in qrels.values() for g in d.values()} == {1}  # binary, relevant only
    assert not c.has_nonrelevant
    assert qrels == read_trec_qrels_text(raw["MED.REL"])
    sizes = sorted(len(d) for d in qrels.values())
    assert sizes[0] == 9 and sizes[-1] == 39
    docs = [d for ds in qrels.values() for d in ds]
    assert len(docs) == len(set(docs))  # each relevant doc belongs to exactly one query
    texts = _smart(raw["MED.ALL"])
    assert c.doc_texts(["1", "1033"]) == {"1": texts["1"], "1033": texts["1033"]}
    assert "crystalline lens" in queries["1"]


def read_trec_qrels_text(text: str) -> dict:
    qrels = {}
    for line in text.splitlines():
        if line.strip():
            qid, _, did, grade = line.split()
            qrels.setdefault(qid, {})[did] = int(grade)
    return qrels


def test_query_split_specs(med):
    from fastnig.data.splits import split_queries

    c, _, cache = med
    train, heldout = split_queries(c)
    assert len(heldout) == round(0.3 * 30) and len(train) == 30 - len(heldout)
    assert not set(train) & set(heldout) and set(train) | set(heldout) == set(c.queries())
    assert split_queries(c, 0.3, 1) != (train, heldout)
    for part, ids in (("train", train), ("heldout", heldout)):
        sub = load_collection(f"med@{part}", cache_dir=cache)
        assert sub.name == f"med@{part}"
        assert list(sub.queries()) == ids and set(sub.qrels()) == set(ids)
        assert sub.qrels() == {q: c.qrels()[q] for q in ids}
        assert sub.docs_count() == 1033  # the corpus stays whole
        assert any(f"the {part} part of the seeded split" in note for note in sub.notes)
        pairs = sample_pairs(sub, label=1, num_pairs=50, seed=0)
        assert {p.query_id for p in pairs} <= set(ids)
    with pytest.raises(ValueError, match="unknown dataset 'med@test'"):
        load_collection("med@test")
    with pytest.raises(ValueError, match="test_fraction"):
        split_queries(c, 1.0)


# ----------------------------------------------------------------- NFCorpus
@pytest.fixture()
def irds_home(tmp_path, monkeypatch):
    """A temporary IR_DATASETS_HOME for the docstores of local data."""
    home = tmp_path / "irds_home"
    monkeypatch.setenv("IR_DATASETS_HOME", str(home))
    return home


def test_nfcorpus_trec_files(nfcorpus_dir, irds_home):
    nf = nfcorpus_dir
    before = sorted(os.listdir(nf))
    spec = f"trec:docs_tsv={nf / 'test.docs'},queries_tsv={nf / 'test.all.queries'},qrels_trec={nf / 'test.3-2-1.qrel'}"
    c = load_collection(spec)
    assert c.name == spec and c.ir_datasets_id is None
    assert c.docs_count() == 3162
    queries = c.queries()
    assert len(queries) == 325
    qrels = c.qrels()
    assert sum(len(d) for d in qrels.values()) == 15820 and len(qrels) == 325
    assert Counter(g for d in qrels.values() for g in d.values()) == {3: 576, 2: 11758, 1: 3486}
    assert qrels == read_trec_qrels(nf / "test.3-2-1.qrel")
    assert not c.has_nonrelevant
    assert c.label_counts(2) == {"relevant": 576 + 11758, "non-relevant": 0}
    assert c.scoreddocs() is None

    raw_queries = read_tsv(nf / "test.all.queries")
    raw_docs = read_tsv(nf / "test.docs")
    pairs = sample_pairs(c, label=1, num_pairs=30, seed=7)
    assert len(pairs) == 30
    for p in pairs:
        assert p.label == 1 and p.grade == qrels[p.query_id][p.doc_id] >= 1
        assert p.query == " ".join(raw_queries[p.query_id].split())
        assert p.passage == " ".join(raw_docs[p.doc_id].split())
    top = sample_pairs(c, label=1, num_pairs=10, seed=7, relevance_threshold=3)
    assert all(p.grade == 3 for p in top)
    capped = sample_pairs(c, label=1, num_pairs=20, seed=7, max_per_query=1)
    assert len({p.query_id for p in capped}) == 20

    with pytest.raises(MissingJudgments, match="no non-relevant judgments") as err:
        sample_pairs(c, label=0, num_pairs=5)
    assert spec in str(err.value) and "has_nonrelevant" in str(err.value)

    # keyword form, BEIR's 2-1-0 qrels; the docstore goes to the cache folder, never into the data folder
    c2 = load_collection("trec", docs_tsv=nf / "test.docs", queries_tsv=nf / "test.titles.queries",
                         qrels_trec=nf / "test.2-1-0.qrel", cache_dir=irds_home / "cache")
    assert sum(len(d) for d in c2.qrels().values()) == 12334 and len(c2.qrels()) == 323
    assert len(c2.doc_texts(["MED-10", "MED-14"])) == 2
    assert any((irds_home / "cache").iterdir()) and any((irds_home / "fastnig-local").iterdir())
    assert sorted(os.listdir(nf)) == before


# ------------------------------------------------------------- BEIR folder
CORPUS = [
    {"_id": "d1", "title": "Heat transfer", "text": "Heat transfer in supersonic wings."},
    {"_id": "d2", "title": "", "text": "Boundary layer flow\nover a  flat plate."},
    {"_id": "d3", "title": "Diet", "text": "Diet and cancer risk in patients."},
    {"_id": "d4", "title": "Library", "text": "Information retrieval for library users."},
    {"_id": "d5", "title": "Empty", "text": "Vitamin intake and blood pressure."},
    {"_id": "d6", "title": "Shock waves", "text": "Shock waves at high pressure."},
]
QUERIES = [{"_id": "q1", "text": "heat transfer wings"}, {"_id": "q2", "text": "cancer diet"},
           {"_id": "q3", "text": "library search"}]
QRELS = [("q1", "d1", 2), ("q1", "d2", 1), ("q1", "d6", 0), ("q1", "d3", 0), ("q2", "d3", 1), ("q2", "d5", 0),
         ("q2", "d4", 0), ("q3", "d4", 1), ("q3", "d1", 0), ("q3", "d9", 1), ("q3", "d2", 0)]


def write_beir(folder: Path, qrels=QRELS, split="test") -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    (folder / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels))
    return folder


def test_beir_folder(tmp_path, irds_home):
    folder = write_beir(tmp_path / "mini")
    for spec in (folder, str(folder)):
        c = load_collection(spec)
        assert isinstance(c, Collection) and c.name == str(folder)
        assert c.queries() == {"q1": "heat transfer wings", "q2": "cancer diet", "q3": "library search"}
        assert sum(len(d) for d in c.qrels().values()) == len(QRELS)
        assert c.has_nonrelevant and c.label_counts() == {"relevant": 5, "non-relevant": 6}
        assert c.docs_count() == 6
        assert dict(c.iter_docs())["d2"] == "Boundary layer flow over a flat plate."
        assert c.doc_texts(["d1", "d9"]) == {"d1": "Heat transfer Heat transfer in supersonic wings."}

    positives = sample_pairs(c, label=1, num_pairs=3, seed=0)
    assert [p.label for p in positives] == [1, 1, 1]
    negatives = sample_pairs(c, label="non-relevant", num_pairs=6, seed=0)
    assert sorted((p.query_id, p.doc_id) for p in negatives) == sorted((q, d) for q, d, g in QRELS if g == 0)
    for p in positives + negatives:
        assert p.grade == dict(((q, d), g) for q, d, g in QRELS)[(p.query_id, p.doc_id)]
        assert p.query == c.queries()[p.query_id] and p.passage == c.doc_texts([p.doc_id])[p.doc_id]
        assert p.text_pair == (p.query, p.passage)
    with pytest.warns(UserWarning, match="only 4 relevant pairs"):  # d9 is judged but not in the corpus
        assert {p.doc_id for p in sample_pairs(c, label=1, num_pairs=10)} == {"d1", "d2", "d3", "d4"}
    assert [p.grade for p in sample_pairs(c, label=1, num_pairs=1, relevance_threshold=2)] == [2]


def test_sampling_is_deterministic(tmp_path, irds_home):
    c = load_collection(write_beir(tmp_path / "a"))
    # the same judgments listed in another order (other dict order) give the same draw
    shuffled = load_collection(write_beir(tmp_path / "b", qrels=QRELS[::-1]))
    for seed in (0, 1, 12345):
        first = sample_pairs(c, label=0, num_pairs=4, seed=seed)
        assert sample_pairs(c, label=0, num_pairs=4, seed=seed) == first
        assert sample_pairs(shuffled, label=0, num_pairs=4, seed=seed) == first
        assert sample_pairs(c, label=0, num_pairs=6, seed=seed)[:4] == first  # a larger draw extends a smaller one
    orders = {tuple((p.query_id, p.doc_id) for p in sample_pairs(c, label=0, num_pairs=6, seed=s)) for s in range(5)}
    assert len(orders) > 1


def test_beir_folder_split_and_trec_jsonl(tmp_path, irds_home):
    folder = write_beir(tmp_path / "dev-only", split="dev")
    assert len(load_collection(folder).qrels()) == 3  # the only split is used when test.tsv is absent
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(ValueError, match=r"split must be one of \['dev', 'train'\]"):
        load_collection(folder)
    assert sum(len(d) for d in load_collection(folder, split="train").qrels().values()) == 1

    (tmp_path / "q.tsv").write_text("".join(f"{q['_id']}\t{q['text']}\n" for q in QUERIES))
    (tmp_path / "qrels.txt").write_text("".join(f"{q} 0 {d} {g}\n" for q, d, g in QRELS))
    (tmp_path / "run.txt").write_text("q1 Q0 d2 1 3.5 bm25\nq1 Q0 d1 2 7.0 bm25\nq2 Q0 d3 1 1.0 bm25\n")
    c = load_collection(f"trec:docs_jsonl={folder / 'corpus.jsonl'},queries_tsv={tmp_path / 'q.tsv'},"
                        f"qrels_trec={tmp_path / 'qrels.txt'},scoreddocs_trec={tmp_path / 'run.txt'}")
    assert c.doc_texts(["d3"]) == {"d3": "Diet Diet and cancer risk in patients."}
    assert c.scoreddocs() == {"q1": [("d1", 7.0), ("d2", 3.5)], "q2": [("d3", 1.0)]}
    assert c.scoreddocs(query_ids=["q1"], depth=1) == {"q1": [("d1", 7.0)]}
    assert len(sample_pairs(c, label=0, num_pairs=6)) == 6


def test_bioasq_is_a_local_folder(tmp_path, irds_home, monkeypatch):
    monkeypatch.setenv("FASTNIG_BIOASQ", str(tmp_path / "missing"))
    with pytest.raises(DatasetUnavailable) as err:
        load_collection("b")
    message = str(err.value)
    assert "BioASQ" in message and "FASTNIG_BIOASQ" in message and str(tmp_path / "missing") in message
    monkeypatch.setenv("FASTNIG_BIOASQ", str(write_beir(tmp_path / "bioasq")))
    assert len(load_collection("b").queries()) == 3


# ------------------------------------------------------------------ errors
def test_error_messages(tmp_path, irds_home):
    with pytest.raises(ValueError) as err:
        load_collection("beir/nfcorpus/tes")
    message = str(err.value)
    assert "'beir/nfcorpus/tes'" in message and "'beir/nfcorpus/test'" in message and "trec:" in message
    assert not isinstance(err.value, DatasetUnavailable)

    missing = tmp_path / "no-such-folder"
    with pytest.raises(DatasetUnavailable) as err:
        load_collection(str(missing))
    assert isinstance(err.value, ValueError)
    assert str(missing) in str(err.value) and "corpus.jsonl" in str(err.value)

    folder = write_beir(tmp_path / "partial")
    (folder / "queries.jsonl").unlink()
    with pytest.raises(DatasetUnavailable, match="lacks queries.jsonl"):
        load_collection(folder)

    with pytest.raises(DatasetUnavailable) as err:
        load_collection("trec", docs_tsv=tmp_path / "d.tsv", queries_tsv=tmp_path / "q.tsv",
                        qrels_trec=tmp_path / "r.txt")
    assert f"docs_tsv={tmp_path / 'd.tsv'}" in str(err.value)
    with pytest.raises(ValueError, match="queries_tsv is missing"):
        load_collection(f"trec:docs_tsv={tmp_path / 'd.tsv'},qrels_trec=x")
    with pytest.raises(ValueError, match="is not KEY=PATH"):
        load_collection("trec:docs=x")
    (tmp_path / "bad.tsv").write_text("q1\tfirst\tsecond\n")
    (tmp_path / "r.txt").write_text("q1 0 d1 1\n")
    with pytest.raises(ValueError, match="cannot read its queries") as err:
        load_collection("trec", docs_jsonl=folder / "corpus.jsonl", queries_tsv=tmp_path / "bad.tsv",
                        qrels_trec=tmp_path / "r.txt")
    assert "expected 2 fields" in str(err.value)
    with pytest.raises(TypeError, match="source_paper"):
        load_collection(write_beir(tmp_path / "ok"), source_paper="drop")
    with pytest.raises(TypeError, match="spec must be"):
        load_collection(3)

    c = load_collection(tmp_path / "ok")
    with pytest.raises(ValueError, match="label must be"):
        sample_pairs(c, label="maybe", num_pairs=1)
    with pytest.raises(ValueError, match="num_pairs"):
        sample_pairs(c, label=1, num_pairs=0)
    with pytest.raises(ValueError, match="relevance_threshold"):
        sample_pairs(c, label=1, num_pairs=1, relevance_threshold=0)
    with pytest.raises(MissingJudgments, match="lower relevance_threshold"):
        sample_pairs(c, label=1, num_pairs=1, relevance_threshold=5)


def test_dataset_table():
    assert {k: data.DATASETS[k] for k in data.ATTRIBUTION_DATASETS} == {
        "ms": "msmarco-passage/trec-dl-2019/judged", "f": "beir/fiqa/test", "tc": "beir/trec-covid",
        "nf": "beir/nfcorpus/test", "nq": "beir/nq", "tn": "wapo/v2/trec-news-2018",
        "r": "disks45/nocr/trec-robust-2004", "b": "bioasq"}
    assert [data.DATASETS[k] for k in data.VALIDATION_DATASETS] == ["msmarco-passage/dev/small"] + [
        f"lotte/{d}/dev/search" for d in ("lifestyle", "recreation", "science", "technology", "writing")]
    for key, dataset_id in data.DATASETS.items():
        if key != "b":
            assert ir_datasets.registry[dataset_id].has_qrels(), dataset_id


# --------------------------------------------------------- agreement filter
def reference_p_relevant(model, tokenizer, pairs, max_length):
    """P(relevant) pair by pair with the tokenizer's pair encoding (independent of fastnig)."""
    out = []
    with torch.no_grad():
        for p in pairs:
            enc = tokenizer(p.query, p.passage, truncation="only_second", max_length=max_length, return_tensors="pt")
            logits = model(**enc).logits[0].double()
            out.append(float(torch.sigmoid(logits[0]) if logits.numel() == 1 else torch.softmax(logits, -1)[1]))
    return out


def labelled_pairs():
    from tiny_models import PAIRS

    texts = PAIRS + [("what is the effect of heat", "heat flow in layers"), ("cancer", "diet"),
                     ("library users", "search system for library books"), ("shock wave", "wave")]
    return [LabelledPair(f"q{i}", f"d{i}", q, p, label, label) for i, (q, p) in enumerate(texts) for label in (1, 0)]


@pytest.mark.parametrize("num_labels", [2, 1])
def test_filter_agreeing(tokenizer, num_labels):
    from tiny_models import make_model

    model = make_model("bert", num_labels=num_labels, vocab_size=tokenizer.vocab_size, init_range=0.5, seed=3)
    model.train()  # the filter must predict in eval mode and give the mode back
    pairs = labelled_pairs()
    max_length = 24  # truncates the long passage
    model.eval()
    expected_p = reference_p_relevant(model, tokenizer, pairs, max_length)
    model.train()
    kept, report = filter_agreeing(model, tokenizer, pairs, batch_size=3, max_length=max_length, progress=False)
    assert model.training
    assert report["p_relevant"] == pytest.approx(expected_p, abs=1e-5)
    expected = [p for p, prob in zip(pairs, expected_p) if (prob > 0.5 if p.label == 1 else prob < 0.5)]
    assert kept == expected
    assert len(kept) == len(pairs) // 2  # each text pair appears with both labels: exactly one agrees
    assert report["total"] == len(pairs) and report["kept"] == len(kept)
    assert report["dropped"] == len(pairs) - len(kept) == len(report["dropped_pairs"])
    assert report["by_label"]["relevant"]["kept"] + report["by_label"]["non-relevant"]["kept"] == len(kept)
    assert report["by_label"]["relevant"]["kept"] == sum(p > 0.5 for p in expected_p[::2])
    json.dumps(report)
    again, _ = filter_agreeing(model, tokenizer, pairs, batch_size=len(pairs), max_length=max_length,
                               progress=False)
    assert again == kept


def test_filter_agreeing_arguments(tiny_bert, tokenizer):
    assert filter_agreeing(tiny_bert, tokenizer, [], progress=False) == ([], {
        "total": 0, "kept": 0, "dropped": 0, "p_relevant": [], "dropped_pairs": [],
        "by_label": {"relevant": {"total": 0, "kept": 0, "dropped": 0},
                     "non-relevant": {"total": 0, "kept": 0, "dropped": 0}}})
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a fastnig.data.LabelledPair"):
        filter_agreeing(tiny_bert, tokenizer, [("q", "p")], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        filter_agreeing(tiny_bert, tokenizer, labelled_pairs(), batch_size=0, progress=False)


def test_unjudged_negatives_are_unjudged_and_deterministic(tmp_path):
    from fastnig.data import load_collection, sample_pairs

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": f"document number {i}"} for i in range(30)]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (folder / "queries.jsonl").write_text("\n".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"})
                                                    for i in range(3)) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td1\t1\nq1\td2\t2\nq2\td3\t1\n")
    col = load_collection(folder, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="negatives='unjudged'"):
        sample_pairs(col, label=0, num_pairs=4)
    pairs = sample_pairs(col, label=0, num_pairs=6, seed=3, negatives="unjudged")
    assert len(pairs) == 6 and all(p.label == 0 for p in pairs)
    qrels = col.qrels()
    assert all(p.doc_id not in qrels[p.query_id] for p in pairs)
    assert pairs == sample_pairs(col, label=0, num_pairs=6, seed=3, negatives="unjudged")
    assert pairs != sample_pairs(col, label=0, num_pairs=6, seed=4, negatives="unjudged")
