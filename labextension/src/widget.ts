// Entry point of nb_offload's widgets: one bundle, the view picked by the model's `_kind`.

import type { AnyModel, RenderProps } from "@anywidget/types";
import { renderLayerMap } from "./layermap";
import { renderMemory } from "./memory";
import { renderTimeline } from "./timeline";
import type { LayerMapState, MemoryState, TimelineState } from "./types";
import { Lifetime, track } from "./views";

type State = LayerMapState | MemoryState | TimelineState;

function render({ model, el }: RenderProps<State>) {
  el.classList.add("nbo-widget");
  const life = new Lifetime(model);
  switch (model.get("_kind")) {
    case "layermap":
      renderLayerMap(model as AnyModel<LayerMapState>, el, life);
      break;
    case "memory":
      renderMemory(model as AnyModel<MemoryState>, el, life);
      break;
    case "timeline":
      renderTimeline(model as AnyModel<TimelineState>, el, life);
      break;
    default:
      el.textContent = `nb_offload: unknown widget kind ${String(model.get("_kind"))}`;
  }
  return track(model.get("_uid"), el, life);
}

export default { render };
