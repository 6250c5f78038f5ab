// Trace events in growable typed-array columns, with a start-sorted index per lane so a
// view can find the visible events by binary search instead of scanning them all.

import type { PackedHeader } from "./types";

function copyOut<T extends Float64Array | Int32Array | Uint8Array>(
  ctor: { new (b: ArrayBuffer): T }, view: DataView,
): T {
  // Buffers of one message share an ArrayBuffer at arbitrary offsets; typed arrays need
  // aligned offsets, so each column is copied out.
  return new ctor(view.buffer.slice(view.byteOffset, view.byteOffset + view.byteLength) as ArrayBuffer);
}

export class EventStore {
  start = new Float64Array(1024);
  end = new Float64Array(1024);
  bytes = new Float64Array(1024);
  kind = new Uint8Array(1024);
  unit = new Int32Array(1024);
  step = new Int32Array(1024);
  length = 0;
  first = 0; // sequence number of the event at position 0
  names: string[] = [];
  byLane: Int32Array[] = [];
  laneLength: number[] = [];
  maxDuration: number[] = []; // per lane: how far back a visible event may start

  constructor(private lanes: number, private maxEvents: number) {
    this.clear();
  }

  clear(): void {
    this.length = 0;
    this.first = 0;
    this.byLane = Array.from({ length: this.lanes }, () => new Int32Array(1024));
    this.laneLength = new Array(this.lanes).fill(0);
    this.maxDuration = new Array(this.lanes).fill(0);
  }

  get end_sequence(): number {
    return this.first + this.length;
  }

  /** Replace everything with a snapshot. */
  reset(header: PackedHeader, buffers: DataView[]): void {
    this.clear();
    this.first = header.first;
    this.append(header, buffers);
  }

  /** Add a batch; false when it does not continue what is held (a snapshot will follow). */
  append(header: PackedHeader, buffers: DataView[]): boolean {
    this.names = header.names;
    if (header.first > this.end_sequence) return false;
    const skip = this.end_sequence - header.first; // already held (overlap with a snapshot)
    const n = header.count - skip;
    if (n <= 0) return true;
    const cols: Record<string, DataView> = {};
    header.columns.forEach((name, i) => (cols[name] = buffers[i]));
    const start = copyOut(Float64Array, cols.start);
    const end = copyOut(Float64Array, cols.end);
    const bytes = copyOut(Float64Array, cols.bytes);
    const kind = copyOut(Uint8Array, cols.kind);
    const unit = copyOut(Int32Array, cols.unit);
    const step = copyOut(Int32Array, cols.step);
    this.reserve(this.length + n);
    for (let j = skip; j < header.count; j++) {
      const i = this.length++;
      this.start[i] = start[j];
      this.end[i] = end[j];
      this.bytes[i] = bytes[j];
      this.kind[i] = kind[j];
      this.unit[i] = unit[j];
      this.step[i] = step[j];
      this.index(i);
    }
    if (this.length > this.maxEvents * 1.25) this.trim(this.length - this.maxEvents);
    return true;
  }

  /** Position of the first event of `lane` (in its index) starting at or after t. */
  lowerBound(lane: number, t: number): number {
    const idx = this.byLane[lane];
    let lo = 0;
    let hi = this.laneLength[lane];
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.start[idx[mid]] < t) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  get span(): [number, number] {
    if (!this.length) return [0, 0];
    let t1 = 0;
    for (let i = 0; i < this.length; i++) t1 = Math.max(t1, this.end[i]);
    let t0 = Infinity;
    for (let l = 0; l < this.lanes; l++) {
      if (this.laneLength[l]) t0 = Math.min(t0, this.start[this.byLane[l][0]]);
    }
    return [t0, t1];
  }

  private index(i: number): void {
    const lane = Math.min(this.kind[i], this.lanes - 1);
    let idx = this.byLane[lane];
    const n = this.laneLength[lane];
    if (n === idx.length) {
      const grown = new Int32Array(n * 2);
      grown.set(idx);
      idx = this.byLane[lane] = grown;
    }
    // Events come nearly in start order (one batch per step, sorted); an insertion keeps the
    // index sorted for the few a reader thread records late.
    let k = n;
    while (k > 0 && this.start[idx[k - 1]] > this.start[i]) {
      idx[k] = idx[k - 1];
      k--;
    }
    idx[k] = i;
    this.laneLength[lane] = n + 1;
    this.maxDuration[lane] = Math.max(this.maxDuration[lane], this.end[i] - this.start[i]);
  }

  private reserve(n: number): void {
    if (n <= this.start.length) return;
    const size = Math.max(n, this.start.length * 2);
    const grow = <T extends Float64Array | Int32Array | Uint8Array>(a: T, make: (k: number) => T): T => {
      const b = make(size);
      b.set(a.subarray(0, this.length) as never);
      return b;
    };
    this.start = grow(this.start, (k) => new Float64Array(k));
    this.end = grow(this.end, (k) => new Float64Array(k));
    this.bytes = grow(this.bytes, (k) => new Float64Array(k));
    this.kind = grow(this.kind, (k) => new Uint8Array(k));
    this.unit = grow(this.unit, (k) => new Int32Array(k));
    this.step = grow(this.step, (k) => new Int32Array(k));
  }

  /** Drop the oldest `k` events (in chunks, like the kernel side) and rebuild the lane indexes. */
  private trim(k: number): void {
    for (const a of [this.start, this.end, this.bytes, this.kind, this.unit, this.step]) {
      a.copyWithin(0, k, this.length);
    }
    const kept = this.length - k;
    const first = this.first + k;
    this.clear();
    this.first = first;
    for (let i = 0; i < kept; i++) {
      this.length++;
      this.index(i);
    }
  }
}
