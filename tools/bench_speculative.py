"""`tools/bench_engine.py --speculative [--gguf FILE]`: prompt-lookup speculative decoding on the
real model, on and off in one run and one engine (the request field switches it), greedy, at
batch 1 and 8 concurrent, on two workloads:

- input-grounded: a paragraph of >= 300 tokens (checked with the model's tokenizer) to quote back
  in full with one word replaced. Asked as "rewrite the following paragraph exactly, changing
  only ...", SmolLM2-135M paraphrased and looped instead of copying; asked this way it quotes the
  paragraph (docs/benchmarks.md, 2026-12-06);
- open generation: short creative prompts whose replies copy nothing.

Each (workload, concurrency) runs plain and speculative alternately `--rounds` times (the box is
shared: alternating spreads its noise over both) after the engine's warm-up (every program
compiled, as `serve` does) and one untimed pass. Reports tok/s (completion tokens over wall time,
prefill included: the same prompts both ways), the ratio, and the acceptance rate; replies are
checked identical both ways. `--spec-workloads open_8` runs one of them (the one whose
replies end unevenly, so it is also where slot compaction shows).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_jax import checkpoint  # noqa: E402
from llama_jax.convert import convert  # noqa: E402
from llama_jax.engine import Engine, EngineConfig  # noqa: E402
from llama_jax.request import Request, SamplingOptions  # noqa: E402
from llama_jax.speculative import SpeculativeConfig  # noqa: E402
from llama_jax.tokenizer import apply_chat_template, load_tokenizer  # noqa: E402

DEFAULT_GGUF = Path(__file__).resolve().parents[2] / "shared" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PARAGRAPHS = [
    "The harbour town woke slowly on winter mornings. Before the sun had cleared the eastern hills, the fishermen "
    "were already down at the quay, coiling ropes, checking nets and arguing about the weather in low voices. The "
    "baker on the corner opened his shutters at six, and the smell of fresh bread drifted along the narrow streets "
    "towards the water. Children ran past on their way to school, their breath white in the cold air, while their "
    "grandparents sat by the windows with cups of tea and watched the boats leave one by one. By eight o'clock the "
    "harbour was quiet again, the gulls circling over the empty moorings and the tide creeping slowly up the stone "
    "steps. In the afternoon the first boats returned, low in the water with the day's catch, and the market hall "
    "filled with buyers from the inland villages. Prices were shouted, crates were stacked and carried, and the "
    "whole town seemed to gather for an hour around the long wooden tables. When the light began to fade, the "
    "lamps along the sea wall were lit one after another, and the town settled into the long, calm evening that "
    "everyone who lived there knew so well. On Sundays the market stayed closed, and families walked along the "
    "cliffs above the bay, pointing out the lighthouse and the small island beyond it. In summer the town filled "
    "with visitors who came for the beaches and the seafood, but in winter it belonged to the people who had always "
    "lived there, and most of them liked it best that way. Nobody could remember a winter when the boats had "
    "stayed in the harbour for more than a week.",
    "Our team spent the first three months of the project collecting requirements from the people who would use "
    "the new system every day. We interviewed nurses, doctors, receptionists and the staff of the hospital "
    "pharmacy, and we watched how they worked during busy shifts and quiet ones. Most of them told us the same "
    "thing: the old system was slow, it asked for the same information several times, and it hid the most "
    "important details behind too many screens. We wrote down every complaint and every suggestion, grouped them "
    "by theme, and then ranked them with the help of a small committee of users. The committee met every two "
    "weeks and reviewed our designs on paper before we wrote any code. This slowed us down at the start, but it "
    "saved a great deal of work later, because the features we built were the ones people really needed. By the "
    "end of the first year the new system was used in every ward, and the average time to admit a patient had "
    "fallen from twenty minutes to less than eight. The staff said that the biggest change was not speed but "
    "confidence: they trusted the information on the screen again. We also learned that training mattered as much "
    "as design: every ward chose two members of staff to test each new release first and to teach their "
    "colleagues. Their feedback reached us within days, and small problems were fixed before they could grow into "
    "large ones. Looking back, the project succeeded because the people who used the system helped to build it, "
    "and because we listened to them long before we showed them anything.",
]
CHANGES = [("town", "village"), ("boats", "ships"), ("quiet", "silent"), ("evening", "night"),
           ("team", "group"), ("system", "platform"), ("committee", "panel"), ("staff", "employees")]
OPEN = ["Write a short story about a dragon who is afraid of the dark.", "Describe your ideal holiday.",
        "Invent a new sport and explain its rules.", "Write a poem about autumn leaves.",
        "What would you do with a time machine?", "Tell me about a robot learning to cook.",
        "Write a letter to your future self.", "Describe a city on Mars in the year 2200."]


def grounded_prompts(tokenizer) -> list[list[int]]:
    """Each paragraph is over 300 tokens of input (issue 27), the instruction and chat template aside."""
    short = {n for n in (len(tokenizer.encode(p)) for p in PARAGRAPHS) if n < 300}
    assert not short, f"a grounded paragraph has fewer than 300 tokens with this tokenizer: {short}"
    return [apply_chat_template(tokenizer, [{"role": "user", "content": (
        f"Here is a paragraph:\n\n\"{PARAGRAPHS[i // 4]}\"\n\nQuote the paragraph back to me in full, with \"{old}\" "
        f"replaced by \"{new}\".")}]) for i, (old, new) in enumerate(CHANGES)]


def open_prompts(tokenizer) -> list[list[int]]:
    return [apply_chat_template(tokenizer, [{"role": "user", "content": c}]) for c in OPEN]


def run(engine: Engine, prompts: list[list[int]], concurrent: bool, speculative: bool, max_tokens: int) -> dict:
    """Greedy replies to `prompts` (all at once, or one after another); wall time and counts."""
    start, results, verify_steps = time.perf_counter(), [], engine.verify_steps
    request = lambda p: Request(prompt=p, max_tokens=max_tokens, speculative=speculative,
                                sampling=SamplingOptions(temperature=0))
    if concurrent:
        results = [h.result() for h in [engine.submit(request(p)) for p in prompts]]
    else:
        results = [engine.submit(request(p)).result() for p in prompts]
    return {"seconds": time.perf_counter() - start, "tokens": sum(r.completion_tokens for r in results),
            "drafted": sum(r.drafted_tokens for r in results), "accepted": sum(r.accepted_tokens for r in results),
            "verify_steps": engine.verify_steps - verify_steps, "replies": [[t.token_id for t in r.choices[0].tokens] for r in results]}


def bench_speculative(args) -> dict:
    gguf = args.gguf or DEFAULT_GGUF
    with tempfile.TemporaryDirectory() as tmp:
        dtype = args.dtype or "float32"
        convert(gguf, Path(tmp) / dtype, dtype=dtype, progress=False)
        loaded = checkpoint.load(Path(tmp) / dtype)
        tokenizer = load_tokenizer(loaded.tokenizer_path)
    speculative = SpeculativeConfig(tokens=args.speculative_tokens, min_n=args.speculative_min_n,
                                    verify_cost=args.speculative_verify_cost)  # None: measured at warm-up
    config = EngineConfig(max_slots=8, max_seq_len=args.max_seq_len, compilation_cache_dir=args.compilation_cache,
                          speculative=speculative)
    start = time.perf_counter()
    engine = Engine(loaded.model, tokenizer, config).start()  # every program, as `serve` does: no compile in a timed round
    warmup_s = time.perf_counter() - start
    workloads = {"grounded": grounded_prompts(tokenizer), "open": open_prompts(tokenizer)}
    out: dict = {"model": gguf.name, "dtype": dtype, "device": jax.devices()[0].device_kind, "speculative_tokens": args.speculative_tokens,
                 "verify_costs": {rows: round(c, 2) for rows, c in engine.verify_costs.items()}, "warmup_s": round(warmup_s, 1),
                 "min_n": args.speculative_min_n, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "prompt_tokens": {w: [len(p) for p in ps] for w, ps in workloads.items()}}
    try:
        for name, prompts in workloads.items():
            for batch in (1, 8):
                if args.spec_workloads and f"{name}_{batch}" not in args.spec_workloads:
                    continue
                chosen = prompts[:args.batch1_prompts] if batch == 1 else prompts
                for spec in (False, True):  # untimed
                    run(engine, chosen[:1] if batch == 1 else chosen, batch > 1, spec, args.spec_max_tokens)
                totals = {False: [], True: []}
                for _ in range(args.rounds):
                    for spec in (False, True):
                        totals[spec].append(run(engine, chosen, batch > 1, spec, args.spec_max_tokens))
                plain, fast = totals[False], totals[True]
                same = sum(a == b for p, f in zip(plain, fast) for a, b in zip(p["replies"], f["replies"]))
                rate = lambda runs: sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs)
                drafted, accepted = sum(r["drafted"] for r in fast), sum(r["accepted"] for r in fast)
                key = f"{name}_batch{batch}"
                out[key] = {"plain_tok_s": round(rate(plain), 2), "speculative_tok_s": round(rate(fast), 2),
                            "ratio": round(rate(fast) / rate(plain), 3), "tokens_per_run": plain[0]["tokens"],
                            "identical_replies": f"{same}/{sum(len(p['replies']) for p in plain)}",
                            "drafted": drafted, "accepted": accepted,
                            "acceptance": round(accepted / drafted, 3) if drafted else None,
                            "verify_steps": [r["verify_steps"] for r in fast],
                            "runs_s": {"plain": [round(r["seconds"], 2) for r in plain],
                                       "speculative": [round(r["seconds"], 2) for r in fast]}}
                out[key]["verify_costs_after"] = {rows: round(c, 2) for rows, c in engine.verify_costs.items()}  # served steps'
                print(key, out[key], file=sys.stderr, flush=True)
    finally:
        engine.stop()
    return out
