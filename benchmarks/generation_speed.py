"""Decode speed of IMSM versus plain peft LoRA, measured side by side in one run.

Model: a ~60M-parameter Llama built from a config (random weights: speed does not depend on them), LoRA r=16 on all
linear layers, 64-token prompts, 64 new tokens (greedy, no early stop), batch 1 and 8, float32 and bfloat16. Also
the speed-up of IMSM's two KV caches over recomputing the whole sequence at every token (what the paper's code
does), at 256 new tokens.

    python benchmarks/generation_speed.py [--repeats 5] [--device cpu|cuda] [--dtypes float32,bfloat16] [--json F]

For each setting and each of LoRA, IMSM as one doubled batch (rows [frozen; adapted], the default with LoRA) and
IMSM as two passes (``model.base_model.stacked_views = False``, the path of every other adapter) it prints:

* prefill: wall time of ``generate(max_new_tokens=1)`` (the prompt's forward and the first token), in ms;
* decode: tokens/s of the decoding steps alone, ``(new - 1) x batch / (t(new tokens) - t(1 token))``;
* end to end: ``new x batch / t(new tokens)``;

and IMSM/LoRA ratios. Runs are interleaved (LoRA, IMSM, IMSM two passes, LoRA, ...) and medians are reported, so
machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_model import CONFIG  # benchmarks/bench_model.py (the script's folder is on sys.path)
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_imsm


def build(kind: str, device: str, dtype: torch.dtype):
    """``kind``: "lora", "imsm" (both views as one doubled batch, the default for LoRA) or "imsm-2pass"."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device=device, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    config = peft_imsm.IMSMConfig(adapter_config=lora) if kind.startswith("imsm") else lora
    model = get_peft_model(model, config)
    if kind == "imsm-2pass":
        model.base_model.stacked_views = False
    model.eval()
    return model


def timed_generate(model, ids, mask, new_tokens: int, use_cache: bool = True) -> float:
    """Wall time in seconds of one greedy ``generate()`` of exactly ``new_tokens`` tokens."""
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, use_cache=use_cache, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


KINDS = ("lora", "imsm", "imsm-2pass")
LABELS = {"lora": "LoRA", "imsm": "IMSM (one doubled batch)", "imsm-2pass": "IMSM (two passes)"}


def run_dtype(args: argparse.Namespace, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    models = {kind: build(kind, args.device, dtype) for kind in KINDS}
    params = sum(p.numel() for p in models["lora"].get_base_model().parameters())
    print(f"model: Llama {params / 1e6:.1f}M params, LoRA r=16 all-linear, device={args.device}, dtype={dtype_name}, "
          f"threads={torch.get_num_threads()}, prompt={args.prompt}, new tokens={args.new}")  # fmt: skip
    results: dict = {"params": params, "dtype": dtype_name, "rows": []}
    gen = torch.Generator().manual_seed(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, CONFIG["vocab_size"], (batch, args.prompt), generator=gen).to(args.device)
        mask = torch.ones_like(ids)
        for model in models.values():  # warm-up
            timed_generate(model, ids, mask, 4)
        first: dict[str, list[float]] = {kind: [] for kind in KINDS}
        full: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for _ in range(args.repeats):
            for kind, model in models.items():
                first[kind].append(timed_generate(model, ids, mask, 1))
                full[kind].append(timed_generate(model, ids, mask, args.new))
        row: dict = {"batch": batch, "new_tokens": args.new}
        for kind in KINDS:
            t1, tn = statistics.median(first[kind]), statistics.median(full[kind])
            row[kind] = {
                "prefill_ms": t1 * 1e3,
                "decode_tok_s": (args.new - 1) * batch / (tn - t1),
                "end_to_end_tok_s": args.new * batch / tn,
            }
        results["rows"].append(row)
        lora = row["lora"]
        print(f"batch {batch}:")
        for kind in KINDS:
            r = row[kind]
            ratios = "" if kind == "lora" else (
                f" | decode {r['decode_tok_s'] / lora['decode_tok_s']:.2f}x, end to end "
                f"{r['end_to_end_tok_s'] / lora['end_to_end_tok_s']:.2f}x of LoRA"
            )  # fmt: skip
            print(f"  {LABELS[kind]:<26} prefill {r['prefill_ms']:7.1f} ms | decode {r['decode_tok_s']:7.1f} tok/s | "
                  f"end to end {r['end_to_end_tok_s']:7.1f} tok/s{ratios}")  # fmt: skip
    ids = torch.randint(3, CONFIG["vocab_size"], (1, args.prompt), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    cached = args.long_new / timed_generate(models["imsm"], ids, mask, args.long_new)
    recompute = args.long_new / timed_generate(models["imsm"], ids, mask, args.long_new, use_cache=False)
    results["long"] = {"new_tokens": args.long_new, "cached_tok_s": cached, "recompute_tok_s": recompute}
    print(f"batch 1, {args.long_new} new tokens, end to end: IMSM two KV caches {cached:.1f} tok/s | no-cache "
          f"recompute {recompute:.1f} tok/s | speed-up {cached / recompute:.1f}x")  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--long-new", type=int, default=256, help="new tokens for the cache vs recompute comparison")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for name in args.dtypes.split(","):
        if not isinstance(getattr(torch, name, None), torch.dtype):
            parser.error(f"--dtypes: {name!r} is not a torch dtype (use float32, bfloat16 or float16)")
    results: dict = {"device": args.device, "threads": torch.get_num_threads(), "runs": []}
    for dtype_name in args.dtypes.split(","):
        results["runs"].append(run_dtype(args, dtype_name))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
