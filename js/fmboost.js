// FMBoost frontend extension: size label on CFM Latent Upscale, solver inputs that apply, nothing else.
// It only touches the pack's own node types, so graphs without them are unaffected.
import { app } from "../../scripts/app.js";

const UPSCALE = "FMBoostLatentUpscale";
const SOLVER = "FMBoostSolverSettings";
const ADAPTIVE = new Set(["dopri5"]);
const FIXED_ONLY = ["steps"];
const ADAPTIVE_ONLY = ["atol", "rtol", "max_evals"];

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

function upstream(node, inputName) {
  const slot = node?.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0) return null;
  let link;
  if (typeof node.getInputLink === "function") {
    link = node.getInputLink(slot);  // frontends ≥ 1.5x deprecate reading input.link directly
  } else {
    const id = node.inputs[slot].link;
    if (id == null) return null;
    link = node.graph?.links?.[id] ?? node.graph?.links?.get?.(id);
  }
  return link ? node.graph?.getNodeById(link.origin_id) ?? null : null;
}

// Latent size [h, w] a node produces, where the graph tells; null when only a run can tell.
export function latentSizeOf(node, depth = 0) {
  if (!node || depth > 32) return null;
  switch (node.type) {
    case "EmptyLatentImage":
    case "EmptySD3LatentImage": {
      const w = widgetValue(node, "width"), h = widgetValue(node, "height");
      return w && h ? [Math.floor(h / 8), Math.floor(w / 8)] : null;
    }
    case UPSCALE: {
      const s = latentSizeOf(upstream(node, "samples"), depth + 1);
      return s ? [s[0] * 2, s[1] * 2] : null;
    }
    case "KSampler":
    case "KSamplerAdvanced":
      return latentSizeOf(upstream(node, "latent_image"), depth + 1);
    case "SamplerCustom":
    case "SamplerCustomAdvanced":
      return latentSizeOf(upstream(node, "latent_image"), depth + 1);
    case "LatentUpscaleBy": {
      const s = latentSizeOf(upstream(node, "samples"), depth + 1);
      const f = widgetValue(node, "scale_by");
      return s && f ? [Math.round(s[0] * f), Math.round(s[1] * f)] : null;
    }
    case "LatentUpscale": {
      const w = widgetValue(node, "width"), h = widgetValue(node, "height");
      return w && h ? [Math.floor(h / 8), Math.floor(w / 8)] : null;
    }
    case "LatentFromBatch":
    case "RepeatLatentBatch":
    case "SetLatentNoiseMask":
      return latentSizeOf(upstream(node, "samples"), depth + 1);
    default:
      return null;
  }
}

// Every size is width×height, latents and pixels alike.
export function sizeLabel(node) {
  if (node.fmboostResult) {
    const r = node.fmboostResult;
    const [h, w] = r.output.slice(-2);
    const [ih, iw] = r.input.slice(-2);
    return `${iw}×${ih} → ${w}×${h} latent · ${w * 8}×${h * 8} px · ${r.evaluations} evals · ${r.seconds.toFixed(2)} s`;
  }
  const s = latentSizeOf(upstream(node, "samples"));
  if (!s) return "→ 2× the input's width and height";
  const [h, w] = s;
  return `${w}×${h} → ${2 * w}×${2 * h} latent · ${16 * w}×${16 * h} px`;
}

// A second line under the node when the last run warned (e.g. a mode the model was not trained for).
export function warningLabel(node) {
  const warning = node.fmboostResult?.warning;
  return warning ? `⚠ ${warning}` : "";
}

function applySolverVisibility(node) {
  const adaptive = ADAPTIVE.has(widgetValue(node, "method"));
  for (const w of node.widgets ?? []) {
    if (FIXED_ONLY.includes(w.name)) w.hidden = adaptive;
    if (ADAPTIVE_ONLY.includes(w.name)) w.hidden = !adaptive;
  }
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "FMBoost.Nodes",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === UPSCALE) {
      const onDrawForeground = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx) {
        onDrawForeground?.apply(this, arguments);
        if (this.flags?.collapsed) return;
        this.fmboostLabel = sizeLabel(this);
        ctx.save();
        ctx.font = "12px sans-serif";
        ctx.fillStyle = "#9ab";
        ctx.textAlign = "left";
        // Below the node: inside it, the frontend draws previews and their captions.
        ctx.fillText(this.fmboostLabel, 4, this.size[1] + 16);
        this.fmboostWarning = warningLabel(this);
        if (this.fmboostWarning) {
          ctx.fillStyle = "#e9a23b";
          ctx.fillText(this.fmboostWarning, 4, this.size[1] + 32);
        }
        ctx.restore();
      };
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const info = message?.fmboost?.[0];
        if (info) {
          this.fmboostResult = info;
          this.setDirtyCanvas?.(true, true);
        }
      };
      const onConnectionsChange = nodeType.prototype.onConnectionsChange;
      nodeType.prototype.onConnectionsChange = function () {
        onConnectionsChange?.apply(this, arguments);
        this.fmboostResult = null;  // a new input: the last run's numbers no longer apply
      };
    }
    if (nodeData.name === SOLVER) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        onNodeCreated?.apply(this, arguments);
        const method = this.widgets?.find((w) => w.name === "method");
        if (method) {
          const callback = method.callback;
          method.callback = (...args) => {
            callback?.apply(method, args);
            applySolverVisibility(this);
          };
        }
        applySolverVisibility(this);
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        onConfigure?.apply(this, arguments);
        applySolverVisibility(this);
      };
    }
  },
});
