"""Figures and pages from results: pure functions, no computation beyond arithmetic.

``plot_atlas`` draws a sensitivity atlas as a heatmap (source layer on x, target layer on
y, σ of one rank as colour, log10 by default) with a dropdown that switches the rank and
the view: raw σ, or σ divided by the source activation's typical norm, which makes layers
of different scale comparable. Hovering a cell shows its pair (``L3 -> L8``), σ1..σk and
the spectral gap σ_k/σ_{k+1}; pairs whose gap is under ``GAP_WARNING`` are flagged, since
their k-th vector is not separated from the next and should not be trusted on its own.

``atlas_html`` writes one self-contained page (plotly.js inlined, works offline): the
heatmap, and a side panel that shows the clicked pair's spectrum as bars coloured by gap
group (neighbours within ``GAP_WARNING`` of each other are one group: a subspace, not
vectors to read one by one) and a table per vector and sign: the scale at a fixed
next-token KL, the most promoted and suppressed next tokens (``token_effects``) and, with
an effect map (``atlas_effects``), the effect at matched KL. An effect map also adds two
heatmap views, the best effect and its ratio to random directions, with pairs at random
level in grey, and a click on a row shows the row's precomputed generation beside the
unsteered one. Prompt, model, token and generated text is HTML-escaped or set as plain
text, never as markup.

>>> import torch
>>> from tl_powersteer.plotting import plot_atlas
>>> from tl_powersteer.atlas import SensitivityAtlas
>>> n, k = 3, 2
>>> sv = torch.full((n, n, k), float("nan")); sv[0, 1] = torch.tensor([4.0, 2.0])
>>> atlas = SensitivityAtlas(
...     singular_values=sv, next_singular_value=torch.full((n, n), 1.0),
...     right_vectors=torch.zeros(n, n, k, 5), iterations=torch.full((n, n), -1),
...     converged=torch.ones(n, n, dtype=torch.bool), source_norms=torch.ones(n),
...     method="exact", sources=[0], targets=[1], source_site="hook_mlp_out",
...     target_site="hook_mlp_out", target_positions=1, seed=0, model_name="toy", prompts=["hi"],
...     completed_sources=[0])
>>> fig = plot_atlas(atlas)
>>> fig.data[0].type, fig.layout.xaxis.title.text
('heatmap', 'source layer')
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .atlas import SensitivityAtlas
from .checks import is_int, plain_ints
from .effect_map import SIGNS, AtlasEffects
from .io import atomic_file, check_destination
from .transfer import RANDOM, TransferResult

__all__ = [
    "GAP_WARNING",
    "AtlasFrame",
    "atlas_frame",
    "atlas_html",
    "atlas_page",
    "check_effect_map",
    "plot_atlas",
    "plot_steerability",
]

GAP_WARNING = 1.05


def _label(source: int, target: int) -> str:
    return f"L{source} -> L{target}"


def _hover(atlas: SensitivityAtlas, s: int, t: int) -> str:
    sig = atlas.singular_values[s, t]
    if sig.isnan().any():
        return ""
    values = ", ".join(f"σ{i + 1}={float(v):.4g}" for i, v in enumerate(sig))
    gap = float(atlas.spectral_gap()[s, t])
    flag = " (not separated: vectors unreliable)" if gap < GAP_WARNING else ""
    return f"{_label(s, t)}<br>{values}<br>gap σ{atlas.k}/σ{atlas.k + 1} = {gap:.3f}{flag}"


def _effect_hover(row: Any) -> str:
    """Hover lines of one pair of an effect map's table."""
    if row["rank"] < 0:
        return "<br>no vector reached the KL budget"
    sign = "+" if row["sign"] > 0 else "-"
    verdict = "beats random" if row["beats_random"] else "random level"
    return (
        f"<br>best effect {row['best_effect']:+.3g} (v{row['rank'] + 1}, {sign}v, "
        f"KL {row['kl']:.3g})<br>random: mean {row['random_mean']:.3g}, max "
        f"{row['random_max']:.3g}; ratio {row['ratio']:.3g} ({verdict})"
    )


