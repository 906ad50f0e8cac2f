"""Figures and pages from results: pure functions, no computation beyond arithmetic.

``plot_atlas`` draws a sensitivity atlas as a heatmap (source layer on x, target layer on
y, σ of one rank as colour, log10 by default) with a dropdown that switches the rank and
the view: raw σ, or σ divided by the source activation's typical norm, which makes layers
of different scale comparable. Hovering a cell shows its pair (``L3 -> L8``), σ1..σk and
the spectral gap σ_k/σ_{k+1}; pairs whose gap is under ``GAP_WARNING`` are flagged, since
their k-th vector is not separated from the next and should not be trusted on its own.

``atlas_html`` writes one self-contained page (plotly.js inlined, works offline): the
heatmap, and a side panel that shows the clicked pair's spectrum as a bar chart and, when
token effects are given, each vector's most promoted and suppressed next tokens for both
signs at a scale of about equal next-token KL. Prompt, model and token text is HTML-escaped
or set as plain text, never as markup.

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
import os
from pathlib import Path
from typing import Any

import torch

from .atlas import SensitivityAtlas
from .checks import is_int, plain_ints
from .io import atomic_file, check_destination

__all__ = ["GAP_WARNING", "atlas_html", "plot_atlas"]

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


@plain_ints
def plot_atlas(atlas: SensitivityAtlas, rank: int = 0, *, log: bool = True) -> Any:
    """Heatmap of σ (one rank at a time) over (source, target) pairs; see the module docstring.

    Args:
        atlas: a ``SensitivityAtlas``.
        rank: the rank shown first (0 is σ1); the dropdown switches among all ranks.
        log: colour by log10 σ.
    """
    import plotly.graph_objects as go

    if not isinstance(atlas, SensitivityAtlas):
        raise TypeError(f"plot_atlas needs a SensitivityAtlas, got {type(atlas).__name__}")
    if not is_int(rank) or not 0 <= rank < atlas.k:
        raise ValueError(f"rank must be an int in 0..{atlas.k - 1}, got {rank!r}")
    sources, targets = atlas.sources, atlas.targets
    # Rows are targets, columns sources: z[row][col] is the pair sources[col] -> targets[row].
    hover = [[_hover(atlas, s, t) for s in sources] for t in targets]
    norms = atlas.source_norms.double()
    views = []
    for view in ("raw", "normalised"):
        for r in range(atlas.k):
            z = atlas.singular_values[:, :, r].double()
            if view == "normalised":
                z = z / norms[:, None]
            z = z[sources][:, targets].T
            if log:
                z = torch.log10(z)
            views.append(
                (view, r, [[None if v != v else float(v) for v in row] for row in z.tolist()])
            )

    fig = go.Figure()
    for view, r, cells in views:
        what = f"σ{r + 1}" + (" / ‖source‖" if view == "normalised" else "")
        fig.add_trace(
            go.Heatmap(
                z=cells,
                x=[f"L{s}" for s in sources],
                y=[f"L{t}" for t in targets],
                text=hover,
                hovertemplate="%{text}<extra></extra>",
                colorscale="Viridis",
                colorbar={"title": {"text": f"log10 {what}" if log else what}},
                visible=(view == "raw" and r == rank),
                name=what,
                customdata=[[[s, t] for s in sources] for t in targets],
            )
        )
    buttons = []
    for i, (view, r, _) in enumerate(views):
        label = f"σ{r + 1}" + (" ÷ source norm" if view == "normalised" else "")
        visible = [j == i for j in range(len(views))]
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
<style>
body {{ font-family: sans-serif; margin: 1em; display: flex; gap: 1em; }}
#heatmap {{ width: 64%; }}
#panel {{ width: 34%; border-left: 1px solid #ccc; padding-left: 1em; }}
table.effect {{ font-size: 0.85em; margin-bottom: 0.8em; border-collapse: collapse; }}
table.effect td {{ padding: 1px 6px; vertical-align: top; }}
table.effect caption {{ text-align: left; font-weight: bold; }}
</style></head>
<body>
<div id="heatmap">{figure}</div>
<div id="panel"><h2 id="panel-title">Click a cell</h2>
<p id="panel-text">Click a pair to see its spectrum.</p><div id="spectrum"></div>
<div id="effects"></div></div>
<script id="atlas-data" type="application/json">{data}</script>
<script>
(function () {{
  const data = JSON.parse(document.getElementById("atlas-data").textContent);
  const plot = document.querySelector("#heatmap .plotly-graph-div");
  plot.on("plotly_click", function (event) {{
    const [s, t] = event.points[0].customdata;
    const pair = data.pairs[s + "," + t];
    const title = document.getElementById("panel-title");
    const text = document.getElementById("panel-text");
    title.textContent = "L" + s + " -> L" + t;
    if (!pair) {{ text.textContent = "Not computed."; return; }}
    text.textContent = "gap σ" + data.k + "/σ" + (data.k + 1) + " = " + pair.gap.toFixed(3);
    Plotly.newPlot("spectrum", [{{type: "bar", x: pair.sigma.map((_, i) => "σ" + (i + 1)),
      y: pair.sigma}}], {{title: {{text: "singular values"}}, height: 320}});
    const box = document.getElementById("effects");
    box.replaceChildren();
    const vectors = data.effects && data.effects.pairs[s + "," + t];
    if (!vectors) {{ return; }}
    const note = document.createElement("p");
    note.textContent = "Next tokens whose probability at the last token rose and fell " +
      "most (change of probability, then of logit), each vector added " +
      "with each sign at the scale where the next-token KL is " + data.effects.kl +
      (data.effects.kl === 1 ? " nat" : " nats") +
      " (searched to within 10%; scale in typical norms of the source activation):";
    box.appendChild(note);
    vectors.forEach(function (effect, i) {{
      const table = document.createElement("table");
      table.className = "effect";
      const caption = table.createCaption();
      caption.textContent = "v" + (i + 1) + ": +v at " + effect["+"].relative.toPrecision(2) +
        " (KL " + effect["+"].kl.toPrecision(2) + "), -v at " +
        effect["-"].relative.toPrecision(2) + " (KL " + effect["-"].kl.toPrecision(2) + ")";
      ["+", "-"].forEach(function (sign) {{
        ["promoted", "suppressed"].forEach(function (kind) {{
          const row = table.insertRow();
          row.insertCell().textContent = sign + "v " + kind;
          row.insertCell().textContent = effect[sign][kind]
            .map(([text, dp, dl]) => JSON.stringify(text) + " " + (dp >= 0 ? "+" : "") +
              dp.toPrecision(2) + " (" + (dl >= 0 ? "+" : "") + dl.toPrecision(3) + ")")
            .join(", ");
        }});
      }});
      box.appendChild(table);
    }});
  }});
}})();
</script>
</body></html>
"""


