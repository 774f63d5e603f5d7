// The panel's look, on the editor's own colour variables so it follows the light and dark themes.
export const STYLE = `
.charforge-panel { display: flex; flex-direction: column; height: 100%; font-size: 13px;
  color: var(--fg-color, #ddd); }
.charforge-panel .cf-header { padding: 8px 10px 0; border-bottom: 1px solid var(--border-color, #444); }
.charforge-panel .cf-title { font-weight: 600; font-size: 14px; }
.charforge-panel .cf-tabs { display: flex; gap: 2px; margin-top: 6px; }
.charforge-panel .cf-tab { flex: 1; padding: 5px 0; border: 0; border-bottom: 2px solid transparent; cursor: pointer;
  background: none; color: inherit; opacity: 0.7; }
.charforge-panel .cf-tab-active { opacity: 1; border-bottom-color: var(--p-primary-color, #4a9eff); }
.charforge-panel .cf-content { flex: 1; overflow-y: auto; padding: 8px 10px; display: flex; flex-direction: column;
  gap: 8px; }
.charforge-panel .cf-row { display: flex; justify-content: space-between; align-items: center; gap: 6px; }
.charforge-panel .cf-muted { opacity: 0.7; font-size: 12px; }
.charforge-panel .cf-error { color: #f28b82; font-size: 12px; }
.charforge-panel .cf-run-list { display: flex; flex-direction: column; gap: 4px; max-height: 38vh; overflow-y: auto; }
.charforge-panel .cf-run, .charforge-panel .cf-card, .charforge-panel .cf-details { padding: 6px 8px;
  border: 1px solid var(--border-color, #444); border-radius: 6px; background: var(--comfy-input-bg, #262626); }
.charforge-panel .cf-run { cursor: pointer; }
.charforge-panel .cf-selected { border-color: var(--p-primary-color, #4a9eff); }
.charforge-panel .cf-bar { height: 3px; margin: 4px 0; background: rgba(128, 128, 128, 0.25); border-radius: 2px; }
.charforge-panel .cf-bar > div { height: 100%; background: var(--p-primary-color, #4a9eff); border-radius: 2px; }
.charforge-panel .cf-state { font-size: 11px; padding: 0 6px; border-radius: 8px; background: rgba(128, 128, 128, 0.3); }
.charforge-panel .cf-state-running, .charforge-panel .cf-state-queued { background: #1e5aa8; color: #fff; }
.charforge-panel .cf-state-completed { background: #2e7d32; color: #fff; }
.charforge-panel .cf-state-failed { background: #a33; color: #fff; }
.charforge-panel .cf-state-cancelled { background: #8a6d1a; color: #fff; }
.charforge-panel .cf-details { display: flex; flex-direction: column; gap: 6px; }
.charforge-panel .cf-actions { display: flex; gap: 4px; }
.charforge-panel .cf-button, .cf-dialog .cf-button { padding: 3px 8px; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--border-color, #555); background: var(--comfy-menu-secondary-bg, #333); color: inherit; }
.charforge-panel .cf-button:disabled { opacity: 0.5; cursor: default; }
.charforge-panel .cf-danger { border-color: #a33; }
.charforge-panel .cf-chart { width: 100%; height: 150px; }
.charforge-panel .cf-section { font-weight: 600; margin-top: 4px; }
.charforge-panel .cf-samples { display: flex; gap: 6px; overflow-x: auto; padding-bottom: 4px; }
.charforge-panel .cf-sample-row { display: flex; flex-direction: column; gap: 4px; flex: none; }
.charforge-panel .cf-sample { width: 72px; height: 72px; object-fit: cover; border-radius: 4px; cursor: zoom-in;
  image-rendering: pixelated; }
.charforge-panel .cf-score { font-size: 11px; opacity: 0.85; max-width: 72px; line-height: 1.25; }
.charforge-panel .cf-best { color: #7bd88f; opacity: 1; }
.charforge-panel .cf-sheet { width: 100%; border-radius: 4px; cursor: zoom-in; margin-top: 4px; }
.charforge-panel .cf-chips { display: flex; gap: 4px; flex-wrap: wrap; margin: 4px 0; }
.charforge-panel .cf-chip { font-size: 11px; padding: 1px 7px; border-radius: 10px; background: rgba(74, 158, 255, 0.25); }
.cf-dialog-overlay { position: fixed; inset: 0; z-index: 3000; background: rgba(0, 0, 0, 0.6); display: flex;
  align-items: center; justify-content: center; }
.cf-dialog { width: min(1100px, 92vw); height: min(820px, 90vh); display: flex; flex-direction: column;
  background: var(--comfy-menu-bg, #202020); color: var(--fg-color, #ddd); border-radius: 8px; overflow: hidden;
  border: 1px solid var(--border-color, #444); }
.cf-dialog-head { display: flex; justify-content: space-between; align-items: center; padding: 6px 10px;
  border-bottom: 1px solid var(--border-color, #444); font-weight: 600; }
.cf-dialog-body { flex: 1; overflow: auto; display: flex; align-items: flex-start; justify-content: center; }
.cf-dialog .cf-report { width: 100%; height: 100%; border: 0; background: #fff; }
.cf-dialog .cf-full { max-width: 100%; image-rendering: auto; }
.cf-dialog .cf-zoomable { cursor: zoom-in; }
.cf-dialog .cf-zoomable.cf-natural { max-width: none; cursor: zoom-out; }
`;
