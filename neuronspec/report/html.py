"""``python -m neuronspec report RESULTS.json --out DIR``: the HTML report of a run.

One self-contained page, ``DIR/index.html`` (figures embedded as data URIs; no script, no
network), built from the results file alone: no model, tokenizer or cache is needed
(token texts were recorded into the results by the run). Sections: the run's
configuration and versions, the spec outcomes with their hypotheses, the snapshot drift,
then per model and analysis the headline, the key numbers per layer, the figures, and
every value of every finding (nested findings as tables, long lists summarised).

Figures are taken from the run's ``--plots-dir`` (recorded in the results; ``--plots DIR``
overrides) and linked by file name: ``<figure>_<model>.png`` belongs to a model
(``<figure>_all_models.png`` to the comparison of models), and to the analysis whose name
starts the figure name (``positional_layer0_tiny-gpt2.png`` → ``positional``) or that
:data:`FIGURE_ANALYSES` maps its prefix to. Name a new analysis' figures
``<analysis>[_detail]_<model>.png`` (``plots.figure.plot_path(dir, f"{analysis}_…", model)``)
and they appear in its section.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from neuronspec.report.cards import anchor, card_links, cards_section, neuron_sets_table
from neuronspec.report.headlines import HEADLINES, headlines_of
from neuronspec.report.results import (
    ResultsFileError,
    is_neuron_field,
    is_token_field,
    layer_sort_key,
)
from neuronspec.report.summary import drift_counts, outcome_counts, token_text
from neuronspec.report.values import (
    NOWHERE,
    NeuronLinks,
    TokenText,
    Where,
    escape,
    inline,
    number,
    render_value,
    scalar,
    table,
)

# Figure name prefixes that do not start with their analysis' name (Voita et al.'s figures).
FIGURE_ANALYSES: dict[str, str] = {
    "fig1_dead_neurons": "dead",
    "fig2_covering_unigrams": "ngram",
    "fig3a_token_detectors": "token_detector_summary",
    "fig3b_detected_tokens": "token_detector_summary",
    "fig4_new_tokens": "token_detector_summary",
}
ALL_MODELS = "all_models"


def safe_model_name(model_id: str) -> str:
    """The model part of a figure's file name, as :func:`neuronspec.plots.figure.plot_path`
    writes it (that module imports matplotlib only when a figure is drawn)."""
    from neuronspec.plots.figure import plot_path

    return plot_path(Path("."), "f", model_id).name[len("f_") : -len(".png")]


# -- figures ------------------------------------------------------------------------------------


def assign_figures(
    paths: list[Path], analyses: dict[str, list[str]]
) -> dict[str, dict[str | None, list[Path]]]:
    """``{model id or ALL_MODELS or "": {analysis or None: [figure paths]}}``; ``""`` holds
    figures of no known model. ``analyses``: model id → its analyses."""
    by_safe = {safe_model_name(m): m for m in analyses}
    every = sorted({a for names in analyses.values() for a in names}, key=len, reverse=True)
    assigned: dict[str, dict[str | None, list[Path]]] = {}
    for path in sorted(paths):
        stem = path.stem
        model, name = "", stem
        if stem.endswith("_" + ALL_MODELS):
            model, name = ALL_MODELS, stem[: -len(ALL_MODELS) - 1]
        else:
            for safe in sorted(by_safe, key=len, reverse=True):
                if stem.endswith("_" + safe):
                    model, name = by_safe[safe], stem[: -len(safe) - 1]
                    break
        candidates = analyses.get(model, every)
        analysis = next((a for p, a in FIGURE_ANALYSES.items() if name.startswith(p)), None)
        if analysis is None:
            analysis = next(
                (
                    a
                    for a in sorted(candidates, key=len, reverse=True)
                    if name == a or name.startswith(a + "_")
                ),
                None,
            )
        assigned.setdefault(model, {}).setdefault(analysis, []).append(path)
    return assigned


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{name}" loading="eager">'
        f"<figcaption>{name}</figcaption></figure>"
    )


def _figures(paths: list[Path]) -> str:
    return f'<div class="figures">{"".join(_img(p) for p in paths)}</div>' if paths else ""


# -- sections -----------------------------------------------------------------------------------


def _cell(
    value: Any,
    path: list[str],
    token: bool,
    tokens: TokenText,
    *,
    layers: list[str] | None = None,
    where: Where = NOWHERE,
) -> str:
    """A key-number cell, tagged with its place in the results (checked by the browser test);
    ``layers``: the value is the same at ``path`` with each of these layer keys (path[2]);
    ``where``: the card links of neuron ids in a neuron field (path[-1])."""
    attributes = (
        f' data-path="{escape(json.dumps(path))}" data-value="{escape(json.dumps(value))}"'
        if scalar(value) and not isinstance(value, str)
        else ""
    )
    if attributes and layers:
        attributes += f' data-layers="{escape(json.dumps(layers))}"'
    shown = inline(value, token, tokens, is_neuron_field(path[-1]), where)
    return f'<span class="num"{attributes}>{shown}</span>'


def _layer_place(links: NeuronLinks | None, key: str, finding: Any) -> Where:
    """The place of a per-layer finding stored under layer ``key``."""
    place = Where(links, int(key) if key.lstrip("-").isdigit() else None)
    return place.inside(finding) if isinstance(finding, dict) else place


def key_numbers(
    model_id: str,
    analysis: str,
    layers: dict[str, Any],
    tokens: TokenText,
    links: NeuronLinks | None = None,
) -> str:
    """Per-layer table of a per-layer analysis: scalar fields as columns (those equal in
    every layer listed once above it), list fields by their length or their few values."""
    keys = [k for k in sorted(layers, key=layer_sort_key) if isinstance(layers[k], dict)]
    per_layer = [k for k in keys if k != "all"]
    if not per_layer:
        return ""
    findings = [layers[k] for k in per_layer]
    fields = [
        f for f in dict.fromkeys(f for x in findings for f in x) if f not in ("model", "layer")
    ]
    constant = [
        f
        for f in fields
        if len(findings) > 1
        and all(scalar(x.get(f)) and x.get(f) == findings[0].get(f) for x in findings)
    ]
    columns = [f for f in fields if f not in constant]
    header = ["layer", *(escape(f) for f in columns)]
    rows = []
    for key, finding in zip(per_layer, findings, strict=True):
        row = [escape(key)]
        for f in columns:
            value = finding.get(f)
            path = [model_id, analysis, key, f]
            if isinstance(value, (list, dict)) and (
                len(value) > 6
                or not all(
                    scalar(v) for v in (value.values() if isinstance(value, dict) else value)
                )
            ):
                unit = "keys" if isinstance(value, dict) else "items"
                row.append(_cell(len(value), [*path, "#len"], False, tokens) + f" {unit}")
            else:
                place = _layer_place(links, key, finding)
                row.append(_cell(value, path, is_token_field(f), tokens, where=place))
        rows.append(row)
    same = ", ".join(
        f"{escape(f)} = "
        + _cell(
            findings[0][f], [model_id, analysis, per_layer[0], f], False, tokens, layers=per_layer
        )
        for f in constant
    )
    note = f'<p class="same">Same in every layer: {same}</p>' if same else ""
    return note + table(header, rows, cls="numbers")


def analysis_section(
    model_id: str,
    analysis: str,
    layers: dict[str, Any],
    headline: str | None,
    figures: list[Path],
    tokens: TokenText,
    links: NeuronLinks | None = None,
) -> str:
    """One analysis: headline, key numbers, figures and every value; ``links``: neuron ids
    of ``mlp`` findings link to their cards."""
    parts = [
        f'<section class="analysis" id="{anchor(model_id, analysis)}"><h3>{escape(analysis)}</h3>'
    ]
    if headline:
        parts.append(f'<p class="headline">{escape(headline)}</p>')
    parts.append(key_numbers(model_id, analysis, layers, tokens, links))
    if "all" in layers:
        parts.append(render_value("", layers["all"], tokens, where=Where(links)))
    parts.append(_figures(figures))
    details = [
        f"<details><summary>layer {escape(k)}: every value</summary>"
        f"{render_value('', layers[k], tokens, where=_layer_place(links, k, layers[k]))}</details>"
        for k in sorted(layers, key=layer_sort_key)
        if k != "all"
    ]
    parts += details
    parts.append("</section>")
    return "".join(parts)


def config_section(results: dict[str, Any]) -> str:
    run = results.get("run", {})
    rows = []
    for key in (
        "started",
        "duration_s",
        "args",
        "models",
        "layers",
        "top_k",
        "device",
        "batch_size",
        "fast_scan",
        "plots_dir",
        "platform",
    ):
        if key in run:
            rows.append(
                [
                    escape(key),
                    escape(number(run[key]) if scalar(run[key]) else json.dumps(run[key])),
                ]
            )
    config = results.get("config", {})
    for group, values in config.items():
        if isinstance(values, dict):
            text = ", ".join(f"{k} = {number(v)}" for k, v in values.items())
        else:
            text = number(values)
        rows.append([escape(group), escape(text)])
    versions = run.get("versions", {})
    if versions:
        rows.append(["versions", escape(", ".join(f"{k} {v}" for k, v in versions.items() if v))])
    models = []
    for model_id, entry in sorted(results.get("models", {}).items()):
        info = entry.get("info", {})
        models.append(
            [
                f'<a href="#{anchor(model_id)}">{escape(model_id)}</a>',
                escape(str(info.get("model_type", "—"))),
                _cell(info.get("n_layers"), [model_id, "info", "n_layers"], False, token_text({})),
                _cell(info.get("n_tokens"), [model_id, "info", "n_tokens"], False, token_text({})),
                escape(str(info.get("corpus", "—"))),
                escape(str(info.get("window", "—"))),
                escape(str(info.get("corpus_fingerprint", ""))[:12]),
                escape(str(info.get("dtype", "—"))),
                escape(str(info.get("source", "—"))),
            ]
        )
    return (
        '<section id="config"><h2>Run configuration</h2>'
        + table(["setting", "value"], rows, cls="kv")
        + table(
            [
                "model",
                "type",
                "layers",
                "tokens",
                "corpus",
                "window",
                "corpus sha256",
                "dtype",
                "source",
            ],
            models,
        )
        + "</section>"
    )


_OUTCOME_ORDER = {"failed": 0, "error": 1, "xpassed": 2, "xfailed": 3, "skipped": 4, "passed": 5}


def specs_section(specs: list[dict[str, Any]]) -> str:
    if not specs:
        return '<section id="specs"><h2>Specs</h2><p>No spec outcomes in this results file.</p></section>'
    rows = []
    for spec in sorted(specs, key=lambda s: (_OUTCOME_ORDER.get(s["outcome"], 9), s["nodeid"])):
        outcome = spec["outcome"] or "not run"
        where = " ".join(
            x for x in (spec.get("model"), f"L{spec['layer']}" if "layer" in spec else None) if x
        )
        text = [f'<span class="hyp">{escape(spec["hypothesis"] or spec["name"])}</span>']
        if spec.get("measured"):
            measured = ", ".join(f"{k} = {number(v)}" for k, v in spec["measured"].items())
            text.append(f'<span class="measured">measured: {escape(measured)}</span>')
        if spec.get("reason") and outcome in ("xfailed", "skipped"):
            text.append(f'<span class="reason">{escape(outcome)}: {escape(spec["reason"])}</span>')
        if spec.get("message") and outcome != "skipped":
            text.append(f'<code class="message">{escape(spec["message"])}</code>')
        rows.append(
            [
                f'<span class="badge {outcome}">{escape(outcome)}</span>',
                f'<span class="nodeid">{escape(spec["file"])}<br>{escape(spec["name"])}</span>',
                escape(where or "—"),
                "<br>".join(text),
            ]
        )
    return (
        f'<section id="specs"><h2>Specs</h2><p class="counts">{escape(outcome_counts(specs))}</p>'
        + table(
            ["outcome", "spec", "model", "hypothesis and measured numbers"],
            rows,
            cls="specs",
            limit=None,  # every spec's outcome
        )
        + "</section>"
    )


def drift_section(drift: list[dict[str, Any]] | None) -> str:
    if drift is None:
        return ""
    if not drift:
        return '<section id="drift"><h2>Snapshot drift</h2><p>No snapshot was compared in this run.</p></section>'
    rows = []
    for entry in drift:
        moved = ""
        if entry.get("changes"):
            change_rows = [
                [
                    escape(c["path"] or "<finding>"),
                    escape(number(c["old"])),
                    escape(number(c["new"])),
                    escape(number(c.get("abs_change"))),
                    escape(number(c.get("rel_change"))),
                    escape(number(c.get("se_change"))),
                    '<span class="badge passed">within</span>'
                    if c["within_tolerance"]
                    else '<span class="badge failed">out</span>',
                    escape(c.get("note", "")),
                ]
                for c in entry["changes"]
            ]
            more = entry["n_changes"] - len(entry["changes"])
            header = ["value", "stored", "this run", "|Δ|", "rel", "|Δ| in SE", "tolerance", "note"]
            if not any(c.get("note") for c in entry["changes"]):
                header, change_rows = header[:-1], [row[:-1] for row in change_rows]
            moved = table(header, change_rows, cls="drift")
            if more > 0:
                moved += f'<p class="more">… {more} more moved values</p>'
        status_class = {"match": "passed", "within tolerance": "xfailed"}.get(
            entry["status"], "failed"
        )
        rows.append(
            [
                f'<span class="badge {status_class}">{escape(entry["status"])}</span>',
                f'<span class="nodeid">{escape(entry["nodeid"])}</span>',
                escape(str(entry["n_changes"])),
                moved or "—",
            ]
        )
    return (
        f'<section id="drift"><h2>Snapshot drift</h2><p class="counts">{escape(drift_counts(drift))}'
        " (values compared with the snapshots' tolerance)</p>"
        + table(["status", "spec", "moved values", "what moved"], rows, cls="specs", limit=None)
        + "</section>"
    )


def model_section(
    model_id: str, entry: dict[str, Any], figures: dict[str | None, list[Path]]
) -> str:
    tokens = token_text(entry.get("tokens", {}))
    analyses = entry.get("analyses", {})
    links = card_links(model_id, entry.get("cards") or {})
    known, _ = headlines_of(analyses, tokens)
    lines = {analysis: (label, text) for analysis, label, text in known}
    parts = [f'<section class="model" id="{anchor(model_id)}"><h2>{escape(model_id)}</h2>']
    if known:
        parts.append(
            table(
                ["finding", "headline"],
                [[escape(label), escape(text)] for _, label, text in known],
                cls="kv",
            )
        )
    order = [a for a in HEADLINES if a in analyses] + sorted(set(analyses) - set(HEADLINES))
    for analysis in order:
        if analysis == "neuron_sets":  # every neuron id a link to its card
            parts.append(
                f'<section class="analysis" id="{anchor(model_id, analysis)}">'
                f"<h3>neuron sets</h3>"
                f"{neuron_sets_table(model_id, analyses[analysis], entry.get('cards') or {})}"
                "</section>"
            )
            continue
        parts.append(
            analysis_section(
                model_id,
                analysis,
                analyses[analysis],
                lines.get(analysis, (None, None))[1],
                figures.get(analysis, []),
                tokens,
                links,
            )
        )
    if figures.get(None):
        parts.append("<h3>Other figures</h3>" + _figures(figures[None]))
    parts.append(cards_section(model_id, entry, tokens))
    parts.append("</section>")
    return "".join(parts)


_CSS = """
mark.fire{background:#ffd24d;font-weight:600;padding:0 1px}.context{font-family:ui-monospace,monospace;white-space:pre-wrap}
section.card{border-top:1px solid #d5d9e0;margin-top:1em}svg.spark rect{fill:#3b6fd8}a.neuron{font-variant-numeric:tabular-nums}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:16px 24px 64px}
h1{margin:8px 0 4px}h2{border-bottom:2px solid #d5dae3;padding-bottom:4px;margin-top:36px}
h3{margin:24px 0 6px;color:#2b4a7a}h5{margin:10px 0 4px;font-size:13px;color:#4a5568}
nav{background:#fff;border:1px solid #d5dae3;border-radius:6px;padding:8px 12px;margin:12px 0}
nav a{margin-right:14px}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff;font-size:13px}
th,td{border:1px solid #d5dae3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600}tbody tr:nth-child(even){background:#fafbfc}
table.numbers td{text-align:right;font-variant-numeric:tabular-nums}table.numbers td:first-child{text-align:center}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600;color:#fff;background:#718096}
.badge.passed{background:#2f855a}.badge.failed,.badge.error{background:#c53030}.badge.xfailed{background:#b7791f}
.badge.xpassed{background:#9b2c2c}.badge.skipped{background:#718096}
.headline{font-size:15px;background:#fff;border-left:4px solid #2b6cb0;padding:6px 10px;margin:6px 0}
.same{color:#4a5568;font-size:12px;margin:4px 0}
.tok{background:#edf2f7;border:1px solid #cbd5e0;border-radius:3px;padding:0 3px;font-family:ui-monospace,monospace;white-space:pre}
.measured{color:#2b6cb0}.reason{color:#975a16}.message{display:block;white-space:pre-wrap;font-size:12px;color:#742a2a;max-height:8em;overflow:auto}
.nodeid{font-family:ui-monospace,monospace;font-size:12px;overflow-wrap:anywhere}
table.specs td:nth-child(2){max-width:22em}table.specs td:nth-child(4){min-width:28em}
.figures{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;background:#fff;border:1px solid #d5dae3;padding:6px}
figure img{max-width:540px;height:auto;display:block}figcaption{font-size:11px;color:#4a5568}
.scroll{max-width:100%;overflow-x:auto}details{margin:4px 0}summary{cursor:pointer;color:#2b4a7a}.nested{margin-left:12px}
.list{margin:4px 0;font-size:13px}.more{color:#718096;font-size:12px;margin:0 0 8px}
.counts{font-weight:600}
"""


def render_html(results: dict[str, Any], figures: list[Path], *, source: str = "") -> str:
    """The report page of ``results`` with the given figure files embedded."""
    models = results.get("models", {})
    assigned = assign_figures(figures, {m: list(e.get("analyses", {})) for m, e in models.items()})
    nav = ['<a href="#config">configuration</a>', '<a href="#specs">specs</a>']
    if "snapshot_drift" in results:
        nav.append('<a href="#drift">snapshot drift</a>')
    nav += [f'<a href="#{anchor(m)}">{escape(m)}</a>' for m in sorted(models)]
    if assigned.get(ALL_MODELS) or assigned.get(""):
        nav.append('<a href="#comparison">all models</a>')
    summary = []
    if "specs" in results:
        summary.append(f"specs: {outcome_counts(results['specs'])}")
    if "snapshot_drift" in results:
        summary.append(f"snapshots: {drift_counts(results['snapshot_drift'])}")
    body = [
        "<h1>neuronspec report</h1>",
        f'<p class="counts">{escape("; ".join(summary))}</p>' if summary else "",
        f'<p class="same">{escape(source)}</p>' if source else "",
        f"<nav>{''.join(nav)}</nav>",
        config_section(results),
        specs_section(results.get("specs", [])),
        drift_section(results.get("snapshot_drift")),
    ]
    for model_id in sorted(models):
        body.append(model_section(model_id, models[model_id], assigned.get(model_id, {})))
    across = [p for group in assigned.get(ALL_MODELS, {}).values() for p in group]
    stray = [p for group in assigned.get("", {}).values() for p in group]
    if across or stray:
        body.append(
            '<section id="comparison"><h2>All models</h2>' + _figures(across + stray) + "</section>"
        )
    if not figures:
        body.append(
            '<p class="same">No figures: the run had no --plots-dir, or its folder is not here (give --plots DIR).</p>'
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>neuronspec report</title>"
        f"<style>{_CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n"
    )


def find_figures(
    results: dict[str, Any], plots_dir: Path | None, results_path: Path | None
) -> list[Path]:
    """PNG figures of the run: ``plots_dir``, else the run's recorded ``--plots-dir``, else a
    ``plots`` folder beside the results file; none when none of them exists."""
    candidates = [plots_dir]
    if plots_dir is None:
        recorded = results.get("run", {}).get("plots_dir")
        candidates.append(Path(recorded) if recorded else None)
        if results_path is not None:
            candidates.append(results_path.parent / "plots")
    for directory in candidates:
        if directory is not None and directory.is_dir():
            return sorted(directory.glob("*.png"))
    return []


def write_report(
    results: dict[str, Any],
    out_dir: Path,
    *,
    plots_dir: Path | None = None,
    results_path: Path | None = None,
) -> Path:
    """Write ``out_dir/index.html``; returns its path."""
    if plots_dir is not None and not plots_dir.is_dir():
        raise ResultsFileError(
            f"--plots {plots_dir} is not a directory; give the run's --plots-dir"
        )
    figures = find_figures(results, plots_dir, results_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.html"
    source = f"from {results_path}" if results_path is not None else ""
    page.write_text(render_html(results, figures, source=source), encoding="utf-8")
    return page
