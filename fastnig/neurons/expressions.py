"""A small, readable language for the neuron sets of the paper's Table 4.

Grammar (whitespace is free)::

    expr   := term (('&' | '|') term)*          & = intersection, | = union
    term   := SCHEME | group | fusion | '(' expr ')'
    SCHEME := P_<x> | N_<x> | F_<x> | F_A        x = a dataset name of the run
    group  := 'inter' '(' ('O' | 'A') ',' ('P' | 'N' | 'F') ')'
    fusion := 'fuse' '(' SCHEME (',' SCHEME)* ')'

At a pruning level X %:

* ``P_x`` / ``N_x`` = the top X % of the relevant / non-relevant scheme of x;
* ``F_x`` = top X % of P_x ⊕ N_x (the fusion: averaged means); ``F_A`` = top
  X % of the fusion of every scheme of every dataset;
* ``inter(O, P)`` = ∩ of P_o over the out-of-domain datasets o that have one
  (``A`` = every dataset; ``F`` intersects the F_x sets);
* ``fuse(P_ms, N_tc)`` = top X % of the fusion of the named schemes.

The paper's Table 4 rows are :data:`PAPER_SETS`.  :func:`parse` checks an
expression before any work (unknown names are reported against the run's
datasets); :func:`evaluate` builds the :class:`~fastnig.neurons.sets.NeuronSet`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple, Union

from .fusion import fuse, fuse_all
from .scheme import Scheme
from .sets import NeuronSet, intersection, union

PAPER_SETS = ("P_ms", "N_ms", "inter(O, P)", "inter(O, N)", "inter(A, P)", "inter(A, N)", "F_ms",
              "inter(O, F)", "inter(A, F)", "F_A")
_LABEL_OF = {"P": "relevant", "N": "non-relevant"}
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z][A-Za-z0-9_\-.]*)|(?P<op>[&|(),]))")


class ExpressionError(ValueError):
    """A malformed set expression; the message points at the problem."""


@dataclass(frozen=True)
class Ref:
    kind: str      # "P", "N" or "F"
    dataset: str   # dataset name, or "A" for F_A


@dataclass(frozen=True)
class Group:
    datasets: str  # "O" or "A"
    kind: str


@dataclass(frozen=True)
class Fusion:
    parts: Tuple[Ref, ...]


@dataclass(frozen=True)
class BinOp:
    op: str
    left: "Node"
    right: "Node"


Node = Union[Ref, Group, Fusion, BinOp]


def _tokens(text: str) -> List[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExpressionError(f"set expression {text!r}: unexpected character {text[pos:].strip()[:1]!r} "
                                  f"at position {pos}")
        out.append(m.group("name") or m.group("op"))
        pos = m.end()
    return out


def _ref(token: str, text: str) -> Ref:
    m = re.fullmatch(r"([PNF])_(.+)", token)
    if not m:
        raise ExpressionError(f"set expression {text!r}: {token!r} is not a scheme name; write P_<dataset>, "
                              f"N_<dataset>, F_<dataset> or F_A")
    return Ref(m.group(1), m.group(2))


def parse(text: str) -> Node:
    """Parse one expression; raises :class:`ExpressionError` naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("a set expression must be a non-empty string such as 'P_ms' or 'inter(O, N)'")
    tokens = _tokens(text)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            want = f"{expected!r}" if expected else "more input"
            raise ExpressionError(f"set expression {text!r}: expected {want}, found {tok!r}")
        pos += 1
        return tok

    def term() -> Node:
        tok = take()
        if tok == "(":
            node = expr()
            take(")")
            return node
        if tok == "inter" and peek() == "(":
            take("(")
            group = take()
            take(",")
            kind = take()
            take(")")
            if group not in ("O", "A") or kind not in ("P", "N", "F"):
                raise ExpressionError(f"set expression {text!r}: write inter(O|A, P|N|F), got inter({group}, {kind})")
            return Group(group, kind)
        if tok == "fuse" and peek() == "(":
            take("(")
            parts = [_ref(take(), text)]
            while peek() == ",":
                take(",")
                parts.append(_ref(take(), text))
            take(")")
            if any(p.kind == "F" for p in parts):
                raise ExpressionError(f"set expression {text!r}: fuse() takes P_/N_ schemes")
            return Fusion(tuple(parts))
        if tok in "&|(),":
            raise ExpressionError(f"set expression {text!r}: unexpected {tok!r}")
        return _ref(tok, text)

    def expr() -> Node:
        node = term()
        while peek() in ("&", "|"):
            op = take()
            node = BinOp(op, node, term())
        return node

    node = expr()
    if peek() is not None:
        raise ExpressionError(f"set expression {text!r}: unexpected {peek()!r} after a complete expression")
    return node


