"""Bad input to the magics fails the cell with an OffloadError that names the value, in the magic's
own spelling (--link, --max-new-tokens, `key: value`), never a raw Python exception."""

import errno
import os
import shutil

import pytest
from helpers import run_cell as run

from nb_offload import BudgetError, OffloadError, OptionError, PinError


@pytest.fixture(scope="module")
def folder(model_dirs):
    return model_dirs("llama")


@pytest.fixture(scope="module")
def llm(shell, folder):
    """A model loaded as `llm`, for the magics that need one."""
    run(shell, f"%offload_load {folder} --device cpu --as llm")
    yield shell.user_ns["llm"]
    shell.run_cell("%offload_unload --all", store_history=False)


def output(sh, code, capsys):
    capsys.readouterr()
    run(sh, code)
    return capsys.readouterr().out


# -- 1: %offload_plan rates --------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--link 0", "--drive 0", "--link -1", "--drive -2.5", "--link nan",
                                    "--drive inf", "--link fast"])
def test_plan_rates_must_be_positive(shell, folder, option):
    # --gpu: a plan for a GPU too small for the weights, so bytes stream over the link
    with pytest.raises(OptionError, match=rf"{option} is not valid; give a rate in GB/s > 0\. Usage: %offload_plan"):
        run(shell, f"%offload_plan {folder} --gpu 67MiB --cpu 1GiB {option}")


# -- 2: unclosed quotes in %offload_pin / %offload_unpin ----------------------------------------
@pytest.mark.parametrize("line", ['%offload_pin llm "model.layers.0 cpu', "%offload_unpin llm 'model.layers.0"])
def test_unclosed_quote_is_an_option_error(shell, llm, line):
    magic = line.split()[0]
    with pytest.raises(OptionError, match=rf"{magic} llm .model\.layers\.0.*no closing quotation.*Usage: {magic}"):
        run(shell, line)


# -- 3: %%generate numbers ----------------------------------------------------------------------
@pytest.mark.parametrize("option,accepted", [
    ("--seed 1e20", "an int from -2\\*\\*63 to 2\\*\\*64-1"),
    (f"--seed {2**64}", "an int from -2\\*\\*63 to 2\\*\\*64-1"),
    (f"--seed {-2**63 - 1}", "an int from -2\\*\\*63 to 2\\*\\*64-1"),
    ("--top-p -1", "a share 0 < p <= 1"),
    ("--top-p 0", "a share 0 < p <= 1"),
    ("--top-p 1.5", "a share 0 < p <= 1"),
    ("--temperature -1", "a temperature >= 0 \\(0: greedy\\)"),
    ("--temperature nan", "a temperature >= 0"),
    ("--max-new-tokens 0", "an int >= 1"),
    ("--max-new-tokens -3", "an int >= 1"),
])
def test_generate_rejects_bad_numbers(shell, llm, option, accepted):
    # sampling on, so --top-p counts; one token, should it not be refused
    others = " --max-new-tokens 1" if "max-new-tokens" not in option else ""
    others += " --temperature 1" if "temperature" not in option else ""
    with pytest.raises(OptionError, match=rf"%%generate: {option} is not valid; give {accepted}"):
        run(shell, f"%%generate {option}{others}\nhello")


def test_seed_range_ends_are_accepted(shell, llm, capsys):
    for seed in (-2**63, 2**64 - 1):
        out = output(shell, f"%%generate --seed {seed} --temperature 0.7 --top-p 1 --max-new-tokens 1\nhello", capsys)
        assert "1 tokens in" in out
    with pytest.raises(OptionError, match=r"--seed 1\.5 is not valid"):
        run(shell, "%%generate --seed 1.5\nhello")


