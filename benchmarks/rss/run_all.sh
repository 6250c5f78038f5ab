#!/bin/sh
# The runs behind README.md's table and raw/H*.json (about 30 minutes on 2 cores).
# Usage: sh benchmarks/rss/run_all.sh [OUT_DIR]   (from the repository root)
set -e
OUT=${1:-/tmp/nb_rss/out}
mkdir -p "$OUT"
M=".venv/bin/python benchmarks/rss/measure.py"
$M --exp base,preimport,warm,no_tok,nohold,mm64rt,trim,charge0,charge32,charge32+mm64rt,charge32+inplace+mm64rt --gens 3 --json "$OUT/H16.json"
$M --exp base,mm64rt,static+mm64rt,charge32+inplace,charge32+inplace+mm64rt,charge32+inplace+static+mm64rt --prompt 480 --gens 2 --json "$OUT/H480.json"
$M --model bf16 --exp base,inplace,mm64rt,charge32+inplace,charge32+inplace+mm64rt --gens 3 --json "$OUT/H16b.json"
$M --model bf16 --exp base,charge32+inplace+mm64rt --prompt 480 --gens 2 --json "$OUT/H480b.json"
$M --model fp32tok32k --exp base,charge32+inplace+mm64rt,charge32+tokfirst+inplace+mm64rt --gens 3 --json "$OUT/H16t.json"
$M --exp dropcache,dropcache+bounce256k,charge32+inplace+mm64rt+dropcache+bounce256k --gens 3 --json "$OUT/H16d.json"
# one source at a time, 2 repetitions each (raw/A-single-sources-2reps.json)
$M --exp base,preimport,warm,no_tok,nohold,mmap64k,mmap1m,mmap1m_trim,arena2,trim,trim_step,rt1,notrace,omp1,static,dropcache,dropcache+bounce256k --gens 3 --reps 2 --json "$OUT/A.json"
# generate time against the malloc settings, full context
$M --exp preimport+nohold,preimport+nohold+mm64rt,preimport+nohold+static+mm64rt,preimport+nohold+mm256,preimport+nohold+mm512 --budgets 120MiB --prompt 480 --gens 2 --reps 3 --json "$OUT/T480.json"
