// ProLoRA Transfer: web panels for the node pack.
//  * Match Modules (ProLoRAMatchModules): after a run, the match report on the node: counts, threshold, the
//    LoRA's modules by fate (they add up) with the similarity-pairing hint, a heat strip of Φ per module
//    (model order, grouped by block, both as sent by the node) and a table with pass/skip colouring.
//  * Compare (ProLoRACompare): a side-by-side view of two branches with a slider that reveals one over
//    the other, from the images the node saved to ComfyUI's temp folder.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MATCH_NODE = "ProLoRAMatchModules";
const COMPARE_NODE = "ProLoRACompare";
const MATCH_WIDGET = "prolora_match_report";
const COMPARE_WIDGET = "prolora_compare_view";

const CSS = `
.prolora-panel { box-sizing: border-box; width: 100%; height: 100%; overflow: auto; padding: 6px 8px;
  font: 12px/1.35 system-ui, sans-serif; color: #ddd; background: #1b1b1b; border-radius: 6px; }
.prolora-panel .prolora-empty { color: #888; font-style: italic; }
.prolora-head { display: flex; flex-wrap: wrap; gap: 4px 12px; margin-bottom: 4px; }
.prolora-head b { color: #fff; }
.prolora-pass { color: #5fd35f; } .prolora-skip { color: #ff6b6b; } .prolora-hint { color: #ffd166; }
.prolora-strip { display: flex; flex-wrap: wrap; gap: 1px; margin: 4px 0 6px; align-items: flex-end; }
.prolora-strip .cell { width: 11px; height: 16px; border-bottom: 3px solid transparent; }
.prolora-strip .cell.pass { border-bottom-color: #2ca02c; } .prolora-strip .cell.skip { border-bottom-color: #d62728; }
.prolora-strip .sep { width: 4px; }
.prolora-table { border-collapse: collapse; width: 100%; table-layout: fixed; font-variant-numeric: tabular-nums; }
.prolora-table th { position: sticky; top: -6px; background: #262626; text-align: left; font-weight: 600; padding: 2px 4px; }
.prolora-table td { padding: 1px 4px; border-top: 1px solid #2c2c2c; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.prolora-table tr.pass td.status { color: #5fd35f; } .prolora-table tr.skip td.status { color: #ff6b6b; }
.prolora-table tr.skip td.key { color: #ffb3b3; }
.prolora-bar { display: inline-block; height: 8px; border-radius: 2px; vertical-align: middle; }
.prolora-cmp-bar { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; margin-bottom: 4px; }
.prolora-cmp-bar select { background: #2a2a2a; color: #ddd; border: 1px solid #444; border-radius: 3px; font-size: 12px; }
.prolora-stage { position: relative; width: 100%; background: #111; user-select: none; }
.prolora-stage img { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: contain; pointer-events: none; }
.prolora-stage .divider { position: absolute; top: 0; bottom: 0; width: 2px; background: #fff; box-shadow: 0 0 3px #000; pointer-events: none; }
.prolora-stage .tag { position: absolute; top: 4px; padding: 1px 5px; background: rgba(0,0,0,.6); border-radius: 3px; font-size: 11px; }
.prolora-slider { width: 100%; margin: 4px 0; }
.prolora-dist { color: #bbb; }
`;

function injectStyle() {
  if (document.getElementById("prolora-style")) return;
  const style = document.createElement("style");
  style.id = "prolora-style";
  style.textContent = CSS;
  document.head.appendChild(style);
}

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(d));
const phiOf = (r) => (r.phi_u === null || r.phi_v === null ? null : Math.min(r.phi_u, r.phi_v));
const shortKey = (k) => k.replace(/^diffusion_model\./, "").replace(/\.weight$/, "");

// viridis, a few anchors
const VIRIDIS = [[0, [68, 1, 84]], [0.25, [59, 82, 139]], [0.5, [33, 145, 140]], [0.75, [94, 201, 98]], [1, [253, 231, 37]]];
function viridis(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "#555";
  v = Math.max(0, Math.min(1, v));
  for (let i = 1; i < VIRIDIS.length; i++) {
    const [b, cb] = VIRIDIS[i];
    const [a, ca] = VIRIDIS[i - 1];
    if (v <= b) {
      const t = (v - a) / (b - a);
      return `rgb(${ca.map((x, j) => Math.round(x + t * (cb[j] - x))).join(",")})`;
    }
  }
  return "rgb(253,231,37)";
}

