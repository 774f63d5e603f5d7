// Train LoRA (CharForge) draws its loss curve on the node while it trains, from the trainer's
// `charforge.train.progress` messages. The curve appears with the first training step (a node that never
// trains keeps its usual size) and is never saved into the workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { drawLossCurve } from "./panel/chart.js";

const TRAIN_NODE = "CharForgeTrainLoRA";
const WIDGET = "charforge_live_loss";

function lossWidget(node, run) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  if (typeof node.addDOMWidget !== "function") return null;
  const canvas = document.createElement("canvas");
  canvas.className = "charforge-node-chart";
  canvas.style.width = "100%";
  canvas.style.height = "100%";
  widget = node.addDOMWidget(WIDGET, "charforge-loss", canvas, { serialize: false, getMinHeight: () => 110 });
  widget.serialize = false;
  widget.points = [];
  // A resumed run: the steps before this prompt come from the run folder's metrics.
  api.fetchApi(`/charforge/runs/${encodeURIComponent(run)}`).then((r) => (r.ok ? r.json() : null)).then((details) => {
    const first = widget.points[0]?.step ?? Infinity;
    const earlier = (details?.metrics ?? []).filter((m) => m.step < first).map(({ step, loss }) => ({ step, loss }));
    if (earlier.length) widget.points = [...earlier, ...widget.points];
  }).catch(() => {});
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  return widget;
}

app.registerExtension({
  name: "CharForge.TrainNodeLossCurve",
  setup() {
    api.addEventListener("charforge.train.progress", (event) => {
      const data = event.detail ?? {};
      if (data.phase !== "training" || typeof data.loss !== "number" || data.node === undefined) return;
      const node = app.graph?.getNodeById(Number(data.node)) ?? app.graph?.getNodeById(data.node);
      if (node?.type !== TRAIN_NODE) return;
      const widget = lossWidget(node, data.run);
      if (!widget) return;
      const last = widget.points[widget.points.length - 1];
      if (last && data.step <= last.step) widget.points = widget.points.filter((p) => p.step < data.step);
      widget.points.push({ step: data.step, loss: data.loss });
      drawLossCurve(widget.element, widget.points, data.total_steps);
      node.setDirtyCanvas?.(true, false);
    });
  },
});
