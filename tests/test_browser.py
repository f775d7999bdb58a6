"""The explorer and the report as a real browser shows them: headless Chromium (Debian's package).

`make test` installs Chromium (Makefile: the chromium stamp).  Without it these tests skip locally,
and fail under CI (CI=true): a browser test must not pass by not running.  The demo's own report
and explorer get the same checks in tests/test_demo.py (:func:`check_report_page`,
:func:`check_explorer_page`).
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
from browser_driver import Browser, find_chromium
from test_scorecard import fixture_run  # noqa: F401 (fixture)

from fastnig.engine.settings import AttributionSettings
from fastnig.neurons.scheme import Scheme

pytestmark = pytest.mark.slow

SCRIPT_PASSAGE = "heat transfer <script>window.pwned = 1</script> in the boundary layer </b>"
PAIRS = [("heat flow in a wing", "the boundary layer of supersonic wings shows heat transfer"),
         ("shock wave theory", SCRIPT_PASSAGE),
         ("cancer risk of diet", "a study of patients shows the effect of vitamin on cancer risk"),
         ("library search systems", "information retrieval systems index documents for users"),
         ("laminar flow", "laminar and turbulent flow in the boundary layer")]


@pytest.fixture(scope="session")
def browser():
    if not find_chromium():
        message = "headless Chromium is not installed (apt-get install -y chromium; `make test` does it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + ": under CI the browser tests must run")
        pytest.skip(message)
    with Browser() as b:
        yield b


def open_page(browser, path):
    page = browser.open(path.resolve().as_uri())
    return page


# ------------------------------------------------------------------ the report
def check_report_page(browser, path) -> None:
    """report.html: every table has as many cells in each row as header cells, every figure loaded, text
    columns left and numeric cells right, no console error, no request but the file itself."""
    page = open_page(browser, path)
    tables = page.eval("""Array.from(document.querySelectorAll('table')).map(t => {
        const rows = Array.from(t.rows).map(r => Array.from(r.cells).reduce((n, c) => n + c.colSpan, 0));
        return {rows, text: t.innerText.slice(0, 80)}; })""")
    assert tables, "the report has no table"
    for t in tables:
        assert len(set(t["rows"])) == 1, f"column count mismatch {t['rows']} in table {t['text']!r}"
    images = page.eval("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
    assert all(ok for _, ok in images), [alt for alt, ok in images if not ok]
    align = page.eval("""Array.from(document.querySelectorAll('td')).map(td =>
        [td.innerText.trim(), getComputedStyle(td).textAlign])""")
    for text, how in align:
        if re.fullmatch(r"[-+]?\d[\d,]*(\.\d+)?([eE][-+]?\d+)?( ?%)?", text):
            assert how in ("right", "end"), (text, how)
        elif re.search(r"[A-Za-z]{3}", text) and not re.search(r"\d", text) and text.lower() not in ("nan", "inf"):
            assert how in ("left", "start"), (text, how)
    assert page.console_errors == []
    assert page.requests == [path.resolve().as_uri()]
    return images


def test_report_renders_every_table_and_figure(browser, fixture_run):  # noqa: F811 (fixture)
    from test_report import _figures

    from fastnig.evaluation.table4 import PruningTable
    from fastnig.report.document import write_report

    PruningTable.from_csv(fixture_run / "pruning" / "table4.csv").write(fixture_run / "pruning")
    names = _figures(fixture_run)
    settings = {"name": "fixture <b>run</b>", "attribution": {"in_domain": ["ms"]}}
    html = write_report(fixture_run, settings, {"attribution_s": 1.0}, {})["html"]
    images = check_report_page(browser, html)
    assert len(images) == len(names)
    text = html.read_text()
    assert "random pruning" in text and "|mean random drop|" in text  # the row that used to spill over
    assert "fixture &lt;b&gt;run&lt;/b&gt;" in text


# ---------------------------------------------------------------- the explorer
@pytest.fixture(scope="module")
def tiny_explorer(tmp_path_factory, tokenizer):
    """An explorer of a tiny BERT: P and N schemes of 5 pairs (one passage holds a <script> tag)."""
    from tiny_models import make_model

    from fastnig import attribute, fuse, fuse_all
    from fastnig.study.explore import explore

    model = make_model("bert", vocab_size=tokenizer.vocab_size, layers=2).eval()
    settings = AttributionSettings(steps=4, segments=True)
    ids = [f"q{i}\td{i}" for i in range(len(PAIRS))]
    schemes = []
    for label in ("relevant", "non-relevant"):
        att = attribute(model, PAIRS, settings, tokenizer=tokenizer, target=label, progress=False)
        scheme = Scheme.from_attributions(att, ids, "tiny", model="tiny-bert")
        schemes.append(scheme)
    texts = dict(zip(ids, PAIRS))
    out = tmp_path_factory.mktemp("explorer") / "explorer.html"
    explore(schemes, out, model=model, tokenizer=tokenizer, text_of=lambda s, pids: {p: texts[p] for p in pids},
            top=3, title="tiny <i>run</i>", levels=[1, 5, 10], default_level=5)
    schemes = schemes + [fuse(*schemes), fuse_all(schemes)]
    return out, schemes


def check_explorer_page(browser, path, schemes) -> dict:
    """The explorer of ``schemes`` (as the page orders them: their files, then F_x, F_A): it loads with no
    console error and no request, draws the heat map and the first rows; sorting, filtering and a click
    give what the schemes say; exemplar text shows as text."""
    page = open_page(browser, path)
    page.wait_for("document.body.dataset.ready")
    assert page.console_errors == [] and page.requests == [path.resolve().as_uri()]
    info = page.eval("({S: explorer.S, N: explorer.N, names: Array.from(document.querySelectorAll('#scheme option'))"
                     ".map(o => o.textContent), cells: document.querySelectorAll('#heatmap td.cell').length,"
                     " rows: document.querySelectorAll('#grid-rows .row').length})")
    by_name = {s.name: s for s in schemes}
    assert set(info["names"]) <= set(by_name) and info["N"] == schemes[0].total_neurons
    assert info["cells"] > 0 and info["rows"] > 0
    order = [by_name[n] for n in info["names"]]
    neurons = [f"{m}:{u}" for m, n in order[0].sizes.items() for u in range(n)]
    # sorting: each scheme's first rows are its ranking (by value, and by |value|).  The page ranks the
    # float32 means: a pair scheme's ranking as Scheme.ranking; a fusion of P and N of this tiny model
    # (whose N is -P up to rounding) has means that tie in float32, ranked as its float32 values say.
    for k, scheme in enumerate(order):
        for by in ("value", "abs"):
            page.eval(f"document.getElementById('sort').value = '{k}:{by}:1';"
                      "document.getElementById('sort').dispatchEvent(new Event('change'))")
            got = page.eval("explorer.rows().slice(0, 25)")
            f32 = scheme.mean_vector().numpy().astype(np.float32)
            key = f32 if by == "value" else np.abs(f32)
            assert got == np.lexsort((np.arange(key.size), -key))[:25].tolist(), (scheme.name, by)
            if not scheme.is_fused:
                assert got == scheme.ranking(by)[:25].tolist(), (scheme.name, by)
    # filtering: a layer and component, then "in P, not in N" at the current level
    first_module = next(iter(order[0].sizes))
    from fastnig.neurons.sets import component, layer_index
    layer, comp = layer_index(first_module), component(first_module)
    page.eval(f"explorer.selectCell({layer}, '{comp}')")
    rows = page.eval("explorer.rows()")
    page.eval("explorer.sortBy(0)")
    module_of = [n.rsplit(":", 1)[0] for n in neurons]
    expected = [i for i in order[0].ranking("value").tolist()
                if layer_index(module_of[i]) == layer and component(module_of[i]) == comp]
    assert page.eval("explorer.rows()") == expected and sorted(rows) == sorted(expected)
    level = page.eval("explorer.state.level")
    sets = page.eval("Array.from(document.querySelectorAll('#f-in option')).map(o => [o.value, o.textContent])")
    p_name, n_name = order[0].name, next((s.name for s in order if s.label != order[0].label and not s.is_fused), None)
    if n_name:
        k_p = next(v for v, t in sets if t == p_name)
        k_n = next(v for v, t in sets if t == n_name)
        page.eval(f"""(() => {{ const f = document.getElementById('f-layer'); f.value = '';
            f.dispatchEvent(new Event('change')); const c = document.getElementById('f-component'); c.value = '';
            c.dispatchEvent(new Event('change')); const a = document.getElementById('f-in'); a.value = '{k_p}';
            a.dispatchEvent(new Event('change')); const b = document.getElementById('f-out'); b.value = '{k_n}';
            b.dispatchEvent(new Event('change')); }})()""")
        top_p, top_n = by_name[p_name].top(float(level)).mask, by_name[n_name].top(float(level)).mask
        want = sorted(np.flatnonzero((top_p & ~top_n).numpy()).tolist())
        assert sorted(page.eval("explorer.rows()")) == want
    # a click on a neuron: its card shows the stored mean of every scheme
    i = int(order[0].ranking("abs")[0])
    page.eval(f"explorer.select({i})")
    shown = page.eval("Array.from(document.querySelectorAll('#card-values tr')).slice(1).map(r =>"
                      " [r.cells[0].textContent, Number(r.cells[1].dataset.value), Number(r.cells[2].textContent)])")
    for name, value, rank in shown:
        mean = by_name[name].mean_vector()[i].item()
        assert value == pytest.approx(float(np.float32(mean)), rel=1e-6, abs=1e-30)
        assert rank == int(np.flatnonzero(by_name[name].ranking("value") == i)[0]) + 1
    assert page.eval("document.querySelector('#card h2').textContent") == neurons[i]
    assert page.console_errors == [] and page.requests == [path.resolve().as_uri()]
    return {"page": page, "neuron": i}


def test_explorer_in_a_real_browser(browser, tiny_explorer):
    path, schemes = tiny_explorer
    result = check_explorer_page(browser, path, schemes)
    page = result["page"]
    # the exemplars of the clicked neuron: its pairs with their text, the <script> passage as text
    exemplars = page.eval("document.querySelectorAll('#card .pair').length")
    assert exemplars == 10  # 5 pairs (k = 5) in each of P and N
    passages = page.eval("Array.from(document.querySelectorAll('#card .passage')).map(p => p.textContent)")
    assert "Passage: " + SCRIPT_PASSAGE in passages
    assert page.eval("document.querySelectorAll('#card script, #card b').length") == 0
    assert page.eval("window.pwned === undefined")
    assert "<script>window.pwned" not in path.read_text()  # escaped in the file too
    assert page.eval("document.title").startswith("tiny <i>run</i>")
    page.eval("explorer.show('facts')")
    assert page.console_errors == []


def test_the_per_token_view_in_the_page_sums_to_the_stored_nig(browser, tiny_explorer):
    path, schemes = tiny_explorer
    page = open_page(browser, path)
    page.wait_for("document.body.dataset.ready")
    data = page.eval("(() => { const D = JSON.parse(document.getElementById('fastnig-data').textContent);"
                     " return Object.entries(D.exemplars).slice(0, 3); })()")
    assert data
    for _neuron, items in data:
        for e in items:
            assert e["sum"] == pytest.approx(e["value"], rel=1e-4, abs=1e-7)
