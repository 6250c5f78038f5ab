"""IPython magics: a thin layer over the Python API (``nb_offload.load`` and ``OffloadedModel``).

``%load_ext nb_offload`` registers them and imports no torch: that happens with the first model.
Errors from the API (``OffloadError``) show as one short line and fail the cell.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import errno
import keyword
import math
import os
import re
import shlex
import sys
import time

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, Int, Unicode

from . import options
from .budget import format_size, link_gbps
from .errors import BudgetError, OffloadError, OptionError
from .views import moves_text

# %%offload keys: the model, the variable, pins (as `pin:`), and every load option but the progress
# bar (a %config default here)
OPTION_KEYS = tuple(n for n in options.names() if n not in ("pins", "progress"))
OFFLOAD_KEYS = ("model",) + OPTION_KEYS + ("pin", "as")


def _number(kind, accepted, ok):
    """An argparse type: ``kind(text)`` where ``ok`` holds it, else an error that says what is accepted
    (argparse's own says only "invalid int value", and takes nan or 0 as a rate)."""
    def convert(text):
        try:
            value = kind(text)
            if ok(value):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"{text} is not valid; give {accepted}")
    return convert


COUNT = _number(int, "an int >= 1", lambda n: n >= 1)
RATE = _number(float, "a rate in GB/s > 0", lambda x: x > 0 and math.isfinite(x))
# what torch.manual_seed takes; a negative seed s stands for 2**64 + s there
SEED = _number(int, "an int from -2**63 to 2**64-1", lambda n: -2**63 <= n < 2**64)
TEMPERATURE = _number(float, "a temperature >= 0 (0: greedy)", lambda t: t >= 0 and math.isfinite(t))
TOP_P = _number(float, "a share 0 < p <= 1", lambda p: 0 < p <= 1)


def _model_and_budget_arguments(func):
    """The options %offload_load and %offload_plan share: the model, its budgets, dtype, quantization, context."""
    def helps(name, more=""):       # argparse formats help with %: a literal one is written %%
        return (options.help_of(name) + more).replace("%", "%%")
    for arg in (argument("--context", type=COUNT, metavar="N", help=helps("context")),
                argument("--quant", metavar="Q", help="bitsandbytes quantization of the blocks' Linears: int8, nf4 "
                         "or fp4 (pip install 'nb_offload[quant]'); a %%offload body also takes a mapping, e.g. "
                         "{format: nf4, double_quant: true}"),
                argument("--dtype", metavar="D", help=helps("dtype")),
                argument("--disk", metavar="DIR", help=helps("disk")),
                argument("--cpu", metavar="SIZE", help=helps("cpu")),
                argument("--gpu", metavar="SIZE", help=helps("gpu", "; %offload_plan plans for a GPU with it "
                                                                     "even on a machine without one")),
                argument("model", metavar="MODEL",
                         help="a folder in the save_pretrained layout, or a Hub id in the local cache")):
        func = arg(func)
    return func


def _compute_arguments(func):
    """The options %offload_load and %offload_plan share on where the CPU computes and how it multiplies."""
    for arg in (argument("--cpu-kernel", metavar="K", help=options.help_of("cpu_kernel").replace("%", "%%")),
                argument("--expert-compute", metavar="WHERE", help="MoE models: " + options.help_of("expert_compute")
                         .replace("%", "%%")),
                argument("--compute", metavar="WHERE", help=options.help_of("compute").replace("%", "%%"))):
        func = arg(func)
    return func


def replan_note(llm) -> str:
    """The line ``%%generate`` prints after a generate that made the model plan again at the CPU's rate reached."""
    at_load, reached = llm.replanned_at
    on_cpu = sum(1 for e in llm.plan if e.compute == "cpu")
    return (f"[planned again at the rate the CPU's blocks reached decoding, {reached:.1f} GB/s ({at_load:.1f} "
            f"measured at load): {on_cpu} blocks computed on the CPU, {llm.plan.prefetch} "
            f"{'pieces' if llm.plan.split_blocks else 'units'} copied ahead; "
            "%offload_plan shows the plan]")


def _name_argument(help="which loaded model (default: the most recent)"):
    return argument("name", nargs="?", default=None, metavar="NAME", help=help)


