// The panel inside the sidebar tab: three views (Runs, Datasets, Characters) over the pack's routes
// (nodes/panel.py). Runs refresh while something trains and take the trainer's live
// `charforge.train.progress` messages; the others load when opened.
import { drawLossCurve } from "./chart.js";
import { formatLoss, formatScore, formatSeconds, h, openDialog } from "./dom.js";
import { insertNode } from "./graph.js";
import { STYLE } from "./style.js";

const BUSY_REFRESH_MS = 2000; // while a run trains
const IDLE_REFRESH_MS = 10000;
const STATES = { running: "running", queued: "queued", completed: "done", cancelled: "cancelled", failed: "failed" };

function addStyle() {
  if (document.getElementById("charforge-panel-style")) return;
  document.head.append(h("style", { id: "charforge-panel-style" }, STYLE));
}

export function createPanel(root, { app, api }) {
  addStyle();
  const state = { view: "runs", runs: [], selected: null, details: null, live: {}, timer: null, alive: true,
    detailsSignature: null, detailsElement: null, turn: 0, askedAt: 0 };
  const url = (path) => api.apiURL(path);
  const enc = encodeURIComponent;

  async function getJSON(path, options) {
    const response = await api.fetchApi(path, options);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${path}: HTTP ${response.status}`);
    return body;
  }

  function toast(severity, summary, detail) {
    const toasts = app.extensionManager?.toast;
    if (toasts?.add) toasts.add({ severity, summary, detail, life: 4000 });
    else console.log(`CharForge: ${summary}: ${detail ?? ""}`);
  }

  const content = h("div", { class: "cf-content" });
  const tabs = ["runs", "datasets", "characters"].map((view) =>
    h("button", { class: "cf-tab", "data-view": view, onclick: () => show(view) },
      view[0].toUpperCase() + view.slice(1)));
  root.style.height = "100%"; // the editor's slot for a custom tab has no height of its own
  root.replaceChildren(h("div", { class: "charforge-panel" },
    h("div", { class: "cf-header" }, h("span", { class: "cf-title" }, "CharForge"), h("div", { class: "cf-tabs" }, tabs)),
    content));

  function show(view) {
    state.view = view;
    tabs.forEach((tab) => tab.classList.toggle("cf-tab-active", tab.dataset.view === view));
    content.replaceChildren(h("div", { class: "cf-muted" }, "loading…"));
    refresh();
  }

  // A newer refresh (a click, a message) supersedes one still waiting for the server: only the newest one
  // draws and schedules the next.
  async function refresh() {
    clearTimeout(state.timer);
    if (!state.alive) return;
    const turn = ++state.turn;
    const view = state.view;
    try {
      if (view === "runs") {
        const runs = (await getJSON("/charforge/runs")).runs;
        const name = state.selected ?? runs[0]?.name ?? null;
        const details = name ? await getJSON(`/charforge/runs/${enc(name)}`).catch(() => null) : null;
        if (turn !== state.turn) return;
        Object.assign(state, { runs, selected: name, details });
        renderRuns();
      } else {
        const body = await getJSON(view === "datasets" ? "/charforge/datasets" : "/charforge/characters");
        if (turn !== state.turn) return;
        if (view === "datasets") renderDatasets(body.datasets);
        else renderCharacters(body.characters);
      }
    } catch (error) {
      if (turn !== state.turn) return;
      content.replaceChildren(h("div", { class: "cf-error" }, `CharForge: ${error.message}`));
    }
    if (state.alive && state.view === "runs") {
      const busy = state.runs.some((run) => run.state === "running" || run.state === "queued");
      state.timer = setTimeout(refresh, busy ? BUSY_REFRESH_MS : IDLE_REFRESH_MS);
    }
  }

  // ------------------------------------------------------------------------------------------ runs

  function onProgress(event) {
    const data = event.detail ?? {};
    if (!data.run) return;
    state.live[data.run] = { ...state.live[data.run], ...data };
    const details = state.details;
    if (details?.name === data.run && data.phase === "training" && typeof data.loss === "number") {
      const last = details.metrics[details.metrics.length - 1];
      if (!last || data.step > last.step) details.metrics.push({ step: data.step, loss: data.loss });
      details.step = data.step;
      details.loss = data.loss;
      details.eta_seconds = data.eta_seconds;
      details.state = "running";
    }
    // A training step means the run is running now, whatever the list read last (queued, or cancelled
    // before a resume): the badge follows at once and the list is read again at the busy pace.
    const listed = state.runs.find((run) => run.name === data.run);
    if (listed && data.phase === "training" && listed.state !== "running") {
      listed.state = "running";
      if (state.view === "runs") {
        clearTimeout(state.timer);
        state.timer = setTimeout(refresh, BUSY_REFRESH_MS);
      }
    }
    if (state.view === "runs") renderRuns();
    const unknown = !listed;
    if (data.phase === "done" || (unknown && Date.now() - state.askedAt > 1000)) {
      state.askedAt = Date.now(); // at most one list request a second for a run the list does not have yet
      refresh();
    }
  }

  function runLine(run) {
    const live = state.live[run.name];
    const step = Math.max(run.step ?? 0, run.state === "running" ? live?.step ?? 0 : 0);
    const total = run.total_steps || live?.total_steps || 0;
    const percent = total ? Math.min(100, (100 * step) / total) : 0;
    const eta = run.state === "running" ? formatSeconds(live?.eta_seconds ?? run.eta_seconds) : "";
    const phase = run.state === "running" && live?.phase && live.phase !== "training" ? live.phase : "";
    return h("div", {
      class: `cf-run${run.name === state.selected ? " cf-selected" : ""}`, "data-run": run.name,
      onclick: () => { state.selected = run.name; refresh(); },
    },
    h("div", { class: "cf-row" }, h("b", {}, run.name),
      h("span", { class: `cf-state cf-state-${run.state}` }, STATES[run.state] ?? run.state)),
    h("div", { class: "cf-bar" }, h("div", { style: `width:${percent.toFixed(1)}%` })),
    h("div", { class: "cf-row cf-muted" },
      h("span", {}, `step ${step}${total ? ` / ${total}` : ""}`),
      h("span", {}, `loss ${formatLoss(run.state === "running" ? live?.loss ?? run.loss : run.loss)}`),
      h("span", {}, [phase, eta && `ETA ${eta}`].filter(Boolean).join(" · "))));
  }

  function renderRuns() {
    if (!state.runs.length) {
      content.replaceChildren(h("div", { class: "cf-muted" },
        "No training runs yet. Queue a Train LoRA (CharForge) node: its run appears here with a live loss curve."));
      return;
    }
    const previous = content.querySelector(".cf-run-list");
    const scroll = previous ? previous.scrollTop : 0;
    const list = h("div", { class: "cf-run-list" }, state.runs.map(runLine));
    // The details are rebuilt only when more than the numbers changed: the sample images stay loaded.
    const d = state.details;
    const signature = d && JSON.stringify([d.name, d.state, d.resumable, d.can_queue_again, d.lora, d.error,
      d.samples, d.checkpoints, d.scores, d.best_scored_step]);
    if (signature !== state.detailsSignature) {
      state.detailsSignature = signature;
      state.detailsElement = d ? runDetails(d) : null;
    }
    content.replaceChildren(list, state.detailsElement ?? "");
    list.scrollTop = scroll;
    const canvas = content.querySelector("canvas.cf-chart");
    if (canvas) drawLossCurve(canvas, state.details.metrics, state.details.total_steps);
  }

  async function post(path, body) {
    return getJSON(path, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body ?? {}) });
  }

  function runDetails(run) {
    const name = enc(run.name);
    const file = (path) => url(`/charforge/runs/${name}/files/${path.split("/").map(enc).join("/")}`);
    const actions = [];
    if (run.state === "running" || run.state === "queued") {
      actions.push(h("button", { class: "cf-button cf-danger", "data-action": "cancel", onclick: async () => {
        try {
          await post(`/charforge/runs/${name}/cancel`);
          toast("info", "CharForge", `Cancelling ${run.name}: it stops within a step`);
        } catch (error) { toast("error", "Cancel", error.message); }
        refresh();
      } }, "Cancel"));
    }
    if (run.resumable && run.state !== "running" && run.state !== "queued") {
      actions.push(h("button", { class: "cf-button", "data-action": "resume",
        disabled: !run.can_queue_again, title: run.can_queue_again ? "Queue this run again: it continues from its last " +
          "saved step" : "This run was not queued from ComfyUI: queue its workflow again to resume it",
        onclick: async () => {
          try {
            await post(`/charforge/runs/${name}/resume`, { client_id: api.clientId ?? api.initialClientId ?? "" });
            toast("success", "CharForge", `${run.name} queued again: it resumes at step ${run.step}`);
          } catch (error) { toast("error", "Resume", error.message); }
          refresh();
        } }, "Resume"));
    }
    if (run.lora && run.state === "completed") {
      const loraName = run.lora.split(/[\\/]/).pop();
      actions.push(h("button", { class: "cf-button", "data-action": "insert-lora", onclick: () => {
        try {
          insertNode(app, "LoraLoader", { lora_name: loraName });
        } catch (error) { toast("error", "Load LoRA", error.message); }
      } }, "Insert Load LoRA"));
    }
    const facts = [run.arch, run.base_model, run.trigger_word && `trigger “${run.trigger_word}”`,
      run.rank && `rank ${run.rank}`, run.dataset_images && `${run.dataset_images} images`].filter(Boolean);
    // One column per sampled step, oldest first, each seed's image in the same row: checkpoints side by side,
    // each with its identity / CLIP scores when Pick Checkpoint scored it (scores.json), the best one marked.
    const scores = new Map((run.scores ?? []).map((entry) => [entry.step, entry]));
    const steps = new Set(run.samples.map((group) => group.step));
    const scoreLine = (step) => {
      const entry = scores.get(step);
      if (!entry) return "";
      const best = run.best_scored_step === step;
      const parts = [entry.identity_mean !== null && entry.identity_mean !== undefined && `id ${formatScore(entry.identity_mean)}`,
        entry.faces !== null && entry.faces !== undefined && `${entry.faces}/${entry.images} faces`,
        entry.clip_mean !== null && entry.clip_mean !== undefined && `clip ${formatScore(entry.clip_mean)}`].filter(Boolean);
      return h("div", { class: `cf-score${best ? " cf-best" : ""}`, "data-score-step": step,
        title: `scored against ${entry.identity ?? "?"}${entry.clip_model ? ` and ${entry.clip_model}` : ""}` +
          (entry.combined !== null && entry.combined !== undefined ? `; combined ${formatScore(entry.combined)}` : "") +
          (entry.identity_min !== null && entry.identity_min !== undefined ? `; identity min ${formatScore(entry.identity_min)}` : "") },
      best ? h("div", {}, h("b", {}, "★ best")) : "", (parts.length ? parts : ["no face"]).map((part) => h("div", {}, part)));
    };
    const samples = run.samples.map((group) => h("div", { class: "cf-sample-row", "data-step": group.step },
      h("div", { class: "cf-muted" }, `step ${group.step}`),
      group.files.map((path) => h("img", {
        class: "cf-sample", src: file(path), loading: "lazy", alt: `${run.name} step ${group.step}`,
        onclick: () => openDialog(`${run.name}: step ${group.step}`, h("img", { class: "cf-full", src: file(path) })),
      })),
      scoreLine(group.step))); // under the images, so the images of every step stay in line
    return h("div", { class: "cf-details", "data-run": run.name },
      h("div", { class: "cf-row" }, h("b", {}, run.name), h("span", { class: "cf-actions" }, actions)),
      facts.length ? h("div", { class: "cf-muted" }, facts.join(" · ")) : "",
      run.error ? h("div", { class: "cf-error" }, run.error) : "",
      h("canvas", { class: "cf-chart", "data-cf-chart": run.name }),
      samples.length ? h("div", { class: "cf-section" }, "Samples") : "",
      samples.length ? h("div", { class: "cf-samples" }, samples) : "",
      // scored steps whose samples are gone (or scored from a copy): their numbers still show
      [...scores.values()].filter((entry) => !steps.has(entry.step)).map((entry) =>
        h("div", { class: "cf-muted" }, `step ${entry.step}: `, scoreLine(entry.step))),
      run.checkpoints.length ? h("div", { class: "cf-section" }, "Checkpoints") : "",
      run.checkpoints.map((c) => h("div", { class: "cf-muted" }, c.file.split("/").pop())));
  }

  // ------------------------------------------------------------------------------------------ datasets

  function renderDatasets(datasets) {
    if (!datasets.length) {
      content.replaceChildren(h("div", { class: "cf-muted" },
        "No datasets yet. The dataset nodes (Load Dataset … Dataset Report) write them to output/charforge/datasets."));
      return;
    }
    content.replaceChildren(...datasets.map((dataset) => {
      const name = enc(dataset.name);
      const file = (path) => url(`/charforge/datasets/${name}/files/${path.split("/").map(enc).join("/")}`);
      const counts = dataset.counts ?? {};
      const reasons = Object.entries(dataset.rejection_reasons ?? {});
      const sheet = dataset.contact_sheets?.[0];
      return h("div", { class: "cf-card", "data-dataset": dataset.name },
        h("div", { class: "cf-row" }, h("b", {}, dataset.name),
          dataset.report ? h("button", { class: "cf-button", "data-action": "report", onclick: () => {
            openDialog(`Dataset report: ${dataset.name}`, h("iframe", { class: "cf-report", src: file(dataset.report),
              sandbox: "", title: `report of ${dataset.name}` }));
          } }, "Open report") : h("span", { class: "cf-muted" }, "no report yet")),
        dataset.error ? h("div", { class: "cf-error" }, dataset.error) : "",
        h("div", {}, `${counts.accepted ?? 0} accepted · ${counts.rejected ?? 0} rejected · ${counts.images ?? 0} in all`),
        reasons.length ? h("div", { class: "cf-muted" }, "rejected: " +
          reasons.map(([reason, n]) => `${reason} (${n})`).join(", ")) : "",
        dataset.trigger ? h("div", { class: "cf-muted" }, `trigger “${dataset.trigger}”`) : "",
        sheet ? h("img", { class: "cf-sheet", src: file(sheet), alt: `contact sheet of ${dataset.name}`,
          onclick: () => openDialog(`Contact sheet: ${dataset.name}`, h("img", { class: "cf-full", src: file(sheet) })),
        }) : "");
    }));
  }

  // ------------------------------------------------------------------------------------------ characters

  function renderCharacters(characters) {
    if (!characters.length) {
      content.replaceChildren(h("div", { class: "cf-muted" },
        "No characters yet. Train LoRA's save_character input or `charforge character new` creates one."));
      return;
    }
    content.replaceChildren(...characters.map((character) => h("div", { class: "cf-card", "data-character": character.name },
      h("div", { class: "cf-row" }, h("b", {}, character.display_name ?? character.name),
        character.error ? "" : h("button", { class: "cf-button", "data-action": "insert-character", onclick: () => {
          try {
            insertNode(app, "CharForgeLoadCharacter", { character: character.name });
            toast("success", "CharForge", `Load Character “${character.name}” added to the workflow`);
          } catch (error) { toast("error", "Load Character", error.message); }
        } }, "Insert Load Character")),
      character.error ? h("div", { class: "cf-error" }, character.error) : [
        h("div", { class: "cf-chips" }, (character.trigger_words ?? []).map((word) => h("span", { class: "cf-chip" }, word))),
        (character.loras ?? []).map((lora) => h("div", { class: "cf-muted" },
          `${lora.name} · model ${lora.weight}${lora.clip_weight !== lora.weight ? ` · clip ${lora.clip_weight}` : ""}`)),
        h("div", { class: "cf-muted" }, [
          character.identity && `identity ${character.identity}`,
          character.threshold ? `threshold ${character.threshold}` : "",
          character.base_model, character.size && `${character.size[0]}×${character.size[1]}`,
        ].filter(Boolean).join(" · ")),
      ])));
  }

  api.addEventListener("charforge.train.progress", onProgress);
  show("runs");
  return {
    destroy() {
      state.alive = false;
      clearTimeout(state.timer);
      api.removeEventListener("charforge.train.progress", onProgress);
    },
  };
}
