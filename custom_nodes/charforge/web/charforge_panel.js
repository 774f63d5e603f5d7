// The CharForge sidebar tab of the ComfyUI editor: training runs, datasets and characters.
//
// ComfyUI serves this folder (the pack's WEB_DIRECTORY) and imports every .js file in it. This file only
// registers the tab; the tab itself is in panel/. When the frontend has no sidebar tabs (an older one) or
// this file fails to load, nothing else changes: the nodes never depend on it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { createPanel } from "./panel/panel.js";

app.registerExtension({
  name: "CharForge.Panel",
  setup() {
    const manager = app.extensionManager;
    if (typeof manager?.registerSidebarTab !== "function") {
      console.info("CharForge: this ComfyUI frontend has no sidebar tabs; the CharForge panel is off");
      return;
    }
    let panel = null;
    manager.registerSidebarTab({
      id: "charforge",
      title: "CharForge",
      tooltip: "CharForge: training runs, datasets and characters",
      icon: "pi pi-user-edit",
      type: "custom",
      // The editor calls render with a fresh element each time the tab opens, destroy when it closes.
      render: (element) => {
        panel?.destroy();
        panel = createPanel(element, { app, api });
      },
      destroy: () => {
        panel?.destroy();
        panel = null;
      },
    });
  },
});
