// Small DOM helpers for the panel (no framework: the editor's Vue app is not ours to depend on).

// h("div", {class: "x", onclick: fn}, child, "text", ...) -> an element; null / false children are skipped.
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function formatLoss(loss) {
  return typeof loss === "number" && Number.isFinite(loss) ? loss.toFixed(4) : "–";
}

export function formatScore(value) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : "–";
}

// A full-size view over the editor (a report, a sample image); closes on Escape or a click outside.
export function openDialog(title, content) {
  const close = () => {
    overlay.remove();
    document.removeEventListener("keydown", onKey, true);
  };
  const onKey = (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      close();
    }
  };
  const overlay = h("div", { class: "cf-dialog-overlay", onclick: (e) => e.target === overlay && close() },
    h("div", { class: "cf-dialog", role: "dialog", "aria-label": title },
      h("div", { class: "cf-dialog-head" }, h("span", {}, title),
        h("button", { class: "cf-button", title: "Close", onclick: close }, "×")),
      h("div", { class: "cf-dialog-body" }, content)));
  document.addEventListener("keydown", onKey, true);
  document.body.append(overlay);
  return { element: overlay, close };
}
