// Sizes as nb_offload.budget.format_size prints them; durations in s, ms or µs.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function formatSize(n: number): string {
  let i = 0;
  while (Math.abs(n) >= 1024 && i < UNITS.length - 1) {
    n /= 1024;
    i++;
  }
  if (i === 0) return `${Math.trunc(n)} B`;
  return `${Math.abs(n) < 100 ? n.toFixed(1) : n.toFixed(0)} ${UNITS[i]}`;
}

export function formatSeconds(s: number): string {
  const a = Math.abs(s);
  if (a === 0) return "0";
  if (a >= 1) return `${s.toFixed(a >= 10 ? 1 : 2)} s`;
  if (a >= 1e-3) return `${(s * 1e3).toFixed(a >= 1e-2 ? 1 : 2)} ms`;
  return `${(s * 1e6).toFixed(0)} \u00b5s`;
}
