// "View full size" on the nodes that show a picture CharForge drew: the score tables (CharForge/Score nodes),
// the dataset's contact sheets (Dataset Report) and the caption review. Right-click the node: one entry per
// image it shows opens that image at its full resolution (ComfyUI's /view URL of the node's output) in a
// dialog; click the image to fit it to the window and back. Nothing else depends on this file: when it fails to
// load the nodes work as before, and their images still open the ComfyUI way (Open Image).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { h, openDialog } from "./panel/dom.js";
import { STYLE } from "./panel/style.js";

const NODES = new Set(["CharForgeDatasetReport", "CharForgeCaptionReview"]);
const CATEGORIES = ["CharForge/Score"];

function wanted(nodeData) {
  return NODES.has(nodeData?.name) || CATEGORIES.some((c) => String(nodeData?.category ?? "").startsWith(c));
}

// The images the node shows after its last run: the editor's output store, else the node's own copy.
function shownImages(node) {
  const outputs = app.nodeOutputs?.[String(node.id)] ?? app.nodeOutputs?.[node.id];
  const images = outputs?.images ?? node.images ?? [];
  return images.filter((image) => image?.filename);
}

export function viewURL(image) {
  const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "",
    type: image.type ?? "output" });
  return api.apiURL(`/view?${query}`);
}

function addStyle() {
  if (document.getElementById("charforge-panel-style")) return;
  document.head.append(h("style", { id: "charforge-panel-style" }, STYLE));
}

export function openFullSize(title, image) {
  addStyle();
  const picture = h("img", { class: "cf-full cf-zoomable cf-natural", src: viewURL(image), alt: title,
    title: "Click to fit the window / show at full size" });
  picture.addEventListener("click", () => picture.classList.toggle("cf-natural"));
  return openDialog(title, picture);
}

app.registerExtension({
  name: "CharForge.FullSizeView",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!wanted(nodeData)) return;
    const original = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
      const result = original?.apply(this, arguments);
      try {
        const images = shownImages(this);
        const title = this.title ?? nodeData.display_name ?? nodeData.name;
        const entries = images.map((image, index) => ({
          content: images.length > 1 ? `View full size (${index + 1} of ${images.length})` : "View full size",
          callback: () => openFullSize(images.length > 1 ? `${title}: ${index + 1} of ${images.length}` : title, image),
        }));
        if (entries.length && Array.isArray(options)) options.unshift(...entries, null);
      } catch (error) {
        console.warn("CharForge: no full-size view for this node", error);
      }
      return result;
    };
  },
});
