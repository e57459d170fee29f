"""``IMSMLlamaForCausalLM``: IMSM's dual pass inside vLLM for the Llama family, with LoRA as the wrapped adapter.

One engine step runs both views of every scheduled token together:

* The step's ``n`` tokens become ``2n`` rows ``[frozen; adapted]`` (the embeddings twice). Every base linear layer
  (vLLM's fused ``qkv_proj`` / ``o_proj`` / ``gate_up_proj`` / ``down_proj``, built by vLLM's own ``LlamaDecoderLayer``)
  runs ONCE over the ``2n`` rows, so its weights are read once per step for both views and exist once in memory; the
  LoRA update is added to the adapted rows only (:mod:`imsm_vllm.lora`). Norms, rotary embeddings and the MLP's
  activation run on all rows alike.
* Attention runs per view: each decoder layer has two vLLM ``Attention`` layers, ``self_attn.attn`` (adapted view)
  and ``self_attn.attn_frozen``, so vLLM allocates a paged KV cache for each view in every layer; both use the same
  attention metadata (block tables, slot mappings), so the views stay aligned token by token.
* After the final norm the rows split into ``h_frozen`` / ``h_adapted``; in ``query`` mode
  :class:`~imsm_vllm.gate.QuerySummary` reads each request's prompt summary of each view from the paged cache (in
  ``route`` mode that of the frozen view only); the
  gate (:class:`~imsm_vllm.gate.Gate`) interweaves them, and ``forward`` returns that ``[n, d]`` state. vLLM's own
  logits processor and samplers (greedy, sampling, penalties, logprobs) then work on it unchanged.

Weights: the base model's safetensors through vLLM's loader (Hugging Face names, mapped onto the fused layers as
vLLM's Llama does), then ``imsm_adapter.safetensors`` from the model folder (LoRA and gate), read here. Tensor and
pipeline parallelism are refused (one device; see ``docs/serving.md``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from . import prompt_lengths
from .export_format import ADAPTER_FILE, CONFIG_SECTION, FORMAT_VERSION, SUPPORTED_ARCHITECTURES, TENSOR_PREFIX
from .gate import QUERY_VIEWS, Gate, QuerySummary
from .lora import LayerLoRA, attach_lora, check_base_biases

BASE_ARCHITECTURES = tuple(SUPPORTED_ARCHITECTURES)


def imsm_section(config) -> dict:
    """The ``imsm`` section of the served folder's config.json, checked."""
    section = getattr(config, CONFIG_SECTION, None)
    if not isinstance(section, dict):
        raise ValueError(
            "IMSMLlamaForCausalLM needs the `imsm` section that imsm-export writes into config.json; this folder's "
            "config.json has none. Create the folder with `imsm-export ADAPTER_DIR OUT_DIR`."
        )
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"config.json's imsm section has format_version {version!r}; this imsm_vllm reads version "
            f"{FORMAT_VERSION}. Export the adapter again with the imsm-export of the same peft-imsm release."
        )
    if section.get("base_architecture") not in BASE_ARCHITECTURES:
        raise ValueError(
            f"The exported base architecture {section.get('base_architecture')!r} is not one imsm_vllm implements "
            f"({', '.join(BASE_ARCHITECTURES)})."
        )
    if section.get("wrapped_adapter") != "LORA":
        raise ValueError(f"imsm_vllm serves IMSM with LoRA only, not {section.get('wrapped_adapter')!r}.")
    return section


class IMSMLlamaAttention(LlamaAttention):
    """vLLM's ``LlamaAttention`` plus ``attn_frozen``, the frozen view's attention (own KV cache, same shape)."""

    def __init__(self, *args, prefix: str = "", cache_config=None, quant_config=None, **kwargs) -> None:
        super().__init__(*args, prefix=prefix, cache_config=cache_config, quant_config=quant_config, **kwargs)
        self.attn_frozen = Attention(
            self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads, cache_config=cache_config,
            quant_config=quant_config, per_layer_sliding_window=self.attn.sliding_window,
            prefix=f"{prefix}.attn_frozen",
        )  # fmt: skip


class IMSMLlamaModel(nn.Module):
    """Embeddings, decoder layers (vLLM's, with :class:`IMSMLlamaAttention`) and the final norm, run as two views."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                vllm_config=vllm_config, prefix=f"{prefix}.layers.{i}", attn_layer_type=IMSMLlamaAttention
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lora = nn.ModuleList(LayerLoRA() for _ in range(config.num_hidden_layers))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """``[2n, d]`` final hidden states, rows ``[frozen; adapted]``, of the ``[n, d]`` input embeddings."""
        n = embeds.shape[0]
        hidden = torch.cat([embeds, embeds])
        positions2 = torch.cat([positions, positions])
        residual = None
        for layer, lora in zip(self.layers, self.lora):
            hidden, residual = _decoder_layer(layer, lora, positions2, hidden, residual, n)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=LlamaModel.hf_to_vllm_mapper)


def _decoder_layer(layer: LlamaDecoderLayer, lora: LayerLoRA, positions: torch.Tensor, hidden: torch.Tensor,
                   residual: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One decoder layer over the stacked rows: shared base projections, LoRA on the adapted rows, attention per view
    (the same computation as ``LlamaDecoderLayer.forward``, which runs one view)."""
    if residual is None:
        residual = hidden
        hidden = layer.input_layernorm(hidden)
    else:
        hidden, residual = layer.input_layernorm(hidden, residual)
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(hidden)
    lora.qkv.add_to(hidden, qkv, n)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions, q, k)
    out = torch.cat([attn.attn_frozen(q[:n], k[:n], v[:n]), attn.attn(q[n:], k[n:], v[n:])])
    hidden, _ = attn.o_proj(out)
    lora.o.add_to(out, hidden, n)
    hidden, residual = layer.post_attention_layernorm(hidden, residual)
    mlp = layer.mlp
    gate_up, _ = mlp.gate_up_proj(hidden)
    lora.gate_up.add_to(hidden, gate_up, n)
    act = mlp.act_fn(gate_up)
    hidden, _ = mlp.down_proj(act)
    lora.down.add_to(act, hidden, n)
    return hidden, residual


