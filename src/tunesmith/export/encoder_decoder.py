"""The ONNX layout of encoder-decoder models (T5, BART, Marian, bert2bert): three graphs, as optimum lays them out.
`encoder.onnx` (source ids -> hidden states); `decoder.onnx`, the first decoding step (the decoder start tokens
-> logits and every layer's self- and cross-attention keys and values); `decoder_with_past.onnx`, each next step
(one token and the cache -> logits and the grown self-attention cache). The decoder's weights are stored twice
(once per decoder graph); in exchange each step after the first costs one token, not the whole prefix.

`EncoderDecoderSession` puts the sessions behind transformers' `generate` (a model whose encoder and forward run
onnxruntime and whose cache is transformers' own EncoderDecoderCache), so greedy, beam search, sampling and the
run's generation_config.json behave as on the PyTorch model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from tunesmith.export.layouts import OnnxLayout
from tunesmith.export.runtime import session, trace

ENCODER, FIRST_STEP, NEXT_STEP = "encoder.onnx", "decoder.onnx", "decoder_with_past.onnx"
KINDS = ("self_key", "self_value", "cross_key", "cross_value")  # per layer, in this order


class EncoderDecoder(OnnxLayout):
    name = "encoder_decoder"
    files = (ENCODER, FIRST_STEP, NEXT_STEP)
    outputs = ("logits",)

    def export(self, model, tokenizer, folder: Path) -> None:
        _eager_attention(model)
        example = tokenizer(["an example to trace", "two"], padding=True, return_tensors="pt")
        ids, mask = example["input_ids"], example["attention_mask"]
        batch, source = torch.export.Dim("batch"), torch.export.Dim("source")
        target, past = torch.export.Dim("target"), torch.export.Dim("past")
        encoder = _Encoder(model)
        trace(encoder, (ids, mask), folder / ENCODER, ["input_ids", "attention_mask"], ["last_hidden_state"],
              {"input_ids": {0: batch, 1: source}, "attention_mask": {0: batch, 1: source}})
        starts = torch.full((2, 3), _start_token(model), dtype=torch.long)
        first = _FirstStep(model)
        with torch.no_grad():  # example inputs for the decoder graphs
            hidden = encoder(ids, mask)
            cache = first(starts, hidden, mask)[1:]
        layers = len(cache) // len(KINDS)
        sides = {"encoder_hidden_states": {0: batch, 1: source}, "encoder_attention_mask": {0: batch, 1: source}}
        trace(first, (starts, hidden, mask), folder / FIRST_STEP, ["decoder_input_ids", *sides], ["logits", *names("present", layers)],
              {"decoder_input_ids": {0: batch, 1: target}, **sides})
        cached = tuple({0: batch, 2: past if kind.startswith("self") else source} for _ in range(layers) for kind in KINDS)
        trace(_NextStep(model, layers), (starts[:, :1], hidden, mask, *cache), folder / NEXT_STEP,
              ["decoder_input_ids", *sides, *names("past", layers)], ["logits", *names("present", layers, "self")],
              ({0: batch}, sides["encoder_hidden_states"], sides["encoder_attention_mask"], cached))

    def load(self, folder: Path, config, generation_config=None) -> torch.nn.Module:
        return EncoderDecoderSession(folder, config, generation_config)


def names(prefix: str, layers: int, only: str = "") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in KINDS if kind.startswith(only)]


def _eager_attention(model) -> None:
    # Under torch.export, SDPA's `is_causal` for a one-token query over a dynamic past is a symbolic bool that it
    # refuses (the BERT decoder of bert2bert); eager attention exports for every architecture, and opset 18 has no
    # fused attention for SDPA to map to anyway.
    try:
        model.set_attn_implementation("eager")
    except (ValueError, AttributeError):  # an architecture with one implementation keeps it
        pass


def _start_token(model) -> int:
    generation = getattr(model, "generation_config", None)
    for source in (generation, model.config, getattr(model.config, "decoder", None)):
        value = getattr(source, "decoder_start_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    return 0  # tracing needs some token; the graph does not depend on which


def _flat(cache, only: str = "") -> list[torch.Tensor]:
    found = []
    for i in range(len(cache.self_attention_cache.layers)):
        own, cross = cache.self_attention_cache.layers[i], cache.cross_attention_cache.layers[i]
        found += [own.keys, own.values] + ([] if only == "self" else [cross.keys, cross.values])
    return found


def _unflat(flat: list[torch.Tensor], layers: int) -> EncoderDecoderCache:
    """The cache from flat tensors, four per layer in KINDS order (what decoder.onnx returns)."""
    own = [(flat[4 * i], flat[4 * i + 1]) for i in range(layers)]
    return EncoderDecoderCache(_holding(own), _holding([(flat[4 * i + 2], flat[4 * i + 3]) for i in range(layers)]))


def _holding(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding the session's tensors as they are. Building one from data goes through `update`,
    which concatenates onto an empty tensor, copying the whole cache at every step: 28% of a batch-16 generation
    on ONNX (bert2bert MiniLM, 48 new tokens)."""
    cache = DynamicCache()
    for keys, values in pairs:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