def check_effect_map(atlas: SensitivityAtlas, effect_map: AtlasEffects) -> None:
    """Refuse an effect map that was not measured on this atlas's model and site."""
    if not isinstance(effect_map, AtlasEffects):
        raise TypeError(
            f"effect_map must be an AtlasEffects (from atlas_effects), got "
            f"{type(effect_map).__name__}"
        )
    mine = (
        atlas.n_layers,
        atlas.source_site,
        atlas.weights_fingerprint or effect_map.weights_fingerprint,
    )
    theirs = (effect_map.n_layers, effect_map.source_site, effect_map.weights_fingerprint)
    if mine != theirs:
        raise ValueError(
            "the effect map was measured on another atlas (layers, source site or model "
            f"weights differ: {theirs[:2]} there, {mine[:2]} here); measure it with "
            "atlas_effects(model, atlas, ...) on this atlas"
        )


@plain_ints
def plot_steerability(result: TransferResult, *, interval: float = 0.95) -> Any:
    """Steerability curves: held-out effect against KL budget, one line per method.

    Each point is the method's vector and sign chosen on the fit prompts at that budget,
    measured on the eval prompts (``TransferResult.to_pandas``), with its bootstrap
    interval; a star marks the budget chosen on the fit prompts. The shaded band runs
    from 0 to the random controls' 90th percentile of |effect| (at the hook of the first
    candidate), the dotted line is their mean: a point inside the band does no more than
    most random directions at the same KL. The ``"random"`` line is the best control
    chosen on the fit prompts, measured like the methods.
    """
    import plotly.graph_objects as go

    if not isinstance(result, TransferResult):
        raise TypeError(f"plot_steerability needs a TransferResult, got {type(result).__name__}")
    table = result.to_pandas(interval=interval)
    budgets = list(result.kl_budgets)
    fig = go.Figure()
    layer = result.layers[0]
    mean, q90 = result.random_band(layer, result.sites[0])
    fig.add_trace(
        go.Scatter(
            x=budgets + budgets[::-1],
            y=q90 + [0.0] * len(budgets),
            mode="lines",
            fill="toself",
            fillcolor="rgba(150,150,150,0.25)",
            line={"width": 0},
            hoverinfo="skip",
            name=f"random, 0 to 90th percentile (L{layer})",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=budgets,
            y=mean,
            mode="lines",
            line={"dash": "dot", "color": "grey"},
            name="random mean |effect|",
        )
    )
    for method in result.methods:
        rows = table[table["method"] == method]
        hover = [
            f"{r.vector} ({'+' if r.sign > 0 else '−'})<br>held-out effect {r.effect:.3g} "
            f"[{r.effect_low:.3g}, {r.effect_high:.3g}]<br>fit effect {r.fit_effect:.3g}"
            f"<br>ratio to random {r.ratio:.2f}<br>KL {r.kl:.3g}"
            for r in rows.itertuples()
        ]
        style = {"dash": "dash", "color": "grey"} if method == RANDOM else {}
        fig.add_trace(
            go.Scatter(
                x=rows["budget"],
                y=rows["effect"],
                mode="lines+markers",
                name=method,
                line=style,
                hovertext=hover,
                hoverinfo="text",
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": (rows["effect_high"] - rows["effect"]).tolist(),
                    "arrayminus": (rows["effect"] - rows["effect_low"]).tolist(),
                },
            )
        )
        chosen = rows[rows["chosen_budget"]]
        fig.add_trace(
            go.Scatter(
                x=chosen["budget"],
                y=chosen["effect"],
                mode="markers",
                marker={"symbol": "star", "size": 14, "color": "black"},
                showlegend=False,
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=(
            f"Held-out steerability ({result.metric}; {len(result.fit_prompts)} fit, "
            f"{len(result.eval_prompts)} eval prompts; ★ budget chosen on the fit prompts)"
        ),
        # Ticks at the budgets only: a log axis otherwise labels 0.05 as a bare "5".
        xaxis={
            "title": f"KL budget (nats, {result.kl_over.replace('_', ' ')})",
            "type": "log",
            "tickvals": budgets,
            "ticktext": [f"{b:g}" for b in budgets],
        },
        yaxis={"title": "held-out effect, in the direction chosen on the fit prompts"},
        height=520,
    )
    return fig


def plot_atlas(
    atlas: SensitivityAtlas,
    rank: int = 0,
    *,
    log: bool = True,
    effect_map: AtlasEffects | None = None,
) -> Any:
    """Heatmap of σ (one rank at a time) over (source, target) pairs; see the module docstring.

    Args:
        atlas: a ``SensitivityAtlas``.
        rank: the rank shown first (0 is σ1); the dropdown switches among all ranks.
        log: colour by log10 σ.
        effect_map: an ``AtlasEffects`` of this atlas (``atlas_effects``); adds two views,
            each pair's best effect at matched KL and its ratio to the random controls'
            mean, in which pairs that do not beat the random controls are grey.
    """
    import plotly.graph_objects as go

    if not isinstance(atlas, SensitivityAtlas):
        raise TypeError(f"plot_atlas needs a SensitivityAtlas, got {type(atlas).__name__}")
    if not is_int(rank) or not 0 <= rank < atlas.k:
        raise ValueError(f"rank must be an int in 0..{atlas.k - 1}, got {rank!r}")
    if effect_map is not None:
        check_effect_map(atlas, effect_map)
    sources, targets = atlas.sources, atlas.targets
    table = None if effect_map is None else effect_map.to_pandas().set_index(["source", "target"])

    def hover(s: int, t: int) -> str:
        text = _hover(atlas, s, t)
        if text and table is not None and (s, t) in table.index:
            text += _effect_hover(table.loc[(s, t)])
        return text

    # Rows are targets, columns sources: z[row][col] is the pair sources[col] -> targets[row].
    texts = [[hover(s, t) for s in sources] for t in targets]
    cells = [[[s, t] for s in sources] for t in targets]
    norms = atlas.source_norms.double()
    fig = go.Figure()
    # One dropdown entry per view: its label and the traces it shows.
    views: list[tuple[str, list[int]]] = []

    def add(z: list[list[float | None]], what: str, **style: Any) -> int:
        fig.add_trace(go.Heatmap(z=z, x=[f"L{s}" for s in sources], y=[f"L{t}" for t in targets],
                                 text=texts, hovertemplate="%{text}<extra></extra>", name=what,
                                 customdata=cells, visible=False, **style))  # fmt: skip
        return len(fig.data) - 1

    for view in ("raw", "normalised"):
        for r in range(atlas.k):
            z = atlas.singular_values[:, :, r].double()
            if view == "normalised":
                z = z / norms[:, None]
            z = z[sources][:, targets].T
            if log:
                z = torch.log10(z)
            what = f"σ{r + 1}" + (" / ‖source‖" if view == "normalised" else "")
            i = add([[None if v != v else float(v) for v in row] for row in z.tolist()], what,
                    colorscale="Viridis",
                    colorbar={"title": {"text": f"log10 {what}" if log else what}})  # fmt: skip
            views.append((f"σ{r + 1}" + (" ÷ source norm" if view == "normalised" else ""), [i]))
    if table is not None and effect_map is not None:
        for column, label, style in (
            ("best_effect", f"best effect at KL {effect_map.kl:g}",
             {"colorscale": "RdBu", "zmid": 0.0}),
            ("ratio", "best effect ÷ random mean", {"colorscale": "Viridis"}),
        ):  # fmt: skip

            def grid(active: bool, column: str = column) -> list[list[float | None]]:
                rows = []
                for t in targets:
                    row: list[float | None] = []
                    for s in sources:
                        found = (s, t) in table.index
                        entry = table.loc[(s, t)] if found else None
                        value = None if entry is None else float(entry[column])
                        keep = entry is not None and bool(entry["beats_random"]) == active
                        row.append(value if keep and value == value else None)
                    rows.append(row)
                return rows

            shown = add(grid(True), label, colorbar={"title": {"text": label}}, **style)
            # Pairs at random level, in one flat grey: inactive for this fork.
            grey = [[None if v is None else 0.0 for v in row] for row in grid(False)]
            muted = add(grey, "random level", colorscale=[[0, "#d0d0d0"], [1, "#d0d0d0"]],
                        showscale=False)  # fmt: skip
            views.append((label, [shown, muted]))
    for i in views[rank][1]:
        fig.data[i].visible = True
    buttons = []
    for label, traces in views:
        visible = [j in traces for j in range(len(fig.data))]
        buttons.append({"label": label, "method": "update", "args": [{"visible": visible}]})
    prompt = (atlas.prompts or ["(token ids)"])[0]
    more = f" (+{len(atlas.prompts) - 1} more)" if atlas.prompts and len(atlas.prompts) > 1 else ""
    method = atlas.method_label
    fig.update_layout(
        title={
            "text": f"{html.escape(atlas.model_name, quote=False)}: {atlas.source_site} -> "
            f"{atlas.target_site}, {method}<br><sub>{html.escape(prompt[:80], quote=False)}{more}</sub>"
        },
        xaxis={"title": {"text": "source layer"}, "type": "category"},
        yaxis={"title": {"text": "target layer"}, "type": "category"},
        updatemenus=[{"buttons": buttons, "active": rank, "x": 1.0, "y": 1.15, "xanchor": "right"}],
    )
    return fig


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" href="data:,">
<style>
body {{ font-family: sans-serif; margin: 1em; display: flex; gap: 1em; }}
#heatmap {{ width: 58%; }}
#panel {{ width: 40%; border-left: 1px solid #ccc; padding-left: 1em; }}
table {{ font-size: 0.85em; border-collapse: collapse; margin-bottom: 0.8em; }}
td, th {{ padding: 2px 6px; vertical-align: top; text-align: left; }}
table.vectors tr.vector-row {{ cursor: pointer; }}
table.vectors tr.vector-row:hover {{ background: #eef; }}
table.vectors tr.selected {{ background: #dde; }}
table.vectors tr.group td {{ font-style: italic; color: #555; border-top: 1px solid #ccc; }}
table.generations td:first-child {{ white-space: nowrap; font-weight: bold; }}
table.generations td {{ white-space: pre-wrap; }}
#live label {{ display: block; margin: 0.3em 0; }}
#live textarea {{ width: 100%; }}
#live-error {{ color: #b00; }}
#live-runs {{ display: flex; gap: 0.5em; }}
#live-runs .run {{ flex: 1; border: 1px solid #ccc; padding: 0.3em; font-size: 0.85em; white-space: pre-wrap; }}
</style></head>
<body>
<div id="heatmap">{figure}</div>
<div id="panel"><h2 id="panel-title">Click a cell</h2>
<p id="panel-text">Click a pair to see its spectrum and its vectors.</p><div id="spectrum"></div>
<div id="live"></div><div id="vectors"></div><div id="generations"></div></div>
<script id="atlas-data" type="application/json">{data}</script>
<script>{script}</script>
</body></html>
"""


def _finite(x: float) -> float | None:
    """JSON has no NaN: what was not measured is null."""
    return x if math.isfinite(x) else None


def _gap_groups(sigma: list[float]) -> list[list[int]]:
    """Ranks in runs whose neighbours are within ``GAP_WARNING`` of each other."""
    groups = [[0]]
    for r in range(1, len(sigma)):
        if sigma[r] > 0 and sigma[r - 1] / sigma[r] < GAP_WARNING:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def _map_payload(effect_map: AtlasEffects) -> dict[str, Any]:
    """What the page shows of an effect map: per pair its best vector against random,
    per vector and sign its numbers, and the generations."""
    pairs: dict[str, Any] = {}
    table = effect_map.to_pandas()
    for row in table.to_dict("records"):
        s, t = int(row["source"]), int(row["target"])
        norm = float(effect_map.source_norms[s])
        rows = {}
        for r in range(effect_map.top):
            for j, sign in enumerate(SIGNS):
                scale = float(effect_map.scales[s, t, r, j])
                rows[f"{r},{'+' if sign == 1 else '-'}"] = {
                    "relative": _finite(scale / norm) if norm > 0 else None,
                    "kl": _finite(float(effect_map.kls[s, t, r, j])),
                    "matched": bool(effect_map.matched[s, t, r, j]),
                    "effect": _finite(float(effect_map.effects[s, t, r, j])),
                }
        pairs[f"{s},{t}"] = {
            "best": _finite(row["best_effect"]),
            "rank": int(row["rank"]),
            "sign": int(row["sign"]),
            "ratio": _finite(row["ratio"]),
            "randomMean": _finite(row["random_mean"]),
            "randomMax": _finite(row["random_max"]),
            "beats": bool(row["beats_random"]),
            "rows": rows,
        }
    return {
        "kl": effect_map.kl,
        "answers": effect_map.answers,
        "tokens": effect_map.generated_tokens,
        "baseline": effect_map.generations.get("baseline"),
        "texts": {k: v for k, v in effect_map.generations.items() if k != "baseline"},
        "pairs": pairs,
    }


def atlas_page(
    atlas: SensitivityAtlas,
    *,
    effects: dict[str, Any] | None = None,
    effect_map: AtlasEffects | None = None,
    live: bool = False,
) -> str:
    """The atlas page's HTML (``atlas_html`` writes it). ``live`` adds the controls of
    ``tl-powersteer browse``, whose server answers the page's generation requests."""
    import plotly.io as pio

    fig = plot_atlas(atlas, effect_map=effect_map)
    figure = pio.to_html(fig, include_plotlyjs=True, full_html=False, div_id="atlas-heatmap")
    gaps = atlas.spectral_gap()
    pairs = {}
    for s, t in atlas.pairs():
        sig = atlas.singular_values[s, t]
        if not sig.isnan().any():
            sigma = [float(v) for v in sig]
            pairs[f"{s},{t}"] = {
                "sigma": sigma,
                "next": _finite(float(atlas.next_singular_value[s, t])),
                "gap": float(gaps[s, t]),
                "groups": _gap_groups(sigma),
            }
    payload = {
        "k": atlas.k,
        "gapWarning": GAP_WARNING,
        "pairs": pairs,
        "tokens": effects,
        "map": None if effect_map is None else _map_payload(effect_map),
        "live": None
        if not live
        else {
            "prompt": (atlas.prompts or [""])[0],
            "kl": effect_map.kl if effect_map is not None else 0.5,
            "tokens": (effect_map.generated_tokens if effect_map is not None else 0) or 20,
        },
    }
    # "</" would end the <script> element early; JSON allows the escaped form.
    data = json.dumps(payload, allow_nan=False).replace("</", "<\\/")
    script = (resources.files(__package__) / "atlas_page.js").read_text(encoding="utf-8")
    title = html.escape(f"Sensitivity atlas: {atlas.model_name}")
    return _PAGE.format(title=title, figure=figure, data=data, script=script)


@plain_ints
def atlas_html(
    atlas: SensitivityAtlas,
    path: str | os.PathLike[str],
    *,
    effects: dict[str, Any] | None = None,
    effect_map: AtlasEffects | None = None,
) -> Path:
    """Write the atlas browser (see the module docstring) to ``path``, atomically.

    ``effects`` (from ``token_effects``) adds each vector's most promoted and suppressed
    next tokens, both signs, to the panel. ``effect_map`` (from ``atlas_effects``) adds
    the heatmap views of the best effect and its ratio to random directions, each
    vector's effect at matched KL, and, where it holds them, generations on a click.
    """
    path = check_destination(path, ".html", "the atlas page path")
    page = atlas_page(atlas, effects=effects, effect_map=effect_map)
    with atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


@dataclass(frozen=True)
class AtlasFrame:
    """A written atlas page shown in a notebook cell (``atlas_frame``)."""

    path: Path
    height: int

    def _repr_html_(self) -> str:
        # srcdoc, not src: the page file need not lie where the notebook server serves
        # files, and the page keeps its own document (its ids and scripts stay apart from
        # the notebook's).
        page = html.escape(self.path.read_text(encoding="utf-8"), quote=True)
        return (
            f'<iframe srcdoc="{page}" style="width: 100%; height: {self.height}px; '
            'border: 0" sandbox="allow-scripts"></iframe>'
        )


@plain_ints
def atlas_frame(path: str | os.PathLike[str], *, height: int = 900) -> AtlasFrame:
    """The atlas page written at ``path`` (``atlas_html``) as the value of a notebook cell:
    the whole page, heatmap and panel, in a frame ``height`` pixels high.

    >>> frame = atlas_frame(page_path)  # doctest: +SKIP
    >>> frame  # the cell shows the page  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix != ".html" or not path.is_file():
        raise ValueError(f"{str(path)!r} is no atlas page: write one with atlas_html first")
    if not is_int(height) or height < 100:
        raise ValueError(f"height must be an int of at least 100 pixels, got {height!r}")
    return AtlasFrame(path, height)
