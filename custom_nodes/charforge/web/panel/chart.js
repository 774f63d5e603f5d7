// The loss curve on a <canvas>: every step's loss (faint) and its moving average (bold), redrawn as steps
// arrive. `points` is [{step, loss}] in step order.
import { formatLoss } from "./dom.js";

const RAW = "rgba(120, 170, 255, 0.55)";
const AVERAGE = "#f5b942";
const TEXT = "#9aa0a6";
const GRID = "rgba(160, 160, 160, 0.18)";

export function movingAverage(values, window = 10) {
  const out = [];
  let sum = 0;
  for (let i = 0; i < values.length; i++) {
    sum += values[i];
    if (i >= window) sum -= values[i - window];
    out.push(sum / Math.min(i + 1, window));
  }
  return out;
}

export function drawLossCurve(canvas, points, totalSteps) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  const height = canvas.clientHeight || 140;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  canvas.dataset.points = String(points.length);
  canvas.dataset.lastStep = String(points.length ? points[points.length - 1].step : 0);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  g.font = "10px sans-serif";
  g.fillStyle = TEXT;
  if (points.length < 2) {
    g.fillText(points.length ? `step ${points[0].step}: loss ${formatLoss(points[0].loss)}` : "no steps yet", 8, 16);
    return;
  }
  const left = 44, right = 8, top = 8, bottom = 18;
  const losses = points.map((p) => p.loss);
  const lastStep = Math.max(totalSteps || 0, points[points.length - 1].step);
  const firstStep = points[0].step;
  let low = Math.min(...losses), high = Math.max(...losses);
  if (high - low < 1e-9) { low -= 0.5; high += 0.5; }
  const x = (step) => left + ((step - firstStep) / Math.max(lastStep - firstStep, 1)) * (width - left - right);
  const y = (loss) => top + (1 - (loss - low) / (high - low)) * (height - top - bottom);

  g.strokeStyle = GRID;
  g.lineWidth = 1;
  for (const fraction of [0, 0.5, 1]) {
    const value = low + fraction * (high - low);
    g.beginPath();
    g.moveTo(left, y(value));
    g.lineTo(width - right, y(value));
    g.stroke();
    g.fillText(value.toPrecision(3), 4, y(value) + 3);
  }
  g.fillText(String(firstStep), left, height - 4);
  const label = String(lastStep);
  g.fillText(label, width - right - g.measureText(label).width, height - 4);

  const line = (values, colour, widthPx) => {
    g.strokeStyle = colour;
    g.lineWidth = widthPx;
    g.beginPath();
    values.forEach((value, i) => (i ? g.lineTo : g.moveTo).call(g, x(points[i].step), y(value)));
    g.stroke();
  };
  line(losses, RAW, 1);
  line(movingAverage(losses), AVERAGE, 2);
}