@plain_ints
def atlas_html(
    atlas: SensitivityAtlas,
    path: str | os.PathLike[str],
    *,
    effects: dict[str, Any] | None = None,
) -> Path:
    """Write the atlas browser (see the module docstring) to ``path``, atomically.

    ``effects`` (from ``token_effects``) adds each vector's most
    promoted and suppressed next tokens, both signs, to the panel.
    """
    import plotly.io as pio

    path = check_destination(path, ".html", "the atlas page path")
    fig = plot_atlas(atlas)
    figure = pio.to_html(fig, include_plotlyjs=True, full_html=False, div_id="atlas-heatmap")
    gaps = atlas.spectral_gap()
    pairs = {}
    for s, t in atlas.pairs():
        sig = atlas.singular_values[s, t]
        if not sig.isnan().any():
            pairs[f"{s},{t}"] = {"sigma": [float(v) for v in sig], "gap": float(gaps[s, t])}
    # "</" would end the <script> element early; JSON allows the escaped form.
    payload = {"k": atlas.k, "pairs": pairs, "effects": effects}
    data = json.dumps(payload).replace("</", "<\\/")
    title = html.escape(f"Sensitivity atlas: {atlas.model_name}")
    page = _PAGE.format(title=title, figure=figure, data=data)
    with atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
