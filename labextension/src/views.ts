// The lifetime of a view. When the kernel updates a widget's output (the widgets refresh
// their static copy when a cell ends), JupyterLab renders a new view into the output and
// drops the old view's element without disposing the view: its model listeners would live
// on, drawing into a detached element and writing stale view state (the timeline's zoom)
// into the model. So each view registers here, and a new view disposes the views of the
// same model whose element it replaced in the same output.

import type { AnyModel } from "@anywidget/types";

type Handler = (...args: any[]) => void;

export class Lifetime {
  private undo: (() => void)[] = [];

  constructor(private model: AnyModel<any>) {}

  /** model.on, undone by dispose(). */
  on(event: string, handler: Handler): void {
    this.model.on(event, handler);
    this.undo.push(() => this.model.off(event, handler));
  }

  /** Run `fn` on dispose. */
  add(fn: () => void): void {
    this.undo.push(fn);
  }

  dispose(): void {
    for (const fn of this.undo.splice(0).reverse()) fn();
  }
}

interface Entry { root: HTMLElement; host: Element | null; life: Lifetime }

const byModel = new Map<string, Set<Entry>>();

/** Register a rendered view; returns its cleanup (for anywidget to call when it removes it). */
export function track(uid: string, root: HTMLElement, life: Lifetime): () => void {
  const views = byModel.get(uid) ?? new Set<Entry>();
  byModel.set(uid, views);
  const entry: Entry = { root, host: null, life };
  views.add(entry);
  const forget = () => {
    life.dispose();
    views.delete(entry);
    if (!views.size) byModel.delete(uid);
  };
  // One frame later the view is in the page and its output can be told.
  const frame = requestAnimationFrame(() => {
    entry.host = root.closest(".jp-OutputArea-output");
    for (const old of [...views]) {
      if (old !== entry && !old.root.isConnected && old.host?.contains(root)) {
        old.life.dispose();
        views.delete(old);
      }
    }
  });
  life.add(() => cancelAnimationFrame(frame));
  return forget;
}
