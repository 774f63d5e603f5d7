// Putting nodes into the open workflow: a node of `type` in the middle of the visible canvas, with some of
// its widgets set.

export function insertNode(app, type, widgetValues = {}) {
  const LiteGraph = window.LiteGraph;
  const node = LiteGraph?.createNode(type);
  if (!node) throw new Error(`this ComfyUI has no ${type} node`);
  for (const [name, value] of Object.entries(widgetValues)) {
    const widget = node.widgets?.find((w) => w.name === name);
    if (!widget) throw new Error(`${type} has no ${name} input`);
    widget.value = value;
    widget.callback?.(value);
  }
  const canvas = app.canvas;
  const [width, height] = [canvas.canvas.clientWidth, canvas.canvas.clientHeight];
  const [x, y] = canvas.ds.convertCanvasToOffset([width / 2, height / 2]);
  node.pos = [x - node.size[0] / 2, y - node.size[1] / 2];
  app.graph.add(node);
  canvas.selectNode?.(node);
  app.graph.setDirtyCanvas(true, true);
  return node;
}