function renderMatch(panel, data) {
  panel.replaceChildren();
  const rows = data.rows || [];
  const skipped = rows.length - data.passing;
  panel.append(
    h("div", { class: "prolora-head" },
      h("span", {}, h("b", { "data-field": "passing", class: "prolora-pass" }, data.passing), " / ",
        h("b", { "data-field": "modules" }, data.modules), " modules pass"),
      h("span", {}, "threshold Φ ≥ ", h("b", { "data-field": "threshold" }, data.threshold)),
      h("span", {}, "skipped ", h("b", { "data-field": "skipped", class: skipped ? "prolora-skip" : "" }, skipped)),
      h("span", {}, "pairing ", h("b", { "data-field": "pairing" }, data.pairing)),
      data.unmapped && data.unmapped.length ? h("span", { class: "prolora-skip", title: data.unmapped.join("\n") },
        `unmapped LoRA modules: ${data.unmapped.length}`) : null));
  // the LoRA's modules by fate (they add up to its module count), and the similarity-pairing hint
  if (data.groups && data.lora_modules != null) {
    panel.append(h("div", { class: "prolora-head", "data-field": "groups", title: "every module of the LoRA, by what happens to it" },
      h("span", {}, "LoRA modules ", h("b", { "data-field": "lora_modules" }, data.lora_modules), ":"),
      Object.entries(data.groups).map(([label, n]) => h("span", { "data-group": label }, h("b", {}, n), ` ${label}`))));
    if (data.similarity_may_place) {
      panel.append(h("div", { class: "prolora-head prolora-hint", "data-field": "similarity_may_place" },
        `similarity pairing may place ${data.similarity_may_place} of the skipped modules (pairing = similarity)`));
    }
  }

  // heat strip in model order, a gap between blocks: the order and block labels come with the rows
  // (computed once in Python, nodes/blocks.py with_blocks, the same grouping as the Report picture)
  const ordered = [...rows].sort((x, y) => x.order - y.order);
  const strip = h("div", { class: "prolora-strip", title: "Φ per module in model order (colour: Φ; underline: green transferred, red skipped)" });
  let last = null;
  for (const r of ordered) {
    if (last !== null && r.block !== last) strip.append(h("span", { class: "sep" }));
    last = r.block;
    const phi = phiOf(r);
    strip.append(h("span", {
      class: `cell ${r.passes ? "pass" : "skip"}`, style: { background: viridis(phi) }, "data-block": r.block,
      title: `${r.block} · ${shortKey(r.source)}\nΦ_U ${fmt(r.phi_u)}  Φ_V ${fmt(r.phi_v)}  chance ${fmt(r.chance)}\n${r.reason}`,
    }));
  }
  panel.append(strip);

  // table: lowest Φ first (the skipped ones are what needs a look)
  const byPhi = [...rows].sort((a, b) => (a.passes - b.passes) || ((phiOf(a) ?? -1) - (phiOf(b) ?? -1)));
  const widths = ["38%", "17%", "10%", "10%", "12%", "13%"];
  const table = h("table", { class: "prolora-table" },
    h("colgroup", {}, widths.map((w) => h("col", { style: { width: w } }))),
    h("thead", {}, h("tr", {}, ["module", "Φ", "Φ_U", "Φ_V", "chance", "status"].map((t) => h("th", {}, t)))));
  const body = h("tbody");
  for (const r of byPhi) {
    const phi = phiOf(r);
    body.append(h("tr", { class: r.passes ? "pass" : "skip", "data-source": r.source },
      h("td", { class: "key", title: r.target && r.target !== r.source ? `${r.source} → ${r.target}` : r.source },
        (r.repaired ? "↻ " : "") + shortKey(r.source)),
      h("td", {}, h("span", { class: "prolora-bar", style: { width: `${Math.round(28 * (phi ?? 0))}px`, background: viridis(phi) } }), " ", fmt(phi, 2)),
      h("td", {}, fmt(r.phi_u, 2)), h("td", {}, fmt(r.phi_v, 2)), h("td", { title: `k = ${r.k ?? "–"}` }, fmt(r.chance, 2)),
      h("td", { class: "status", title: r.reason }, r.passes ? "transfer" : "skip")));
  }
  table.append(body);
  panel.append(table);
}

function viewURL(img) {
  const params = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder || "", type: img.type || "temp" });
  return api.apiURL(`/view?${params}${app.getPreviewFormatParam ? app.getPreviewFormatParam() : ""}&r=${Date.now()}`);
}

