// The live page of mulo's gateway (docs/http.md): streams POST /v1/images/generations with
// "stream": true and draws each committed block, tinted by what happened to its tokens.
"use strict";

const FATES = {
  accepted: "rgba(0,170,60,0.45)",
  resampled: "rgba(230,20,20,0.5)",
  expanded: "rgba(255,160,0,0.5)",
  target: "rgba(40,90,255,0.35)",
};
let grid = { rows: 16, cols: 16 };
const $ = (id) => document.getElementById(id);

async function loadModels() {
  const r = await fetch("/v1/models", { headers: auth() });
  if (!r.ok) {
    $("family").textContent = r.status === 401
      ? "This gateway checks tokens: enter one to see its family."
      : `GET /v1/models answered ${r.status}.`;
    return false;
  }
  const m = (await r.json()).data[0];
  grid = m.grid;
  $("family").textContent =
    `Family ${m.id}: ${m.size} images, ${m.grid.rows}×${m.grid.cols} tokens, ` +
    `${m.condition}-conditioned; default ${m.default_method}.`;
  return true;
}

function auth() {
  const t = $("token").value.trim();
  return t ? { Authorization: "Bearer " + t } : {};
}

function fateOf(acc, res) {
  if (acc === undefined) return "target";
  if (acc && !res) return "accepted";
  if (acc && res) return "expanded";
  return res ? "resampled" : "target";
}

// One generation's panel: the image canvas, the tint canvas, progress and stats.
class Run {
  constructor(method) {
    const node = $("run-template").content.firstElementChild.cloneNode(true);
    node.querySelector("h2").textContent = method;
    $("runs").appendChild(node);
    this.node = node;
    node.run = this;
    this.method = method;
    this.fates = new Array(grid.rows * grid.cols).fill(null);
    this.committed = 0;
    this.image = node.querySelector("canvas.image");
    this.map = node.querySelector("canvas.map");
    this.seconds = null;
  }

  set state(s) { this.node.dataset.state = s; }

  block(e) {
    for (let i = 0; i < e.tokens.length; i++) {
      this.fates[e.start + i] = fateOf(e.accepted[i], e.resampled[i]);
    }
    this.committed = e.committed;
    this.node.dataset.blocks = String(Number(this.node.dataset.blocks || 0) + 1);
    const perPass = e.committed / Math.max(1, e.target_passes);
    this.node.querySelector(".progress").textContent =
      `${e.committed}/${e.total} tokens · ${e.target_passes} target passes · ` +
      `${perPass.toFixed(2)} tokens/pass (AR: 1) · ${e.elapsed_s.toFixed(2)} s`;
    this.drawMap();
  }

  drawMap() {
    const ctx = this.map.getContext("2d");
    const cw = this.map.width / grid.cols, ch = this.map.height / grid.rows;
    ctx.clearRect(0, 0, this.map.width, this.map.height);
    let tinted = 0;
    this.fates.forEach((f, i) => {
      const x = (i % grid.cols) * cw, y = Math.floor(i / grid.cols) * ch;
      if (f === null) {
        ctx.fillStyle = "rgba(230,230,230,0.85)";
      } else if ($("tint").checked) {
        ctx.fillStyle = FATES[f];
        tinted++;
      } else {
        return;
      }
      ctx.fillRect(x, y, cw, ch);
    });
    this.map.dataset.tinted = String(tinted);
  }

  async picture(b64) {
    const img = new Image();
    img.src = "data:image/png;base64," + b64;
    await img.decode();
    const ctx = this.image.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(img, 0, 0, this.image.width, this.image.height);
    return img.src;
  }