def _share_or_word(text):
    """An ``expert_compute`` as typed: a number is a share, a word is passed on (the options check both)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _check_name(name, spelling="--as"):
    """The variable a magic binds must be a plain name: not a keyword, and not a builtin it would hide
    for the rest of the session (``--as print``)."""
    if not name.isidentifier():
        problem = "is not a Python name"
    elif keyword.iskeyword(name):
        problem = "is a Python keyword"
    elif name in dir(builtins):
        problem = f"would hide the builtin {name}"
    else:
        return name
    raise OptionError(f"{spelling} {name} {problem}; give a name such as llm or model2.")


def _unwritable(path, exc: OSError) -> str:
    """Why a file can't be written at ``path``, naming the folder, and what to give instead."""
    folder = os.path.dirname(os.path.abspath(path))
    if exc.errno == errno.EISDIR:
        return f"that is a folder; give a file in it, e.g. --export {os.path.join(path, 'trace.json')}."
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        problem = f"{folder} is not a folder" if os.path.exists(folder) else f"the folder {folder} does not exist"
        return f"{problem}; create it first, or give FILE.json in an existing folder."
    return f"the folder {folder} can't be written ({exc.strerror}); give FILE.json in a folder you can write to."


# The options a line magic takes as flags (--gpu 6GiB); a %%offload body takes every option as a key.
FLAGGED = ("gpu", "cpu", "disk", "dtype", "quant", "context", "device", "pins")


@contextlib.contextmanager
def _spoken_as_typed(cell: bool):
    """The API names an option as its keyword (``give cpu= at least 2 GiB``); a magic user typed a flag
    (``--cpu``) or a cell key (``cpu:``): its errors are re-raised in that spelling."""
    try:
        yield
    except OffloadError as exc:
        text = str(exc)
        for name in OPTION_KEYS + ("pins",) if cell else FLAGGED:
            typed = ("pin:" if cell else "--pin") if name == "pins" else (f"{name}:" if cell else f"--{name}")
            text = re.sub(rf"(?<![\w-]){name}=(?=\S)", typed + " ", text)
            text = re.sub(rf"(?<![\w-]){name}=", typed, text)
        if text == str(exc):
            raise
        raise type(exc)(text) from exc


def _out_of_memory(exc) -> bool:
    """A budget too small, or the GPU running out (the loader re-raises that as an OffloadError from it)."""
    torch = sys.modules.get("torch")       # loaded by then, unless the load failed before it
    oom = (torch.cuda.OutOfMemoryError,) if torch is not None else ()
    return isinstance(exc, (BudgetError, *oom)) or isinstance(exc.__cause__, oom)


