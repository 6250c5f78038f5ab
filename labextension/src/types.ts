// The synced state of each widget, as the Python classes in nb_offload/widgets define it.

export interface Colors {
  tiers: Record<string, string>;
  lanes: Record<string, string>;
  reserved: Record<string, string>;
}

export interface PlanEntry {
  name: string;
  label: string;
  bytes: number;
  tier: string;
  pinned: boolean;
  kind: string;
  format?: string;      // "bf16", "nf4", "int8" ... (quantized tiers)
  experts?: Experts;    // a MoE block's routed experts
  compute?: "cpu";      // a block in host memory the CPU computes, not streamed (compute="hybrid", cpu-compute pins)
}

export interface Experts {
  count: number;
  top_k: number;
  moves: "routed" | "whole" | "resident"; // routed: a step brings only the experts its router picks
}

// MoE blocks brought as routed: the experts of the last call, those of them the CPU computed (absent
// from older kernels' state), and those the GPU expert cache holds
export type ExpertState = Record<string, { routed: number[]; cached: number[]; cpu?: number[] }>;

export interface PlanState {
  model: string;
  device: string;
  targets: string[];
  entries: PlanEntry[];
}

export interface Status {
  state: "idle" | "pending" | "applying" | "done" | "error" | "unloaded";
  message: string;
  request?: string | null;
}

/** What every widget's model has. */
interface Common {
  _uid: string; // tells this model's views from another's
  colors: Colors;
}

export interface LayerMapState extends Common {
  _kind: "layermap";
  plan: PlanState;
  selection: string[];
  status: Status;
  experts: ExpertState;
}

export interface MemoryRow {
  tier: string;
  weights: number;
  used: number;
  budget: number | null;
  reserved: { name: string; bytes: number }[];
}

export interface MemoryState extends Common {
  _kind: "memory";
  rows: MemoryRow[];
}

/** Header of a packed batch of trace events; the columns arrive as binary buffers. */
export interface PackedHeader {
  first: number;
  count: number;
  names: string[]; // unit of each event: names[unit]
  kinds: string[]; // kind of each event: kinds[kind]
  columns: string[];
}

export interface TimelineState extends Common {
  _kind: "timeline";
  lanes: string[];
  events: PackedHeader & { buffers: DataView[] };
  max_events: number;
  // Front-end only (never saved): the visible range, so a redrawn view keeps the zoom.
  _range?: { t0: number; t1: number; follow: boolean };
}