function renderCompare(panel, data, images) {
  panel.replaceChildren();
  const labels = data.labels || [];
  const index = data.index || [];
  const [ch, cw] = data.cell || [1, 1];
  const state = { a: 0, b: Math.min(1, labels.length - 1), item: 0, pos: 50 };
  const pick = (which) => {
    const sel = h("select", { "data-field": which });
    labels.forEach((l, i) => sel.append(h("option", { value: i, selected: i === state[which] }, l)));
    sel.addEventListener("change", () => { state[which] = +sel.value; update(); });
    return sel;
  };
  const maxItems = Math.max(1, ...index.map((ix) => ix.length));
  const itemSel = h("select", { "data-field": "item" });
  for (let i = 0; i < maxItems; i++) itemSel.append(h("option", { value: i }, `item ${i + 1}`));
  itemSel.addEventListener("change", () => { state.item = +itemSel.value; update(); });

  const under = h("img", { alt: "" });
  const over = h("img", { alt: "" });
  const divider = h("div", { class: "divider" });
  const tagA = h("span", { class: "tag", style: { left: "4px" } });
  const tagB = h("span", { class: "tag", style: { right: "4px" } });
  const stage = h("div", { class: "prolora-stage", style: { aspectRatio: `${cw} / ${ch}` } }, under, over, divider, tagA, tagB);
  const slider = h("input", { type: "range", min: 0, max: 100, value: state.pos, class: "prolora-slider", "data-field": "slider",
    title: "Drag: left of the line shows the left branch, right of it the right branch" });
  slider.addEventListener("input", () => { state.pos = +slider.value; place(); });
  const dist = h("div", { class: "prolora-dist", "data-field": "distance" });

  function place() {
    over.style.clipPath = `inset(0 0 0 ${state.pos}%)`;
    divider.style.left = `calc(${state.pos}% - 1px)`;
  }
  function src(branch) {
    const ix = index[branch] || [];
    const i = ix[Math.min(state.item, ix.length - 1)];
    return i === undefined ? null : images[i];
  }
  function update() {
    const a = src(state.a), b = src(state.b);
    under.src = a ? viewURL(a) : "";
    over.src = b ? viewURL(b) : "";
    tagA.textContent = labels[state.a] ?? "";
    tagB.textContent = labels[state.b] ?? "";
    const [i, j] = [Math.min(state.a, state.b), Math.max(state.a, state.b)];
    const p = (data.pairs || []).find((q) => q.a === i && q.b === j);
    dist.textContent = p ? `${labels[i]} vs ${labels[j]}: rmse ${fmt(p.rmse, 4)} · colour ${fmt(p.colour, 4)} · structure ${fmt(p.structure, 4)}`
      : (i === j ? "same branch on both sides" : "");
    place();
  }
  panel.append(h("div", { class: "prolora-cmp-bar" }, "left", pick("a"), "right", pick("b"), maxItems > 1 ? itemSel : null), stage, slider, dist);
  update();
}

function addPanel(node, name, emptyText, minHeight) {
  injectStyle();
  const panel = h("div", { class: "prolora-panel" }, h("div", { class: "prolora-empty" }, emptyText));
  panel.dataset.prolora = name;
  const widget = node.addDOMWidget(name, "prolora-panel", panel, {
    serialize: false, hideOnZoom: false, getMinHeight: () => node.__proloraMinHeight ?? minHeight,
  });
  widget.serialize = false;
  // keep wheel scrolling inside the panel instead of zooming the canvas
  panel.addEventListener("wheel", (e) => { if (panel.scrollHeight > panel.clientHeight) e.stopPropagation(); }, { passive: true });
  return { panel, widget };
}

function grow(node, width, minHeight) {
  node.__proloraMinHeight = minHeight;
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], width, size[0]), Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

/** Give every node of ``nodeType`` a panel (created empty) that ``render(node, panel, data, output)``
 * fills from the node's ``output[key][0]`` after each run. */
function attachPanel(nodeType, widget, emptyText, key, render) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const r = onNodeCreated?.apply(this, arguments);
    this.__prolora = addPanel(this, widget, emptyText, 60);
    return r;
  };
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    const data = output?.[key]?.[0];
    if (!data || !this.__prolora) return;
    this.__prolora.panel.dataset.node = String(this.id);
    render(this, this.__prolora.panel, data, output);
  };
}

app.registerExtension({
  name: "prolora.transfer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === MATCH_NODE) {
      attachPanel(nodeType, MATCH_WIDGET, "Run the workflow to see the match report here.", "prolora_match", (node, panel, data) => {
        renderMatch(panel, data);
        grow(node, 460, Math.min(360, 90 + 20 * (data.rows?.length ?? 0)));
      });
    } else if (nodeData.name === COMPARE_NODE) {
      attachPanel(nodeType, COMPARE_WIDGET, "Run the workflow to compare the branches here.", "prolora_compare", (node, panel, data, output) => {
        renderCompare(panel, data, output.images || []);
        const [ch, cw] = data.cell || [1, 1];
        const width = Math.max(node.size[0], 380);
        grow(node, 380, Math.min(720, Math.round(110 + (width - 40) * ch / cw)));
      });
    }
  },
});