class IMSMLlamaForCausalLM(nn.Module):
    """The model vLLM builds for a folder written by ``imsm-export`` (``architectures: ["IMSMLlamaForCausalLM"]``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.imsm = imsm_section(config)
        self.model_path = vllm_config.model_config.model
        _refuse_unsupported(vllm_config, self.imsm)
        if self.imsm["base_architecture"] == "Qwen2ForCausalLM":
            # Qwen2 = Llama + biases on q/k/v (none on o_proj). vLLM's LlamaAttention builds the fused qkv_proj's bias
            # from `config.qkv_bias` (its internlm3 switch), which a Qwen2 config lacks; without it vLLM's Llama
            # loader skips the biases without a word (its GPTQ rule for extra biases) and serves a wrong model.
            config.qkv_bias = True
        self.model = IMSMLlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        self.gate = Gate(self.imsm["gate_mode"], config.hidden_size, int(self.imsm["gate_rank"]),
                         bool(self.imsm.get("gate_scalar", False)))  # fmt: skip
        self.query_summary = None
        if self.gate.mode in QUERY_VIEWS:
            prompt_lengths.install()
            attn = self.model.layers[0].self_attn
            self.query_summary = QuerySummary(
                config.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim, vllm_config.cache_config,
                prefix=maybe_prefix(prefix, "query_summary.views"), views=QUERY_VIEWS[self.gate.mode],
            )  # fmt: skip

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        embeds = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        n = embeds.shape[0]
        hidden = self.model(positions, embeds)
        h_frozen, h_adapted = hidden[:n], hidden[n:]
        if self.query_summary is None:
            return self.gate(h_frozen, h_adapted)
        is_prompt = prompt_lengths.prompt_token_mask(self.query_summary.first_layer_name, positions)
        views = {"frozen": h_frozen, "adapted": h_adapted}
        q = {view: self.query_summary(views[view], view, is_prompt) for view in self.query_summary.views}
        return self.gate(h_frozen, h_adapted, q["frozen"], q.get("adapted"))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base weights from vLLM's loader (the adapter file's ``imsm.*`` tensors skipped there), then the
        adapter file."""
        from safetensors.torch import load_file

        biases: list[str] = []

        def base():
            for name, w in weights:
                if not name.startswith(TENSOR_PREFIX):
                    if name.endswith(".bias"):
                        biases.append(name)
                    yield name, w

        ignore = ["lm_head."] if self.config.tie_word_embeddings else []
        loaded = AutoWeightsLoader(self, ignore_unexpected_prefixes=ignore).load_weights(base())
        check_base_biases(biases, {name for name, _ in self.named_parameters()})
        path = os.path.join(self.model_path, self.imsm.get("adapter_file", ADAPTER_FILE))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"The IMSM adapter file {path} is missing (config.json names it); the folder was not written by "
                "imsm-export, or was copied without it. Run imsm-export again."
            )
        tensors = load_file(path)
        weight = self.model.embed_tokens.weight
        attn = self.model.layers[0].self_attn
        mlp_size = self.config.intermediate_size
        sizes = {"self_attn.qkv_proj": (attn.q_size, attn.kv_size, attn.kv_size),
                 "self_attn.o_proj": (self.config.hidden_size,),
                 "mlp.gate_up_proj": (mlp_size, mlp_size), "mlp.down_proj": (self.config.hidden_size,)}  # fmt: skip
        used = attach_lora(list(self.model.layers), list(self.model.lora), tensors, sizes, weight.device, weight.dtype)
        used |= self.gate.load(tensors, weight.device)
        unused = sorted(set(tensors) - used)
        if unused:
            raise ValueError(
                f"{ADAPTER_FILE} holds {len(unused)} tensor(s) this model does not use "
                f"({', '.join(unused[:5])}"
                f"{', ...' if len(unused) > 5 else ''}): the adapter file and config.json do not belong together. "
                "Run imsm-export again."
            )
        return loaded


def _refuse_unsupported(vllm_config: VllmConfig, imsm: dict) -> None:
    if get_tensor_model_parallel_world_size() > 1 or get_pp_group().world_size > 1:
        raise ValueError(
            "imsm_vllm runs IMSM on one device: tensor and pipeline parallelism are not implemented (the LoRA "
            "update of the fused layers is not sharded). Serve with --tensor-parallel-size 1 "
            "--pipeline-parallel-size 1."
        )
    if vllm_config.speculative_config is not None:
        raise ValueError("imsm_vllm does not support speculative decoding; serve without --speculative-config.")
    if vllm_config.lora_config is not None:
        raise ValueError(
            "--enable-lora: vLLM's multi-LoRA would wrap the layers IMSM applies its own LoRA to. Serve the exported "
            "IMSM folder without --enable-lora."
        )
    if imsm.get("gate_mode") in QUERY_VIEWS and vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            f"gate_mode={imsm.get('gate_mode')!r} needs vLLM's prefix caching off: the query summary's cache marks "
            "each token as prompt or generated for ITS request, and a cached block reused by a later request (whose "
            "prompt holds tokens generated earlier, as in a multi-turn chat) would carry the wrong marks. Serve with "
            "--no-enable-prefix-caching (or export an adapter trained with gate_mode='fixed' or 'token')."
        )