@magics_class
class OffloadMagics(Magics):
    """Load, run, re-pin and inspect offloaded models from notebook cells.

    Defaults for every magic can be set with ``%config OffloadMagics.<option> = value``.
    """

    # Defaults for the options every loading magic takes, where the cell doesn't give them; checked
    # with the rest when a model loads.
    default_gpu = Unicode(None, allow_none=True,
                          help="Used when --gpu is not given: " + options.help_of("gpu")).tag(config=True)
    default_cpu = Unicode(None, allow_none=True,
                          help="Used when --cpu is not given: " + options.help_of("cpu")).tag(config=True)
    default_disk = Unicode(None, allow_none=True,
                          help="Used when --disk is not given: " + options.help_of("disk")).tag(config=True)
    default_dtype = Unicode(None, allow_none=True,
                          help="Used when --dtype is not given: " + options.help_of("dtype")).tag(config=True)
    default_context = Int(0, help="Used when --context is not given (0: the model's): "
                                  + options.help_of("context")).tag(config=True)
    max_new_tokens = Int(128, help="%%generate's --max-new-tokens default.").tag(config=True)
    stream = Bool(True, help="Stream tokens into the output as they are made.").tag(config=True)
    progress = Bool(True, help="Show a progress bar while loading.").tag(config=True)
    dashboard = Bool(True, help="In Jupyter, show the dashboard widget (layer map, memory, timeline) "
                                "after %offload_load and %offload_status; the plan table elsewhere.").tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.models: dict = {}        # name -> OffloadedModel, in load order

    # -- helpers -------------------------------------------------------------------------
    def _pick(self, name):
        if not self.models:
            raise OffloadError("no model is loaded; load one with %offload_load MODEL --as NAME.")
        if name is None:
            return next(reversed(self.models)), self.models[next(reversed(self.models))]
        if name not in self.models:
            raise OffloadError(f"no loaded model is named {name!r}; loaded: {', '.join(self.models)}.")
        return name, self.models[name]

    def _parse(self, magic, line):
        """A magic's line, split by POSIX shell rules (quotes group a value with spaces and are removed;
        IPython's own split keeps them), parsed by the parser its @argument decorators built.
        Every mistake becomes an OptionError that names it and shows the usage."""
        parser = magic.parser
        escape = "%%" if parser.prog in self.magics["cell"] else "%"
        # IPython's usage is an RST block, "::\n\n  %name [--opt X] ...": made one line, as errors show
        usage = escape + " ".join(parser.format_usage().partition("%")[2].split())
        try:
            words = shlex.split(line)
        except ValueError as exc:         # an unclosed quote, or a backslash at the end
            raise OptionError(f"{escape}{parser.prog} {line.strip()}: {str(exc).lower()}; quote a value "
                              f"with spaces as \"a b\" or 'a b'. Usage: {usage}") from None
        try:
            return parser.parse_args(words)
        except UsageError as exc:         # what MagicArgumentParser makes of every argparse error
            message = str(exc)
            if message.startswith("argument "):   # "argument --link: 0 is not valid" -> "--link 0 is not valid"
                message = message[len("argument "):].replace(": ", " ", 1)
            raise OptionError(f"{escape}{parser.prog}: {message}. Usage: {usage}") from None

    def _load(self, model, *, name, spelling="--as", **given):
        """Load with the options given (None: not given, so the %config default, else load's own)."""
        from . import loader
        _check_name(name, spelling)
        cell = spelling.startswith("%%")
        kwargs = {**self._with_defaults(**given), "progress": self.progress}
        with _spoken_as_typed(cell):
            options.Options.given("load", kwargs)      # a badly written option fails here, before the memory hint
        # A model already under this name stays loaded and bound until the new one has loaded: a
        # failed load must not lose it. Only then is the old one freed.
        try:
            with _spoken_as_typed(cell):
                llm = loader.load(model, **kwargs)
        except Exception as exc:
            if name not in self.models or not _out_of_memory(exc):
                raise
            cls = type(exc) if isinstance(exc, OffloadError) else OffloadError
            raise cls(f"{exc} The model loaded before as {name} still holds its memory; "
                      f"%offload_unload {name} frees it first.") from exc
        if name in self.models:
            self.models.pop(name).unload()
        self.models[name] = llm
        self.shell.user_ns[name] = llm
        self._show_model(llm)
        return llm

    def _with_defaults(self, **given) -> dict:
        """Options as given (None: not given), else the %config defaults that are set. Only an absent
        value takes the default: 0 or "" is passed on, for the API to refuse."""
        defaults = dict(gpu=self.default_gpu, cpu=self.default_cpu, disk=self.default_disk, dtype=self.default_dtype,
                        context=self.default_context or None)     # a %config 0 means the model's
        out = {k: v for k, v in defaults.items() if v is not None}
        out.update((k, v) for k, v in given.items() if v is not None)
        return out

    def _drop(self, name):
        """Unload a model and remove its variable."""
        self.models.pop(name).unload()
        if self.shell is not None:
            self.shell.user_ns.pop(name, None)

    def _show(self, obj):
        from IPython.display import display
        display(obj)

    def _show_model(self, llm):
        """The dashboard where widgets can render (a Jupyter kernel), else the plan table."""
        if self.dashboard and self._in_kernel():
            try:
                board = llm.dashboard()
            except OffloadError:       # widgets not installed: the table still says it all
                board = None
            if board is not None:
                self._show(board)
                return
        self._show(llm.plan)

    def _in_kernel(self) -> bool:
        return self.shell is not None and type(self.shell).__name__ == "ZMQInteractiveShell"

    # -- loading -------------------------------------------------------------------------
    @magic_arguments()
    @_model_and_budget_arguments
    @_compute_arguments
    @argument("--pin", nargs="+", default=[], metavar="PATTERN=TIER",
              help="keep units on a tier, e.g. model.layers.0-3=gpu lm_head=gpu")
    @argument("--device", metavar="D", help="cuda, cuda:N or cpu")
    @argument("--as", dest="name", default="llm", metavar="NAME", help="variable to bind the model to (default llm)")
    @line_magic
    def offload_load(self, line):
        """Load a model through the memory tiers and bind it to a variable.

        Usage: %offload_load MODEL [--gpu SIZE] [--cpu SIZE] [--disk DIR] [--dtype D] [--quant Q]
                             [--pin PATTERN=TIER ...] [--context N] [--device D] [--as NAME]
                             [--compute WHERE] [--expert-compute WHERE] [--cpu-kernel K]

        Examples:
            %offload_load ./llama-7b --gpu 6GiB --cpu 24GiB --disk ./offload --pin model.layers.0-3=gpu --as llm
            %offload_load ./llama-7b --gpu 4GiB --quant nf4
            %offload_load ./llama-7b --gpu 4GiB --compute hybrid     # the CPU computes blocks too
            %offload_load ./llama-7b --gpu 4GiB --compute hybrid --cpu-kernel fast   # by its own kernel
        """
        args = self._parse(self.offload_load, line)
        pins = {}
        for item in args.pin:
            pattern, sep, tier = item.rpartition("=")
            if not (sep and pattern and tier):
                raise OptionError(f"--pin {item} is not PATTERN=TIER; e.g. --pin model.layers.0-3=gpu.")
            pins[pattern] = tier
        self._load(args.model, name=args.name, gpu=args.gpu, cpu=args.cpu, disk=args.disk, dtype=args.dtype,
                   quant=args.quant, pins=pins or None, context=args.context, device=args.device,
                   compute=args.compute, expert_compute=_share_or_word(args.expert_compute),
                   cpu_kernel=args.cpu_kernel)

    @magic_arguments()
    @_name_argument("variable to bind the model to (default: the as: key, else llm)")
    @cell_magic
    def offload(self, line, cell):
        """Load a model configured in the cell body, one ``key: value`` a line (YAML).

        Usage: %%offload [NAME]
        Keys: model, as (the variable), pin (a mapping of pattern to tier), and every option of
        nb_offload.load but pins and progress, spelled as there (help(nb_offload.load) lists them).

        Example:
            %%offload llm2
            model: ./checkpoints/my-13b
            gpu: 10GiB
            cpu: 40GiB
            disk: ./offload
            dtype: bfloat16
            quant: {format: nf4, double_quant: true}
            pin:
              model.layers.0-7: gpu
        """
        args = self._parse(self.offload, line)
        import yaml
        try:
            cfg = yaml.safe_load(cell) or {}
        except yaml.YAMLError as exc:
            # the problem and its line, not YAML's excerpt over several lines: errors show as one line
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise OptionError(f"%%offload body is not valid YAML ({getattr(exc, 'problem', None) or exc}{where}); "
                              "write one `key: value` a line.") from None
        if not isinstance(cfg, dict):
            raise OptionError(f"%%offload body must be `key: value` lines, got {type(cfg).__name__}.")
        unknown = sorted(str(k) for k in cfg if k not in OFFLOAD_KEYS)    # str: YAML keys may be numbers
        if unknown:
            raise OptionError(f"%%offload: unknown key(s) {unknown}; accepted keys: {', '.join(OFFLOAD_KEYS)}.")
        if cfg.get("model") is None:
            raise OptionError("%%offload needs a `model:` line (a folder or a Hub id).")
        for key, value in cfg.items():
            if key not in ("pin", "quant") and isinstance(value, (list, dict)):
                raise OptionError(f"%%offload `{key}: {value}` is not valid; every key but pin and quant takes one "
                                  "value, e.g. `gpu: 6GiB`.")
        for key in options.FLAGS:           # said in the cell's own spelling
            if key in cfg and not isinstance(cfg[key], bool):
                if isinstance(cfg[key], str) and cfg[key].strip().lower() in ("true", "false"):
                    raise OptionError(f"%%offload `{key}: {cfg[key]!r}` is quoted text; write {key}: "
                                      f"{cfg[key].strip().lower()} without quotes.")
                raise OptionError(f"%%offload `{key}: {cfg[key]}` is not valid; accepted: true or false.")
        pins = cfg.get("pin") or {}
        if not isinstance(pins, dict):
            raise OptionError(f"%%offload `pin:` must be a mapping of pattern to tier, got {pins!r}.")
        name, spelling = (args.name, "%%offload") if args.name else (str(cfg.get("as") or "llm"), "%%offload as:")
        given = {k: cfg[k] for k in OPTION_KEYS if k in cfg}
        for k in ("gpu", "cpu", "revision"):    # YAML reads `gpu: 6000000000` or `revision: 1234567` as numbers
            if given.get(k) is not None:
                given[k] = str(given[k])
        self._load(str(cfg["model"]), name=name, spelling=spelling, pins={str(k): v for k, v in pins.items()},
                   **given)

    # -- generating ----------------------------------------------------------------------
    @magic_arguments()
    @argument("--model", default=None, metavar="NAME", help="which loaded model (default: the most recent)")
    @argument("--max-new-tokens", type=COUNT, default=None, metavar="N",
              help="tokens to generate (default 128, or %%config OffloadMagics.max_new_tokens)")
    @argument("--temperature", type=TEMPERATURE, default=0.0, metavar="T", help="sampling temperature (0: greedy)")
    @argument("--top-p", type=TOP_P, default=None, metavar="P", help="nucleus sampling threshold, 0 < P <= 1")
    @argument("--seed", type=SEED, default=None, metavar="S", help="random seed for sampling")
    @argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    @argument("--system", default=None, metavar="TEXT", help="system message (implies --chat)")
    @argument("--no-stream", action="store_true", help="print the text at the end only")
    @argument("--as", dest="var", default=None, metavar="VAR", help="bind the generated text (a str) to this variable")
    @cell_magic
    def generate(self, line, cell):
        """Generate from the cell body as the prompt; tokens stream into the output.

        Usage: %%generate [--model NAME] [--max-new-tokens N] [--temperature T] [--top-p P]
                          [--seed S] [--chat] [--system TEXT] [--no-stream] [--as VAR]

        Ends with one line: tokens, tok/s, bytes streamed per tier and, on a GPU, the share of
        the PCIe limit. Interrupting the kernel stops generation; the partial text is kept.

        Example:
            %%generate --model llm --max-new-tokens 64 --as answer
            Explain model offloading in one paragraph.
        """
        args = self._parse(self.generate, line)
        if args.var is not None:
            _check_name(args.var)
        name, llm = self._pick(args.model)
        tok = llm.tokenizer
        if tok is None:
            raise OffloadError(f"model {name!r} has no tokenizer; load a folder with tokenizer files, "
                               f"or call {name}.generate(input_ids, ...) yourself.")
        max_new = self.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
        if max_new < 1:       # the option's type checks it; the %config default is checked here
            raise OptionError(f"OffloadMagics.max_new_tokens = {max_new} is not valid; give an int >= 1 "
                              "(%config OffloadMagics.max_new_tokens = 128).")
        prompt = cell.strip("\n")
        if args.chat or args.system:
            if not getattr(tok, "chat_template", None):
                raise OffloadError(f"--chat: the tokenizer of {name!r} has no chat template.")
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = tok(text, return_tensors="pt", add_special_tokens=False)
        else:
            inputs = tok(prompt, return_tensors="pt")
        kwargs = dict(max_new_tokens=max_new, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        if args.temperature > 0:
            kwargs.update(do_sample=True, temperature=args.temperature)
            if args.top_p is not None:
                kwargs["top_p"] = args.top_p
        else:
            kwargs["do_sample"] = False
        if args.seed is not None:
            import torch
            torch.manual_seed(args.seed)
        stream = self.stream and not args.no_stream
        streamer = TextStream(tok, echo=stream)
        before = llm.stats.as_dict()
        replanned = llm.replanned_at
        interrupted = False
        t0 = time.perf_counter()
        try:
            llm.generate(**inputs, streamer=streamer, **kwargs)
        except KeyboardInterrupt:
            interrupted = True
        seconds = time.perf_counter() - t0
        streamer.finish()
        text = streamer.text
        if not stream:
            print(text, end="")
        link = link_gbps(llm.device) if llm.device.type == "cuda" else None
        summary = llm.stats.run_summary(before, streamer.tokens, seconds, held_on=llm.plan.resident_tier,
                                        link_gbps=link, asked=None if interrupted else max_new)
        print(f"\n[{summary}]" + (" interrupted: partial text kept" if interrupted else ""))
        if llm.replanned_at is not None and replanned is None:
            print(replan_note(llm))
        if args.var:
            self.shell.user_ns[args.var] = text

    # -- re-pinning and inspecting ----------------------------------------------------------
    @magic_arguments()
    @_name_argument()
    @argument("pattern", metavar="PATTERN", help="module name with * globs and index ranges, e.g. model.layers.0-3")
    @argument("tier", metavar="TIER", help="gpu, cpu or disk (or cpu-compute: in host memory, computed by the CPU)")
    @line_magic
    def offload_pin(self, line):
        """Keep units on a tier; the rest are re-planned around them and bytes migrate.

        Usage: %offload_pin [NAME] PATTERN TIER
        TIER is gpu, cpu or disk, or cpu-compute (blocks kept in host memory and computed by the CPU there,
        on CUDA); PATTERN a module name with * globs and index ranges.

        Example:
            %offload_pin llm model.layers.20-23 gpu
            %offload_pin llm model.layers.10-15 cpu-compute
        """
        args = self._parse(self.offload_pin, line)
        name, llm = self._pick(args.name)
        moved = llm.pin(args.pattern, args.tier)
        print(f"{name}: pinned {args.pattern} to {args.tier}; {moves_text(moved, llm.plan)}.")
        self._show(llm.plan)

    @magic_arguments()
    @_name_argument()
    @argument("pattern", metavar="PATTERN", help="a pattern given to %%offload_pin, or one under it")
    @line_magic
    def offload_unpin(self, line):
        """Let the planner place units again.

        Usage: %offload_unpin [NAME] PATTERN

        Example:
            %offload_unpin llm model.layers.20-23
        """
        args = self._parse(self.offload_unpin, line)
        name, llm = self._pick(args.name)
        moved = llm.unpin(args.pattern)
        print(f"{name}: unpinned {args.pattern}; {moves_text(moved, llm.plan)}.")
        self._show(llm.plan)

    @magic_arguments()
    @_model_and_budget_arguments
    @argument("--link", type=RATE, default=None, metavar="GBPS", help="host-to-GPU GB/s for the prediction "
              "(default: measured here on a GPU, else 25)")
    @argument("--drive", type=RATE, default=1.0, metavar="GBPS", help="drive GB/s for the prediction (default 1)")
    @_compute_arguments
    @argument("--cpu-rate", type=RATE, default=None, metavar="GBPS", help="the CPU's GB/s on blocks and experts it "
              "computes, for the prediction (default: their time not counted)")
    @line_magic
    def offload_plan(self, line):
        """Dry run: where each unit would live, and the predicted decode speed. No weight is read.

        Usage: %offload_plan MODEL [--gpu SIZE] [--cpu SIZE] [--disk DIR] [--dtype D] [--quant Q]
                                   [--context N] [--link GBPS] [--drive GBPS]
                                   [--compute WHERE] [--expert-compute WHERE] [--cpu-kernel K]
                                   [--cpu-rate GBPS]

        Examples:
            %offload_plan ./llama-70b --gpu 20GiB --cpu 64GiB --disk ./offload
            %offload_plan ./llama-70b --gpu 20GiB --cpu 64GiB --quant nf4   # a quarter of the bytes to stream
            %offload_plan ./mixtral --gpu 3GiB --expert-compute auto --cpu-rate 40   # experts on the CPU too
            %offload_plan ./llama-7b --gpu 4GiB --compute hybrid --cpu-rate 40     # and blocks
        """
        from . import loader
        args = self._parse(self.offload_plan, line)
        given = dict(gpu=args.gpu, cpu=args.cpu, disk=args.disk, dtype=args.dtype, context=args.context,
                     quant=args.quant, expert_compute=_share_or_word(args.expert_compute), compute=args.compute,
                     cpu_kernel=args.cpu_kernel)
        with _spoken_as_typed(cell=False):
            plan = loader.plan(args.model, **self._with_defaults(**given))
        self._show(plan)
        link = args.link
        if link is None:
            import torch
            link = link_gbps() if torch.cuda.is_available() else 25.0
        step = plan.predicted_seconds_per_step(link_gbps=link, disk_gbps=args.drive, cpu_gbps=args.cpu_rate)
        share = plan.share_on_cpu(link, args.cpu_rate)
        if step:
            on_cpu = plan.cpu_bytes_per_token(share)
            print(f"predicted decode: at most {1 / step:.2f} tok/s (streams "
                  + ", ".join(f"{format_size(v)} from {k}" for k, v in plan.streamed_bytes_per_token(share).items())
                  + f" a token at {link:.0f} GB/s link, {args.drive:g} GB/s drive"
                  + (f"; the CPU computes from {format_size(on_cpu)} of host memory a token"
                     + (f" at {args.cpu_rate:g} GB/s" if args.cpu_rate else ", its time not counted (--cpu-rate)")
                     if on_cpu else "") + ")")
        else:
            print("predicted decode: nothing streams; the speed is the resident model's.")

    @magic_arguments()
    @_name_argument()
    @line_magic
    def offload_status(self, line):
        """Show a loaded model's plan and what it has done so far.

        Usage: %offload_status [NAME]

        Example:
            %offload_status llm
        """
        name, llm = self._pick(self._parse(self.offload_status, line).name)
        self._show_model(llm)
        print(f"{name}: {llm.stats}")

    @magic_arguments()
    @_name_argument()
    @argument("--export", default=None, metavar="FILE.json", help="write the trace as Chrome-trace JSON")
    @argument("--all", action="store_true", help="every run in the trace, the idle time between them cut out")
    @line_magic
    def offload_timeline(self, line):
        """The last run's reads, copies and compute (a generate, a cell), as a timeline; optionally exported.

        Usage: %offload_timeline [NAME] [--all] [--export FILE.json]

        Examples:
            %offload_timeline llm --export trace.json
            %offload_timeline llm --all     # every run, the idle time between cells cut out
        """
        args = self._parse(self.offload_timeline, line)
        name, llm = self._pick(args.name)
        from .views import Timeline
        self._show(Timeline(llm.trace, title=name, runs="all" if args.all else "last"))
        if args.export is not None:
            path = os.path.expanduser(args.export)
            try:
                llm.trace.export(path)
            except OSError as exc:
                raise OptionError(f"--export {args.export}: {_unwritable(path, exc)}") from None
            print(f"wrote {args.export} (open it in Perfetto or chrome://tracing)")

    @magic_arguments()
    @_name_argument("the model to unload (default: the most recent)")
    @argument("--all", action="store_true", help="unload every model")
    @line_magic
    def offload_unload(self, line):
        """Free a model's GPU, host and disk-staging memory and remove its variable.

        Usage: %offload_unload [NAME | --all]

        Example:
            %offload_unload llm
        """
        args = self._parse(self.offload_unload, line)
        names = list(self.models) if args.all else [self._pick(args.name)[0]]
        for name in names:
            self._drop(name)
            print(f"unloaded {name}")

    @line_magic
    def offload_list(self, line):
        """List the loaded models.

        Usage: %offload_list

        Example:
            %offload_list
        """
        if not self.models:
            print("no model loaded")
        for name, llm in self.models.items():
            totals = ", ".join(f"{t} {format_size(v)}" for t, v in llm.plan.totals().items() if v)
            print(f"{name}: {llm.name} on {llm.device} ({totals}); {llm.stats}")

    def unload_all(self):
        for name in list(self.models):
            self._drop(name)


class TextStream:
    """A transformers streamer that prints text as tokens arrive and keeps the whole of it."""

    def __init__(self, tokenizer, echo=True):
        self.tokenizer = tokenizer
        self.echo = echo
        self.ids: list[int] = []
        self.printed = 0
        self.tokens = 0
        self._prompt_seen = False

    def put(self, value):
        ids = value.reshape(-1).tolist()
        if not self._prompt_seen:          # generate first hands over the prompt
            self._prompt_seen = True
            return
        self.ids.extend(ids)
        self.tokens += len(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):        # half of a multi-byte character: wait for the rest
            return
        self._emit(text)

    def end(self):
        pass

    def finish(self):
        self._emit(self.text)

    def _emit(self, text):
        new = text[self.printed:]
        if new and self.echo:
            sys.stdout.write(new)
            sys.stdout.flush()
        self.printed = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