def test_zero_is_not_the_default_but_absent_is(shell, llm, folder, capsys):
    """`x or default` took 0 for absent; only an absent option takes the %config default."""
    run(shell, "%config OffloadMagics.max_new_tokens = 3")
    run(shell, "%config OffloadMagics.default_context = 64")
    try:
        assert "3 tokens in" in output(shell, "%%generate\nhello", capsys)
        assert "context 64" in output(shell, f"%offload_plan {folder}", capsys)
        with pytest.raises(OptionError, match=r"--context 0 is not valid; give an int >= 1"):
            run(shell, f"%offload_plan {folder} --context 0")
        with pytest.raises(OptionError, match=r"--context 0 is not valid; give an int >= 1"):
            run(shell, f"%offload_load {folder} --device cpu --context 0 --as ctx0")
        assert "ctx0" not in shell.user_ns
        with pytest.raises(OptionError, match=r"--max-new-tokens 0 is not valid; give an int >= 1"):
            run(shell, "%%generate --max-new-tokens 0\nhello")
        run(shell, "%config OffloadMagics.max_new_tokens = 0")
        with pytest.raises(OptionError, match=r"OffloadMagics\.max_new_tokens = 0 is not valid; give an int >= 1"):
            run(shell, "%%generate\nhello")
    finally:
        run(shell, "%config OffloadMagics.max_new_tokens = 128")
        run(shell, "%config OffloadMagics.default_context = 0")


# -- 4: %offload_timeline --export to a place that can't be written -------------------------------
def test_export_into_a_missing_folder(shell, llm, tmp_path):
    target = tmp_path / "some" / "missing" / "trace.json"
    with pytest.raises(OptionError, match=rf"--export {target}: the folder {tmp_path / 'some' / 'missing'} "
                                          "does not exist"):
        run(shell, f"%offload_timeline llm --export {target}")


def test_export_to_a_folder_or_under_a_file(shell, llm, tmp_path):
    with pytest.raises(OptionError, match=rf"--export {tmp_path}: that is a folder; give a file in it"):
        run(shell, f"%offload_timeline llm --export {tmp_path}")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(OptionError, match=rf"{tmp_path / 'notes.txt'} is not a folder"):
        run(shell, f"%offload_timeline llm --export {tmp_path / 'notes.txt' / 'trace.json'}")