def _refs(node: Node) -> List[Ref]:
    if isinstance(node, Ref):
        return [node]
    if isinstance(node, Fusion):
        return list(node.parts)
    if isinstance(node, BinOp):
        return _refs(node.left) + _refs(node.right)
    return []


def check(text: str, datasets: Sequence[str], labels: Mapping[str, Sequence[str]]) -> Node:
    """Parse and check that every scheme it names will exist in the run.

    Args:
        datasets: the run's dataset names.
        labels: dataset -> the labels attributed for it ("relevant", "non-relevant").
    """
    node = parse(text)
    for ref in _refs(node):
        if ref.kind == "F" and ref.dataset == "A":
            continue
        if ref.dataset not in datasets:
            raise ExpressionError(f"set expression {text!r}: unknown dataset {ref.dataset!r}; the run's datasets "
                                  f"are {list(datasets)}")
        needed = ["relevant", "non-relevant"] if ref.kind == "F" else [_LABEL_OF[ref.kind]]
        missing = [lab for lab in needed if lab not in labels.get(ref.dataset, ())]
        if missing:
            raise ExpressionError(f"set expression {text!r}: {ref.kind}_{ref.dataset} needs the {missing} "
                                  f"scheme(s) of {ref.dataset}, which the run does not attribute")
    return node


def evaluate(node: Union[str, Node], schemes: Mapping[Tuple[str, str], Scheme], percent: float, *,
             in_domain: Sequence[str] = ("ms",), by: str = "value", name: str = "") -> NeuronSet:
    """The neuron set of an expression at ``percent`` % of all neurons.

    Args:
        schemes: ``(dataset name, label) -> Scheme`` of the run.
        in_domain: dataset names that are in-domain (the rest form O).
    """
    if isinstance(node, str):
        name = name or node
        node = parse(node)
    datasets = list(dict.fromkeys(d for d, _ in schemes))
    cache: Dict[object, NeuronSet] = {}

    def scheme_of(ref: Ref) -> Scheme:
        if ref.kind == "F":
            if ref.dataset == "A":
                return fuse_all(schemes.values(), name="F_A")
            return fuse(schemes[(ref.dataset, "relevant")], schemes[(ref.dataset, "non-relevant")],
                        name=f"F_{ref.dataset}")
        key = (ref.dataset, _LABEL_OF[ref.kind])
        if key not in schemes:
            raise ExpressionError(f"no scheme {ref.kind}_{ref.dataset} in this run")
        return schemes[key]

    def top(ref: Ref) -> NeuronSet:
        if ref not in cache:
            cache[ref] = scheme_of(ref).top(percent, by=by)
        return cache[ref]

    def ev(n: Node) -> NeuronSet:
        if isinstance(n, Ref):
            return top(n)
        if isinstance(n, Fusion):
            return fuse(*[scheme_of(r) for r in n.parts]).top(percent, by=by)
        if isinstance(n, BinOp):
            left, right = ev(n.left), ev(n.right)
            return intersection(left, right) if n.op == "&" else union(left, right)
        members = [d for d in datasets if n.datasets == "A" or d not in in_domain]
        if n.kind == "F":
            refs = [Ref("F", d) for d in members
                    if (d, "relevant") in schemes and (d, "non-relevant") in schemes]
        else:
            refs = [Ref(n.kind, d) for d in members if (d, _LABEL_OF[n.kind]) in schemes]
        if not refs:
            raise ExpressionError(f"inter({n.datasets}, {n.kind}): no dataset of the run has such a scheme")
        return intersection(*[top(r) for r in refs])

    result = ev(node)
    result.name = name or result.name
    return result
