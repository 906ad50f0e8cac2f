// The atlas page's panel: a clicked pair's spectrum, its vectors by sign, and a vector's
// generations. Every text from the data (tokens, generations, prompts) is set with
// textContent, never as markup.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("atlas-data").textContent);
  const plot = document.querySelector("#heatmap .plotly-graph-div");
  const nats = (kl) => kl + (kl === 1 ? " nat" : " nats");
  // Numbers the page could not measure come as null.
  const num = (x, digits) => (x === null ? "n/a" : x.toPrecision(digits));
  const signed = (x, digits) => (x === null ? "n/a" : (x >= 0 ? "+" : "") + x.toPrecision(digits));
  const el = (tag, text, cls) => {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  };
  const listed = (moves) =>
    moves
      .map(([text, dp, dl]) => JSON.stringify(text) + " " + signed(dp, 2) + " (" + signed(dl, 3) + ")")
      .join(", ");

  function spectrum(pair) {
    // Bars of one group share a colour: past a small gap the vectors are one subspace.
    const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    const colour = [];
    pair.groups.forEach((group, g) => group.forEach(() => colour.push(palette[g % palette.length])));
    const x = pair.sigma.map((_, i) => "σ" + (i + 1)).concat(["σ" + (pair.sigma.length + 1)]);
    Plotly.newPlot("spectrum", [{
      type: "bar", x: x, y: pair.sigma.concat([pair.next]),
      marker: {color: colour.concat(["#d0d0d0"])},
      hovertemplate: "%{x} = %{y:.4g}<extra></extra>",
    }], {title: {text: "singular values (one colour: one group; grey: the next, not kept)"},
         height: 300, margin: {t: 40, b: 30}});
  }

  function groupLabel(pair, group) {
    const first = group[0] + 1, last = group[group.length - 1] + 1;
    if (group.length === 1) return "v" + first;
    const ratios = group.slice(0, -1).map((r) => (pair.sigma[r] / pair.sigma[r + 1]).toFixed(3));
    return "v" + first + "–v" + last + ": one group (σ ratios " + ratios.join(", ") +
      " < " + data.gapWarning + "): any mix of them is about as sensitive, so do not read " +
      "them one by one";
  }

  function showGenerations(key, caption, pairKey) {
    const box = document.getElementById("generations");
    box.replaceChildren();
    const map = data.map;
    if (!map || map.baseline === null) {
      box.appendChild(el("p", "No generations were made for this page (generate=0)."));
      return;
    }
    box.appendChild(el("h3", "Generations: " + caption));
    box.appendChild(el("p", "Greedy continuation of the first prompt, " + map.tokens +
      " new tokens, the vector added at every token at its scale for " + nats(map.kl) + ":"));
    const table = el("table", undefined, "generations");
    const add = (label, text, id) => {
      const row = table.insertRow();
      row.insertCell().textContent = label;
      const cell = row.insertCell();
      cell.id = id;
      cell.textContent = text === undefined ? "(not generated)" : text;
    };
    add("unsteered", map.baseline, "gen-base");
    add(caption, map.texts[key], "gen-steered");
    const [s] = pairKey.split(",");
    const sign = key.endsWith("+") ? "+" : "-";
    const control = s + ",random,0," + sign;
    if (map.texts[control] !== undefined) {
      add("random direction #0, " + sign + ", same KL", map.texts[control], "gen-random");
    }
    box.appendChild(table);
  }

  function vectorTable(s, t, pair) {
    const box = document.getElementById("vectors");
    box.replaceChildren();
    const key = s + "," + t;
    const tokens = data.tokens && data.tokens.pairs[key];
    const map = data.map;
    const measured = map && map.pairs[key];
    if (!tokens && !measured && !data.live) return;
    const notes = [];
    if (measured) {
      notes.push("Effect: change of logit(" + JSON.stringify(map.answers[0]) + ") − logit(" +
        JSON.stringify(map.answers[1]) + ") at the last token, each vector and sign scaled to " +
        nats(map.kl) + " of next-token KL.");
    }
    if (tokens) {
      notes.push("Tokens: next tokens whose probability rose and fell most (change of " +
        "probability, then of logit) at " + nats(data.tokens.kl) + ".");
    }
    notes.push("Scale in typical norms of the source activation. Click a row for its " +
      (data.live ? "generation, computed now with the settings above." : "generations."));
    box.appendChild(el("p", notes.join(" ")));
    const table = el("table", undefined, "vectors");
    const head = table.createTHead().insertRow();
    const columns = ["vector", "sign", "scale", "KL", "effect"];
    if (tokens) columns.push("promoted", "suppressed");
    columns.forEach((h) => head.appendChild(el("th", h)));
    const body = table.createTBody();
    pair.groups.forEach((group) => {
      if (group.length > 1) {
        const row = body.insertRow();
        row.className = "group";
        const cell = row.insertCell();
        cell.colSpan = columns.length;
        cell.textContent = groupLabel(pair, group);
      }
      group.forEach((r) => {
        ["+", "-"].forEach((sign) => {
          const rowKey = s + "," + t + "," + r + "," + sign;
          const fromMap = measured && measured.rows[r + "," + sign];
          const fromTokens = tokens && tokens[r] && tokens[r][sign];
          if (!fromMap && !fromTokens && !data.live) return;
          const row = body.insertRow();
          row.className = "vector-row";
          row.dataset.key = rowKey;
          const where = fromMap || fromTokens || {relative: null, kl: null};
          row.insertCell().textContent = "v" + (r + 1);
          row.insertCell().textContent = sign + "v";
          row.insertCell().textContent = num(where.relative, 2);
          row.insertCell().textContent = num(where.kl, 2) + (fromMap && !fromMap.matched ? " (not reached)" : "");
          row.insertCell().textContent = fromMap ? signed(fromMap.effect, 3) : "";
          if (tokens) {
            row.insertCell().textContent = fromTokens ? listed(fromTokens.promoted) : "";
            row.insertCell().textContent = fromTokens ? listed(fromTokens.suppressed) : "";
          }
          row.addEventListener("click", () => {
            body.querySelectorAll("tr.selected").forEach((other) => other.classList.remove("selected"));
            row.classList.add("selected");
            const caption = "L" + s + " -> L" + t + " v" + (r + 1) + ", " + sign + "v";
            if (data.live) {
              liveGenerate(s, t, r, sign, caption);
            } else {
              showGenerations(rowKey, caption, key);
            }
          });
        });
      });
    });
    box.appendChild(table);
  }

  // Live mode (tl-powersteer browse): the server generates on demand, one request at a time.
  const token = new URLSearchParams(window.location.search).get("token") || "";
  const runs = [];
  let pending = 0;

  function liveForm() {
    const box = document.getElementById("live");
    box.appendChild(el("h3", "Generate live"));
    const field = (label, input) => {
      const wrap = el("label", label);
      wrap.appendChild(input);
      box.appendChild(wrap);
      return input;
    };
    const prompt = el("textarea");
    prompt.id = "live-prompt";
    prompt.rows = 3;
    prompt.value = data.live.prompt;
    field("prompt ", prompt);
    const kl = el("input");
    kl.id = "live-kl";
    kl.type = "number";
    kl.step = "any";
    kl.value = data.live.kl;
    field("KL budget, nats ", kl);
    const tokens = el("input");
    tokens.id = "live-tokens";
    tokens.type = "number";
    tokens.value = data.live.tokens;
    field("new tokens ", tokens);
    box.appendChild(el("p", "Click a pair, then a vector's row: its generation appears below, " +
      "up to three side by side.", "hint"));
    const status = el("div", "idle");
    status.id = "live-status";
    box.appendChild(status);
    const error = el("div");
    error.id = "live-error";
    box.appendChild(error);
    const shown = el("div");
    shown.id = "live-runs";
    box.appendChild(shown);
  }

  function showRuns() {
    const box = document.getElementById("live-runs");
    box.replaceChildren();
    runs.forEach((run) => {
      const card = el("div", undefined, "run");
      card.appendChild(el("b", run.caption));
      card.appendChild(el("div", "KL " + nats(run.kl) + ", absolute scale " + num(run.scale, 3) +
        "; prompt " + JSON.stringify(run.prompt)));
      card.appendChild(el("div", "unsteered: " + run.baseline, "run-base"));
      card.appendChild(el("div", "steered: " + run.text, "run-text"));
      box.appendChild(card);
    });
  }

  async function pollStatus() {
    const status = document.getElementById("live-status");
    while (pending > 0) {
      try {
        const answer = await fetch("/api/status?token=" + encodeURIComponent(token));
        const state = await answer.json();
        if (pending > 0) {
          status.textContent = "busy: computing" + (state.waiting ? ", " + state.waiting +
            " waiting" : "");
        }
      } catch (err) {
        // The answer to the request itself reports a lost server.
      }
      await new Promise((done) => setTimeout(done, 300));
    }
    status.textContent = "idle";
  }

  async function liveGenerate(s, t, rank, sign, caption) {
    const error = document.getElementById("live-error");
    error.textContent = "";
    const request = {
      source: s, target: t, rank: rank, sign: sign === "+" ? 1 : -1,
      prompt: document.getElementById("live-prompt").value,
      kl: Number(document.getElementById("live-kl").value),
      tokens: Number(document.getElementById("live-tokens").value),
    };
    pending += 1;
    if (pending === 1) pollStatus();
    try {
      const answer = await fetch("/api/generate?token=" + encodeURIComponent(token), {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify(request),
      });
      const result = await answer.json();
      if (!answer.ok) {
        error.textContent = result.error || ("the server answered " + answer.status);
        return;
      }
      runs.unshift({caption: caption, kl: request.kl, prompt: request.prompt, ...result});
      runs.splice(3);
      showRuns();
    } catch (err) {
      error.textContent = "no answer from the server (is tl-powersteer browse still running?)";
    } finally {
      pending -= 1;
    }
  }

  if (data.live) liveForm();

  plot.on("plotly_click", function (event) {
    const [s, t] = event.points[0].customdata;
    const pair = data.pairs[s + "," + t];
    document.getElementById("panel-title").textContent = "L" + s + " -> L" + t;
    const text = document.getElementById("panel-text");
    document.getElementById("generations").replaceChildren();
    document.getElementById("vectors").replaceChildren();
    if (!pair) {
      text.textContent = "Not computed.";
      Plotly.purge("spectrum");
      return;
    }
    const lines = ["gap σ" + data.k + "/σ" + (data.k + 1) + " = " + pair.gap.toFixed(3)];
    const measured = data.map && data.map.pairs[s + "," + t];
    if (measured && measured.rank >= 0) {
      lines.push("best effect " + signed(measured.best, 3) + " (v" + (measured.rank + 1) + ", " +
        (measured.sign > 0 ? "+" : "-") + "v) against random directions at this source: mean " +
        num(measured.randomMean, 3) + ", max " + num(measured.randomMax, 3) +
        " (ratio " + num(measured.ratio, 3) + "): " +
        (measured.beats ? "beats random" : "random level, inactive for this fork"));
    } else if (measured) {
      lines.push("no vector reached the KL budget");
    }
    text.textContent = lines.join("; ");
    spectrum(pair);
    vectorTable(s, t, pair);
  });
})();
