"""Decode speed of IMSM versus plain peft LoRA, measured side by side in one run.

Model: a ~60M-parameter Llama built from a config (random weights: speed does not depend on them), LoRA r=16 on all
linear layers, 64-token prompts, 64 new tokens (greedy, no early stop), batch 1 and 8, float32 and bfloat16. Also
the speed-up of IMSM's two KV caches over recomputing the whole sequence at every token (what the paper's code
does), at 256 new tokens.

    python benchmarks/generation_speed.py [--repeats 5] [--device cpu|cuda] [--dtypes float32,bfloat16]
        [--kinds lora,imsm,imsm-2pass,route-frozen,route-adapted,route-mixed] [--json F]

Kinds: ``lora`` (plain peft LoRA, unmerged), ``imsm`` (the paper's query gate, both views as one doubled batch: rows
[frozen; adapted], the default with LoRA), ``imsm-2pass`` (the same as two passes, ``stacked_views = False``, the path
of every other adapter), and the hard-routed route gate (``gate_mode="route"``, ``route_threshold=0.5``, the
recommended setting) with its router set so that every prompt goes to the frozen view (``route-frozen``), every prompt
to the adapter (``route-adapted``), or, at batch > 1, half the prompts each way in one batch (``route-mixed``).
For each setting and kind it prints:

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
    """A model of ``kind`` (see the module docstring); the route kinds' routers are set per batch by
    :func:`set_routes`."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(device=device, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    if kind.startswith("route"):
        anchor = peft_imsm.AnchorConfig(num_samples=4, sample_length=4)
        config = peft_imsm.IMSMConfig(adapter_config=lora, gate_mode="route", anchor=anchor, route_threshold=0.5)
    else:
        config = peft_imsm.IMSMConfig(adapter_config=lora) if kind.startswith("imsm") else lora
    model = get_peft_model(model, config)
    if kind == "imsm-2pass":
        model.base_model.stacked_views = False
    model.eval()
    return model


def set_routes(model, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Set a route model's router: every prompt to the frozen view (``route-frozen``), to the adapter
    (``route-adapted``), or the first half of the batch's prompts to the frozen view and the rest to the adapter
    (``route-mixed``: a router fitted by least squares to logits +-4 on the prompts' frozen mean states)."""
    gate = model.base_model.gate
    with torch.no_grad():
        if kind == "route-mixed":
            with model.disable_adapter():
                h = model.get_base_model().get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            q = h.float().mean(1)
            half = ids.shape[0] // 2
            target = torch.tensor([4.0] * half + [-4.0] * (ids.shape[0] - half), device=q.device)[:, None]
            design = torch.cat([q, torch.ones(len(q), 1, device=q.device)], 1).double()
            solution = torch.linalg.lstsq(design.cpu(), target.double().cpu()).solution.float().to(q.device)
            weight, bias = solution[:-1].T, solution[-1]
        else:
            weight = torch.zeros_like(gate.W_R.weight)
            bias = torch.full_like(gate.W_R.bias, 10.0 if kind == "route-frozen" else -10.0)
        gate.W_R.weight.copy_(weight / gate.lr_scale)
        gate.W_R.bias.copy_(bias / gate.lr_scale)


def check_routes(model, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Assert that the route model sends each prompt where :func:`set_routes` meant it to."""
    with torch.no_grad(), model.base_model.record_gate() as seen:
        model(input_ids=ids, attention_mask=mask)
    half = ids.shape[0] // 2
    want = {"route-frozen": [1.0] * ids.shape[0], "route-adapted": [0.0] * ids.shape[0],
            "route-mixed": [1.0] * half + [0.0] * (ids.shape[0] - half)}[kind]  # fmt: skip
    assert seen[0].tolist() == want, (kind, seen[0].tolist())


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


KINDS = ("lora", "imsm", "imsm-2pass", "route-frozen", "route-adapted", "route-mixed")
LABELS = {"lora": "LoRA", "imsm": "IMSM (one doubled batch)", "imsm-2pass": "IMSM (two passes)",
          "route-frozen": "route, all to frozen", "route-adapted": "route, all to adapter",
          "route-mixed": "route, half each way"}  # fmt: skip


def run_dtype(args: argparse.Namespace, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    kinds = args.kinds.split(",")
    models = {kind: build(kind, args.device, dtype) for kind in kinds}
    params = sum(p.numel() for p in models["lora"].get_base_model().parameters())
    print(f"model: Llama {params / 1e6:.1f}M params, LoRA r=16 all-linear, device={args.device}, dtype={dtype_name}, "
          f"threads={torch.get_num_threads()}, prompt={args.prompt}, new tokens={args.new}")  # fmt: skip
    results: dict = {"params": params, "dtype": dtype_name, "rows": []}
    gen = torch.Generator().manual_seed(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, CONFIG["vocab_size"], (batch, args.prompt), generator=gen).to(args.device)
        mask = torch.ones_like(ids)
        for kind, model in models.items():
            if kind.startswith("route"):
                set_routes(model, kind, ids, mask)
                check_routes(model, kind, ids, mask)
        batch_models = {k: m for k, m in models.items() if k != "route-mixed" or batch > 1}
        for model in batch_models.values():  # warm-up
            timed_generate(model, ids, mask, 4)
        first: dict[str, list[float]] = {kind: [] for kind in batch_models}
        full: dict[str, list[float]] = {kind: [] for kind in batch_models}
        for _ in range(args.repeats):
            for kind, model in batch_models.items():
                first[kind].append(timed_generate(model, ids, mask, 1))
                full[kind].append(timed_generate(model, ids, mask, args.new))
        row: dict = {"batch": batch, "new_tokens": args.new}
        for kind in batch_models:
            t1, tn = statistics.median(first[kind]), statistics.median(full[kind])
            row[kind] = {
                "prefill_ms": t1 * 1e3,
                "decode_tok_s": (args.new - 1) * batch / (tn - t1),
                "end_to_end_tok_s": args.new * batch / tn,
            }
        results["rows"].append(row)
        lora = row["lora"]
        print(f"batch {batch}:")
        for kind in batch_models:
            r = row[kind]
            ratios = "" if kind == "lora" else (
                f" | decode {r['decode_tok_s'] / lora['decode_tok_s']:.2f}x, end to end "
                f"{r['end_to_end_tok_s'] / lora['end_to_end_tok_s']:.2f}x of LoRA"
            )  # fmt: skip
            print(f"  {LABELS[kind]:<26} prefill {r['prefill_ms']:7.1f} ms | decode {r['decode_tok_s']:7.1f} tok/s | "
                  f"end to end {r['end_to_end_tok_s']:7.1f} tok/s{ratios}")  # fmt: skip
    if "imsm" not in models:
        return results
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
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from: {', '.join(KINDS)}")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    unknown = sorted(set(args.kinds.split(",")) - set(KINDS))
    if unknown or "lora" not in args.kinds.split(","):
        parser.error(f"--kinds: unknown {unknown} (choose from {', '.join(KINDS)}; 'lora' is the reference)")
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