class _Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _FirstStep(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
        result = self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                            decoder_input_ids=decoder_input_ids, use_cache=True)
        return (result.logits, *_flat(result.cache))


class _NextStep(torch.nn.Module):
    def __init__(self, model, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask, *past):
        result = self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                            decoder_input_ids=decoder_input_ids, cache=_unflat(list(past), self.layers), use_cache=True)
        return (result.logits, *_flat(result.cache, only="self"))


class _EncoderSession(torch.nn.Module):
    main_input_name = "input_ids"  # generate() reads it off the encoder

    def __init__(self, path: Path):
        super().__init__()
        self.session = session(path)

    def forward(self, input_ids, attention_mask=None, **_ignored):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        hidden = self.session.run(None, {"input_ids": input_ids.cpu().numpy(), "attention_mask": mask.cpu().numpy()})[0]
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))


class EncoderDecoderSession(PreTrainedModel, GenerationMixin):
    """The three sessions as a seq2seq model for `generate`: the first step runs decoder.onnx over the decoder
    start tokens, every later step decoder_with_past.onnx over the newest token; the cache between steps is
    transformers' own, so beam search reorders it as it reorders the PyTorch model's."""

    main_input_name = "input_ids"

    def __init__(self, folder: Path, config, generation_config: GenerationConfig | None = None):
        super().__init__(config)
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # `next(model.parameters()).device`
        self.encoder = _EncoderSession(folder / ENCODER)
        self.first, self.next = session(folder / FIRST_STEP), session(folder / NEXT_STEP)
        self.layers = sum(1 for i in self.next.get_inputs() if i.name.endswith(".self_key"))
        if generation_config is not None:
            self.generation_config = generation_config

    def get_encoder(self, *_args, **_kwargs):
        return self.encoder

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None, cache=None,
                **_ignored) -> Seq2SeqLMOutput:
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids, attention_mask)
        hidden = encoder_outputs[0]
        mask = attention_mask if attention_mask is not None else torch.ones(hidden.shape[:2], dtype=torch.long)
        sides = {"encoder_hidden_states": hidden.float().cpu().numpy(), "encoder_attention_mask": mask.cpu().numpy()}
        if cache is None or cache.get_seq_length() == 0:
            found = self.first.run(None, {"decoder_input_ids": decoder_input_ids.cpu().numpy(), **sides})
            cache = _unflat([torch.from_numpy(t) for t in found[1:]], self.layers)
        else:
            past = dict(zip(names("past", self.layers), (t.cpu().numpy() for t in _flat(cache))))
            found = self.next.run(None, {"decoder_input_ids": decoder_input_ids[:, -1:].cpu().numpy(), **sides, **past})
            grown = [torch.from_numpy(t) for t in found[1:]]
            own = _holding([(grown[2 * i], grown[2 * i + 1]) for i in range(self.layers)])
            cache = EncoderDecoderCache(own, cache.cross_attention_cache)
        return Seq2SeqLMOutput(logits=torch.from_numpy(found[0]), cache=cache)