def test_export_into_a_read_only_folder(shell, llm, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:       # root writes there anyway: fail the write as it fails for anyone else
        def refuse(self, path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        monkeypatch.setattr(type(llm.trace), "export", refuse)
    try:
        with pytest.raises(OptionError, match=rf"the folder {locked} can't be written \(Permission denied\)"):
            run(shell, f"%offload_timeline llm --export {locked / 'trace.json'}")
    finally:
        locked.chmod(0o700)


# -- 5: lines parsed by shell rules; argparse's errors as OptionErrors ------------------------------
def test_quoted_paths_with_spaces(shell, folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)       # a stray folder named ' or " would land here
    spaced = tmp_path / "a b"
    shutil.copytree(folder, spaced)
    disk = tmp_path / "offload here"
    # float16: units converted from the checkpoint's float32 are written to the disk folder
    run(shell, f"%offload_load \"{spaced}\" --device cpu --dtype float16 --disk '{disk}' "
               "--pin model.layers.3=disk --as spaced")
    try:
        llm = shell.user_ns["spaced"]
        assert llm.plan.tier_of("model.layers.3") == "disk"
        assert any(p.name.startswith("nb_offload-") for p in disk.iterdir())
        assert "predicted decode" in output(shell, f"%offload_plan '{spaced}' --context 64", capsys)
        trace = tmp_path / "my trace.json"
        run(shell, f'%offload_timeline "spaced" --export "{trace}"')
        assert trace.exists()
        run(shell, "%offload_pin 'spaced' \"model.layers.2\" disk")
        assert llm.plan.tier_of("model.layers.2") == "disk"
    finally:
        run(shell, "%offload_unload 'spaced'")
    strays = [p for p in tmp_path.rglob("*") if p.name[:1] in "'\"" or p.name[-1:] in "'\""]
    assert not strays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a b", "my trace.json", "offload here"]


def test_system_message_in_quotes(shell, llm, monkeypatch):
    seen = []
    template = llm.tokenizer.apply_chat_template
    monkeypatch.setattr(llm.tokenizer, "apply_chat_template",
                        lambda messages, **kw: seen.append(messages) or template(messages, **kw))
    run(shell, "%%generate --system 'Be brief, and kind.' --max-new-tokens 1 --no-stream\nhello")
    assert seen[0][0] == {"role": "system", "content": "Be brief, and kind."}


@pytest.mark.parametrize("line,named", [
    ("%offload_load {folder} --device cpu --bogus", "unrecognized arguments: --bogus"),
    ("%offload_load {folder} --context x", "--context x is not valid; give an int >= 1"),
    ("%offload_load {folder} --gpu", "--gpu expected one argument"),
    ("%offload_load --device cpu", "the following arguments are required: MODEL"),
    ("%offload_plan {folder} --drive fast", "--drive fast is not valid; give a rate in GB/s > 0"),
    ("%offload_pin llm", "the following arguments are required: TIER"),
    ("%offload_pin llm model.layers.0 cpu extra", "unrecognized arguments: extra"),
    ("%offload_unpin", "the following arguments are required: PATTERN"),
    ("%offload_status llm extra", "unrecognized arguments: extra"),
    ("%offload_timeline llm --export", "--export expected one argument"),
    ("%offload_unload llm extra", "unrecognized arguments: extra"),
    ("%%generate --max-new-tokens ten\nhello", "--max-new-tokens ten is not valid; give an int >= 1"),
    ("%%generate --stream\nhello", "unrecognized arguments: --stream"),
    ("%%offload llm extra\nmodel: x", "unrecognized arguments: extra"),
])
def test_usage_errors_are_option_errors(shell, llm, folder, line, named):
    magic = line.split()[0]
    with pytest.raises(OptionError) as info:
        run(shell, line.format(folder=folder))
    message = str(info.value)
    assert message.startswith(f"{magic}: {named}. Usage: {magic} "), message
    assert "\n" not in message
    assert shell.user_ns["llm"] is llm


def test_help_shows_the_usage(shell):
    """`%offload_pin?` and the like show the parser's usage and arguments, as the other magics do."""
    for kind, name in (("line", "offload_pin"), ("line", "offload_unpin"), ("line", "offload_status"),
                       ("cell", "offload")):
        doc = shell.magics_manager.magics[kind][name].__doc__
        assert f"%{name} [NAME]" in doc and "positional arguments:" in doc and "Example" in doc
    doc = shell.magics_manager.magics["line"]["offload_plan"].__doc__
    assert "%offload_plan [--gpu SIZE] [--cpu SIZE]" in doc and "--link GBPS" in doc


# -- 6: names to bind ---------------------------------------------------------------------------
BAD_NAMES = [("class", "is a Python keyword"), ("print", "would hide the builtin print"),
             ("1x", "is not a Python name")]


@pytest.mark.parametrize("bad,why", BAD_NAMES)
@pytest.mark.parametrize("cell,spelling", [
    ("%offload_load {folder} --device cpu --as {bad}", "--as"),
    ("%%offload {bad}\nmodel: {folder}\ndevice: cpu", "%%offload"),
    ("%%offload\nmodel: {folder}\ndevice: cpu\nas: {bad}", "%%offload as:"),
    ("%%generate --max-new-tokens 1 --as {bad}\nhello", "--as"),
])
def test_bad_names_are_refused(shell, llm, folder, cell, spelling, bad, why):
    with pytest.raises(OptionError, match=rf"^{spelling} {bad} {why}; give a name such as llm"):
        run(shell, cell.format(folder=folder, bad=bad))
    assert bad not in shell.user_ns
    assert list(shell._nb_offload_magics.models) == ["llm"]


# -- 7: a failed load under a name in use keeps the old model ---------------------------------------
def test_failed_reload_keeps_the_old_model(shell, folder, tmp_path, capsys):
    # float16 and a unit on disk: the model's own files in the disk folder, which the new one shares
    load = f"%offload_load {folder} --device cpu --dtype float16 --disk {tmp_path} --pin model.layers.3=disk"
    run(shell, f"{load} --as keep")
    assert list(tmp_path.glob("nb_offload-*"))
    old = shell.user_ns["keep"]
    try:
        with pytest.raises(PinError):
            run(shell, f"{load} no.such.module=cpu --as keep")
        with pytest.raises(BudgetError, match=r"^--cpu 1\.0 KiB is below.*give --cpu at least .* The model loaded "
                                              r"before as keep still "
                                              r"holds its memory; %offload_unload keep frees it first\.$"):
            run(shell, f"{load} --cpu 1KiB --as keep")
        with pytest.raises(BudgetError) as info:      # a badly written budget is no memory shortage
            run(shell, f"{load} --cpu 101% --as keep")
        assert "more than 100%" in str(info.value) and "still holds its memory" not in str(info.value)
        assert shell.user_ns["keep"] is old and shell._nb_offload_magics.models["keep"] is old
        assert "2 tokens in" in output(shell, "%%generate --model keep --max-new-tokens 2\nhello", capsys)
        with pytest.raises(BudgetError) as info:        # a new name: no old model to mention
            run(shell, f"{load} --cpu 1KiB --as fresh")
        assert "still holds" not in str(info.value) and "fresh" not in shell.user_ns
        # a load that works replaces it, and only then frees the old one
        run(shell, f"{load} --as keep")
        assert shell.user_ns["keep"] is not old and old._engine is None
        assert "2 tokens in" in output(shell, "%%generate --model keep --max-new-tokens 2\nhello", capsys)
    finally:
        shell.run_cell("%offload_unload keep", store_history=False)


# -- the rest: %offload_load --pin items, %%offload bodies ------------------------------------------
@pytest.mark.parametrize("item", ["foo", "=cpu", "model.layers.0="])
def test_pin_item_must_be_pattern_equals_tier(shell, folder, item):
    with pytest.raises(OptionError, match=rf"^--pin {item} is not PATTERN=TIER; e\.g\. --pin model\.layers\.0-3=gpu"):
        run(shell, f"%offload_load {folder} --device cpu --pin {item} --as pinned")
    assert "pinned" not in shell.user_ns


@pytest.mark.parametrize("body,named", [
    ("gpu: [1, 2]", r"%%offload `gpu: \[1, 2\]` is not valid; every key but pin and quant takes one value"),
    ("cpu: {a: 1}", r"%%offload `cpu: {'a': 1}` is not valid; every key but pin and quant takes one value"),
    ("trace: maybe", r"%%offload `trace: maybe` is not valid; accepted: true or false"),
    ('trust_remote_code: "true"', r"%%offload `trust_remote_code: 'true'` is quoted text; write "
                                  r"trust_remote_code: true without quotes"),
    ("1: a\nfoo: b", r"%%offload: unknown key\(s\) \['1', 'foo'\]"),
    ("model:", r"%%offload needs a `model:` line"),
    ("- a", r"%%offload body is not valid YAML \(expected <block end>, but found '-' at line 3\)"),
])
def test_offload_cell_values_of_the_wrong_kind(shell, folder, body, named):
    with pytest.raises(OptionError) as info:
        run(shell, f"%%offload typed\nmodel: {folder}\ndevice: cpu\n{body}\n")
    assert info.match(named) and "\n" not in str(info.value)
    assert "typed" not in shell.user_ns


def test_offload_cell_api_errors_still_name_the_value(shell, folder):
    """Values of the right kind but out of range are the API's to refuse; the cell fails the same way, in the
    cell's spelling (``batch:``, not the API's ``batch=``)."""
    for body, named in (("batch: x", "batch: 'x' is not valid"), ("context: 0", "context: 0 is not valid"),
                        ("pin:\n  lm_head: tape", "tier 'tape' is unknown")):
        with pytest.raises(OffloadError, match=named):
            run(shell, f"%%offload typed\nmodel: {folder}\ndevice: cpu\n{body}\n")
    assert "typed" not in shell.user_ns