  async done(e) {
    const src = await this.picture(e.b64_json);
    const final = this.node.querySelector("img.final");
    final.src = src;
    this.seconds = e.stats.seconds;
    const s = e.stats;
    const rows = [
      ["method", s.method],
      ["seconds", s.seconds.toFixed(3)],
      ["target passes", s.target_passes],
      ["tokens / target pass", (s.tokens / Math.max(1, s.target_passes)).toFixed(2)],
      ["accepted", `${s.accepted} of ${s.proposed} proposed`],
      ["resampled", s.resampled],
      ["largest island", s.largest_island],
      ["seed", e.seed],
    ];
    for (const [k, v] of Object.entries(s.stages).sort()) rows.push([`stage ${k}`, `${v.toFixed(3)} s`]);
    if (s.fallback) rows.push(["fallback", s.fallback]);
    const table = this.node.querySelector("table.stats");
    table.replaceChildren(...rows.map(([k, v]) => {
      const tr = document.createElement("tr");
      for (const c of [k, v]) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
      return tr;
    }));
    this.state = "done";
  }

  // Streams the generation; resolves when it is done, throws on an error.
  async run(body) {
    this.state = "running";
    const r = await fetch("/v1/images/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...auth() },
      body: JSON.stringify({ ...body, stream: true }),
    });
    if (!r.ok) {
      const e = await r.json().catch(() => ({ error: { message: r.statusText } }));
      throw new Error(`${r.status} ${e.error.code || ""}: ${e.error.message}`);
    }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        // SSE lines may end in CRLF or CR; a CR at the end of a chunk waits for its LF.
        buf = (buf + value).replace(/\r\n/g, "\n").replace(/\r(?!$)/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const raw = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          if (await this.event(raw)) return;
        }
      }
    } finally {
      // Leaving early (an error, the last event) closes the stream: the server stops generating.
      reader.cancel().catch(() => {});
    }
    throw new Error("the stream ended before the image was done");
  }

  // Handles one SSE event; true when it was the last.
  async event(raw) {
    let name = "message", data = "";
    for (const line of raw.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    if (!data) return false;
    const e = JSON.parse(data);
    if (name === "mulo.block") this.block(e);
    else if (name === "image_generation.partial_image") {
      await this.picture(e.b64_json);
      this.node.dataset.partials = String(Number(this.node.dataset.partials || 0) + 1);
    }
    else if (name === "image_generation.completed") { await this.done(e); return true; }
    else if (name === "error") throw new Error(`${e.error.code}: ${e.error.message}`);
    return false;
  }
}

function spec(method) {
  const p = $("params").value.trim();
  return p && method !== "ar" ? `${method}:${p}` : method;
}

async function generate(ev) {
  ev.preventDefault();
  $("error").hidden = true;
  $("speedup").hidden = true;
  $("runs").replaceChildren();
  $("go").disabled = true;
  document.body.dataset.state = "running";
  // The grid comes from /v1/models, which needs the token when the gateway checks them.
  if (!(await loadModels())) {
    $("error").textContent = $("family").textContent;
    $("error").hidden = false;
    $("go").disabled = false;
    document.body.dataset.state = "failed";
    return;
  }
  const base = { prompt: $("prompt").value, seed: Number($("seed").value) || 0 };
  const method = $("method").value;
  const runs = [new Run(spec(method))];
  if ($("sidebyside").checked && method !== "ar") runs.push(new Run("ar"));
  try {
    // One after the other, so that the two do not share the machine.
    for (const run of runs) await run.run({ ...base, method: run.method });
    if (runs.length === 2) {
      const x = runs[1].seconds / runs[0].seconds;
      $("speedup").textContent = `${runs[0].method} ran ${x.toFixed(2)}× as fast as AR on this seed ` +
        `(${runs[0].seconds.toFixed(3)} s against ${runs[1].seconds.toFixed(3)} s).`;
      $("speedup").hidden = false;
    }
    document.body.dataset.state = "done";
  } catch (e) {
    $("error").textContent = e.message;
    $("error").hidden = false;
    runs.forEach((r) => { if (r.node.dataset.state !== "done") r.state = "failed"; });
    document.body.dataset.state = "failed";
  } finally {
    $("go").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("tint").addEventListener("change", () => document.querySelectorAll(".run").forEach((n) => {
  // Redraws the tint of every panel from its stored fates.
  if (n.run) n.run.drawMap();
}));
$("token").addEventListener("change", loadModels);
loadModels();
