"""One attribution job: a dataset's pairs of one label -> NIG -> a scheme file, resumable.

Owns: :func:`attribute_dataset`, what ``fastnig attribute`` and each
(dataset, label) of ``fastnig run`` execute, in three pieces: opening the
scheme (a fresh one, or the saved one after checking that it was made with
the same model, dataset, label, settings and sampling: :func:`open_scheme`),
attributing a list of pairs chunk by chunk with a save after each
(:class:`_Job`), and the early-stopping rounds (:func:`_attribute_in_rounds`).
A shard (``rank::world`` of the drawn pairs) is just a filter on the pairs.
With ``heads_out`` the same job fills a head scheme beside the neuron scheme
(:mod:`fastnig.neurons.head_schemes`), from the same attributions and chunks.
Must not: parse configs or know about the other stages (:mod:`fastnig.study.pipeline`).

Because a scheme's sums are exact whatever the order and grouping of pairs,
a resumed run ends with exactly the scheme an uninterrupted one writes; the
scheme is saved atomically (:mod:`fastnig.neurons.scheme_storage`) after
every chunk of pairs.  One job writes a scheme at a time: a job holds an
exclusive lock on ``.<name>.lock`` beside the scheme
(:func:`fastnig.common.exclusive_lock`; released when the job ends or its
process dies), and a second job on the same path is refused at once.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from ..common import CorruptFile, check_int, exclusive_lock
from ..data import filter_agreeing, label_mapping, load_collection, sample_pairs
from ..engine.attribute import attribute
from ..engine.model import move_model, unwrap
from ..engine.rankers import BoundRanker, bind_ranker
from ..engine.scoring import TARGETS
from ..engine.settings import AttributionSettings
from ..evaluation.reranking import bm25_run
from ..neurons.head_schemes import head_attributions, head_settings, head_universe, neuron_attributions, neuron_settings
from ..neurons.scheme import Scheme
from ..neurons.scheme_storage import scheme_json_path
from ..neurons.sets import neuron_universe
from ..neurons.stability import StopRule


def pair_id(pair) -> str:
    """Stable id of a :class:`fastnig.data.LabelledPair` inside a scheme."""
    return f"{pair.query_id}\t{pair.doc_id}"


def bm25_ranker(collection, cache_dir: Optional[Union[str, Path]] = None):
    """``ranker(queries, k)`` for ``negatives="bm25"``: the BM25 top ``k`` doc ids of each query
    (:func:`fastnig.evaluation.reranking.bm25_run`, index cached in ``cache_dir``)."""
    def ranker(queries, k):
        return {q: [d for d, _ in docs] for q, docs in bm25_run(collection, queries, k=k, cache_dir=cache_dir,
                                                                progress=False).items()}
    return ranker


def sampling_record(seed, num_pairs, negatives, relevance_threshold, agreement_filter, relevant, nonrelevant):
    """What a scheme records of its sampling (a resume must match it); the label mapping only when it is not
    the former default (relevant >= threshold, non-relevant = grade 0), so older schemes still resume."""
    record = {"seed": seed, "num_pairs": num_pairs, "negatives": negatives,
              "relevance_threshold": relevance_threshold, "agreement_filter": agreement_filter}
    if relevant is not None or nonrelevant is not None or relevance_threshold != 1:
        record.update(label_mapping(relevant, nonrelevant, relevance_threshold).as_dict())
    return record


def scheme_lock_path(out: Union[str, Path]) -> Path:
    """The lock file of the scheme at ``out``: ``.<name>.lock`` beside its JSON (held while a job writes it)."""
    json_path = scheme_json_path(out)
    return json_path.with_name(f".{json_path.name[:-len('.json')]}.lock")


class ResumeRefused(ValueError):
    """The scheme already at the output path was made another way (model, dataset, label, settings,
    sampling) or by a fastnig it cannot resume: the message says which, and the fix (another output path,
    the same options, or deleting it)."""


def open_scheme(out: Path, sizes: Dict[str, int], meta: Dict[str, object], sampling: Dict[str, object]) -> Scheme:
    """The scheme at ``out`` to resume (after checking it was made the same way), or a new empty one;
    :class:`ResumeRefused` when it cannot be resumed."""
    if Scheme.exists(out):
        try:
            scheme = Scheme.load(out)
            scheme.check_compatible(Scheme.empty(sizes, meta), op="resume")
        except CorruptFile:
            raise
        except ValueError as exc:  # another model, dataset, label or settings; an older file format
            raise ResumeRefused(f"{exc}; use another output path or the same options") from None
        if sampling.get("stop_when") is not None and not scheme.has_halves:
            raise ResumeRefused(f"resume: {scheme_json_path(out)} keeps no query halves (written by an older "
                             "fastnig), so early stopping has no stability estimate; attribute without stop_when, "
                             "or delete the scheme to re-create it")
        if scheme.extra.get("sampling") not in (None, sampling):
            raise ResumeRefused(f"resume: {out} was sampled with {scheme.extra.get('sampling')}, not {sampling}; "
                             "use another output path or the same sampling options")
        return scheme
    out.parent.mkdir(parents=True, exist_ok=True)
    return Scheme.empty(sizes, {**meta, "extra": {"sampling": sampling}})


class _Job:
    """Attributes pairs into ``scheme`` (saved to ``out`` after each chunk), with a progress bar; with ``heads``
    (a head scheme and its path), into the head scheme too, from the same attributions.

    The two schemes hold the same pairs.  After each chunk the head scheme is saved first, the neuron scheme
    last, so a kill between the two writes leaves the head scheme one chunk ahead, never behind; a resumed job
    attributes every pair that *either* scheme lacks, adds it only where it is missing, and keeps the agreement
    filter's decision a scheme already recorded, so both end as in an uninterrupted run (the same chunks).
    """

    def __init__(self, ranker: BoundRanker, scheme: Scheme, out: Path, *, settings: AttributionSettings, target: str,
                 max_length: int, agreement_filter: bool, chunk_pairs: int, bar,
                 heads: Optional[Tuple[Scheme, Path]] = None):
        self.ranker, self.model, self.tokenizer = ranker, ranker.model, ranker.tokenizer
        self.scheme, self.out = scheme, out
        self.settings, self.target, self.max_length = settings, target, max_length
        self.agreement_filter, self.chunk_pairs, self.bar = agreement_filter, chunk_pairs, bar
        self.started, self.attributed = time.perf_counter(), 0
        # (scheme, path, view of an attribution) in the order they are saved: heads first, neurons last
        self.parts = ([(heads[0], heads[1], head_attributions)] if heads is not None else []) + [
            (scheme, out, neuron_attributions if heads is not None else (lambda result: result))]

    def missing(self, pair) -> bool:
        """Whether some scheme of the job has not processed ``pair`` (summed or dropped) yet."""
        pid = pair_id(pair)
        return any(pid not in scheme.seen_ids for scheme, _, _ in self.parts)

    def _filter(self, todo: Sequence) -> Sequence:
        """The agreement filter on ``todo``: pairs a scheme already holds keep its decision, the others are
        scored; the dropped ones are recorded (and saved) in every scheme that lacks them."""
        kept_before = set().union(*(s.pair_ids for s, _, _ in self.parts))
        dropped_before = set().union(*(s.dropped_ids for s, _, _ in self.parts))
        fresh = [p for p in todo if pair_id(p) not in kept_before and pair_id(p) not in dropped_before]
        kept_ids = set()
        if fresh:
            kept, _report = filter_agreeing(self.model, self.tokenizer, fresh, max_length=self.max_length,
                                            progress=False, ranker=self.ranker)
            kept_ids = {pair_id(p) for p in kept}
        kept_ids |= kept_before
        dropped = [pair_id(p) for p in todo if pair_id(p) not in kept_ids]
        if dropped:
            for scheme, path, _ in self.parts:
                new = [i for i in dropped if i not in scheme.seen_ids]
                if new:
                    scheme.mark_dropped(new)
                    scheme.save(path)
            self.bar.update(len(dropped))
        return [p for p in todo if pair_id(p) in kept_ids]

    def _chunks(self, todo: Sequence):
        """``(pairs, needs)``: runs of up to ``chunk_pairs`` consecutive pairs that the same schemes lack
        (``needs[k]``: whether ``parts[k]`` lacks them); an uninterrupted job has one kind, so its chunks."""
        chunk, needs = [], None
        for pair in todo:
            need = tuple(pair_id(pair) not in scheme.seen_ids for scheme, _, _ in self.parts)
            if chunk and (need != needs or len(chunk) == self.chunk_pairs):
                yield chunk, needs
                chunk = []
            chunk, needs = chunk + [pair], need
        if chunk:
            yield chunk, needs

    def run(self, todo: Sequence) -> None:
        """Attribute ``todo`` (pairs some scheme does not hold): the agreement filter first (the pairs it
        drops are recorded as dropped), then chunks of ``chunk_pairs``."""
        if todo and self.agreement_filter:
            todo = self._filter(todo)
        for chunk, needs in list(self._chunks(todo)):
            result = attribute(self.model, [p.text_pair for p in chunk], self.settings, tokenizer=self.tokenizer,
                               target=self.target, progress=False, ranker=self.ranker)
            ids = [pair_id(p) for p in chunk]
            for (scheme, path, view), need in zip(self.parts, needs):
                if need:
                    scheme.add(view(result), ids)
                    scheme.save(path)
            self.attributed += len(chunk)
            self.bar.update(len(chunk))
            self.bar.set_postfix(pairs_per_s=f"{self.attributed / (time.perf_counter() - self.started):.2f}")


def _attribute_in_rounds(job: _Job, drawn: Sequence, mine: Callable[[int, object], bool],
                         stop_rule: Optional[StopRule], combine: Optional[Callable[[Scheme], Scheme]]
                         ) -> Tuple[int, Optional[str], List[dict]]:
    """Attribute the drawn pairs in rounds; after each round but the last, check ``stop_rule`` on the
    (combined) scheme and stop when it says so (:meth:`StopRule.check`: the criterion at ``confirm``
    round ends in a row).  Returns (pairs sampled when it ended, "stable" or ``None``, the checks).

    Each check is saved with the scheme before any pair past its round end is attributed, so a resumed
    run finds the estimates of the round ends it has gone past (the rule needs them) and never recomputes
    them on more pairs.  The earlier estimates are read from the combined scheme, i.e. from the first
    shard's record, so that every shard decides alike.
    """
    scheme = job.scheme
    ends = stop_rule.round_ends(len(drawn)) if stop_rule is not None and drawn else [len(drawn)]
    checks = list((scheme.extra.get("stopping") or {}).get("checks", [])) if stop_rule is not None else []
    begin, end = 0, len(drawn)
    for i, end in enumerate(ends):
        job.run([p for i_, p in enumerate(drawn[begin:end], begin) if mine(i_, p)])
        begin = end
        if stop_rule is None or end == len(drawn):
            continue
        whole = combine(scheme) if combine is not None else scheme
        recorded = list((whole.extra.get("stopping") or {}).get("checks", []))
        seen_all = whole.seen_ids
        if any(pair_id(p) in seen_all for p in drawn[end:]):
            continue  # resumed: the run that went past this round end checked the rule there (and saved it)
        estimates = {c["pairs_sampled"]: c["estimate"] for c in recorded}
        stop, estimate = stop_rule.check(whole, [estimates.get(e) for e in ends[:i]])
        checks = [c for c in recorded if c["pairs_sampled"] < end] + [
            {"pairs_sampled": end, "pairs_used": whole.count,
             "estimate": None if estimate != estimate else estimate}]  # NaN (not available) as null
        scheme.extra["stopping"] = {**scheme.extra.get("stopping", {}), "checks": checks}
        scheme.save(job.out)  # the check is on disk before the next round's pairs
        if stop:
            return end, "stable", checks
    return end, None, checks


def attribute_dataset(model, tokenizer, dataset, *, label: Union[int, str], num_pairs: int, out: Union[str, Path],
                      settings: Optional[AttributionSettings] = None, seed: int = 0, negatives: str = "judged",
                      relevance_threshold: int = 1, relevant: Optional[Sequence[int]] = None,
                      nonrelevant: Optional[Sequence[int]] = None, bm25_cache_dir: Optional[Union[str, Path]] = None,
                      agreement_filter: bool = True, chunk_pairs: int = 8, device=None, progress: bool = True,
                      dataset_name: Optional[str] = None, shard: Tuple[int, int] = (0, 1), stop_when=None,
                      combine: Optional[Callable[[Scheme], Scheme]] = None, ranker=None,
                      heads_out: Optional[Union[str, Path]] = None) -> Scheme:
    """Attribute ``num_pairs`` pairs of one label of a dataset into a scheme file.

    Args:
        model, tokenizer: the ranker model and its fast tokenizer.
        dataset: a :class:`fastnig.data.Collection` or a spec for
            :func:`fastnig.data.load_collection`.
        label: 1 / ``"relevant"`` (scheme P_x) or 0 / ``"non-relevant"`` (N_x).
        num_pairs: pairs sampled (deterministically from ``seed``) before the
            agreement filter; the scheme holds those that agree.
        out: scheme path (``runs/P_nf`` writes ``runs/P_nf.json`` + tensors).
        settings: how NIG is computed (:class:`fastnig.engine.settings.AttributionSettings`;
            ``None`` = its defaults); ``segments=True``: the scheme keeps
            per-segment sums (:mod:`fastnig.neurons.segment_shares`).
        negatives, relevance_threshold, relevant, nonrelevant: which pairs
            are relevant / non-relevant and where negatives come from, see
            :func:`fastnig.data.sample_pairs` (``"bm25"`` ranks with
            :func:`bm25_ranker`, its index cached in ``bm25_cache_dir``).
        agreement_filter: keep only pairs whose prediction agrees (docs/method.md §6).
        chunk_pairs: pairs attributed between two saves (what a kill can lose).
        device: where to compute (the model is moved there); ``None`` = where it is.
        progress: a progress bar (pairs done, pairs/s, ETA).
        dataset_name: the scheme's dataset name (default: the collection's name).
        shard: ``(rank, world)``: attribute only the pairs ``rank::world`` of
            the sample (one torchrun process each; merge the shards with
            :meth:`Scheme.merge`, which is exact).
        stop_when: early stopping (docs/method.md §6.6): ``None`` (attribute
            all ``num_pairs``), or a :class:`fastnig.neurons.stability.StopRule` /
            mapping ``{level, overlap[, by, first_round, confirm]}``: pairs are
            then attributed in rounds (first_round, doubling, up to
            ``num_pairs`` sampled pairs) and attribution stops after the first
            round that ends the ``confirm``-th (default 2) round in a row
            whose scheme's top ``level`` % set is estimated to keep at least
            ``overlap`` of its neurons if the pairs were doubled.  The pairs
            are the first ones of the same draw, so a scheme stopped after
            ``r`` sampled pairs equals a run with ``num_pairs=r`` and no rule.
            ``extra["stopping"]`` records the rule, the sampled pairs used,
            the reason attribution stopped and each check.
        combine: with ``shard`` and ``stop_when``: called on this shard's
            scheme at every round end, on every rank, to return the scheme of
            all shards (gather + merge); the rule is checked on it.
        ranker: as for :func:`fastnig.attribute` (``None``: from the model's class);
            the agreement filter scores with it too.
        heads_out: also accumulate the head scheme of the same pairs there
            (``heads=True``, :func:`fastnig.neurons.head_schemes.head_attributions`;
            docs/method.md §12), resumed and sharded with the neuron scheme: both
            hold the same pairs, and a kill between their two saves is completed
            by the resume.  ``None``: no heads (``settings.heads`` is then ignored:
            the neuron scheme does not depend on it).

    Returns:
        The saved :class:`fastnig.Scheme`.

    Raises:
        OutputLocked: another job (thread or process) is writing the scheme at ``out``.
    """
    check_int("chunk_pairs", chunk_pairs, 1)
    settings = settings if settings is not None else AttributionSettings()
    if not isinstance(settings, AttributionSettings):
        raise TypeError(f"settings must be an AttributionSettings, got {type(settings).__name__}")
    settings = settings.replace(heads=heads_out is not None)
    model, tokenizer = unwrap(model, tokenizer)
    ranker = bind_ranker(ranker, model, tokenizer)
    max_length = ranker.max_length(settings.max_length)
    settings = settings.replace(max_length=max_length)
    if getattr(ranker, "score_only", False):  # two-tower rankers: F = ±score, as fastnig.attribute records it
        settings = settings.replace(output="logit")
    collection = load_collection(dataset) if isinstance(dataset, (str, Path)) else dataset
    bm25 = bm25_ranker(collection, bm25_cache_dir) if negatives == "bm25" else None
    drawn = sample_pairs(collection, label=label, num_pairs=num_pairs, seed=seed,
                         relevance_threshold=relevance_threshold, negatives=negatives, relevant=relevant,
                         nonrelevant=nonrelevant, ranker=bm25)
    rank, world = shard
    stop_rule = StopRule.parse(stop_when)
    target = TARGETS[0] if drawn and drawn[0].label == 1 else TARGETS[1]
    move_model(model, device)
    record = settings.record(model, target=target, max_length=max_length)
    if ranker.family != "classifier" or ranker.uses_template:  # as fastnig.attribute records it
        record["ranker"] = ranker.ranker.describe()
    sampling = sampling_record(seed, num_pairs, negatives, relevance_threshold, agreement_filter, relevant,
                               nonrelevant)
    if stop_rule is not None:
        sampling["stop_when"] = stop_rule.as_dict()
    out = Path(out)
    meta = {"model": record["model"], "dataset": dataset_name or collection.name, "label": target,
            "settings": neuron_settings(record)}
    with ExitStack() as locks:
        locks.enter_context(exclusive_lock(scheme_lock_path(out), f"scheme {scheme_json_path(out)}"))
        scheme = open_scheme(out, neuron_universe(model, settings.layers, settings.include_pooler), meta, sampling)
        heads = None
        if heads_out is not None:
            heads_out = Path(heads_out)
            locks.enter_context(exclusive_lock(scheme_lock_path(heads_out), f"scheme {scheme_json_path(heads_out)}"))
            heads = (open_scheme(heads_out, head_universe(model), {**meta, "settings": head_settings(record)},
                                 sampling), heads_out)
        shard_pairs = [p for i, p in enumerate(drawn) if i % world == rank]
        bar = tqdm(total=len(shard_pairs), unit="pair", desc=f"NIG {scheme.name}", disable=not progress,
                   dynamic_ncols=True)
        job = _Job(ranker, scheme, out, settings=settings, target=target, max_length=max_length,
                   agreement_filter=agreement_filter, chunk_pairs=chunk_pairs, bar=bar, heads=heads)
        bar.update(sum(not job.missing(p) for p in shard_pairs))

        def mine(i: int, pair) -> bool:  # this shard's share of the drawn pairs, not yet in every scheme
            return i % world == rank and job.missing(pair)

        end, reason, checks = _attribute_in_rounds(job, drawn, mine, stop_rule, combine)
        bar.close()
        if reason is None:
            reason = "max pairs" if len(drawn) >= num_pairs else "all pairs drawn"
        stopping = {"rule": stop_rule.as_dict() if stop_rule is not None else None, "max_pairs": num_pairs,
                    "pairs_sampled": end, "reason": reason}
        if stop_rule is not None:
            stopping["checks"] = checks
        for part, path, _ in job.parts:  # the head scheme first, as after every chunk
            if part.extra.get("stopping") != stopping or not Scheme.exists(path):
                part.extra["stopping"] = stopping  # (a run where every pair was dropped still leaves a file)
                part.save(path)
    return scheme
