"""The split graphs as torch modules over one loaded transformers BLIP model.

Each builder returns an nn.Module whose forward takes the spec's inputs in order and returns
its outputs in order. They share the loaded model's parameters: one load serves every graph.
"""
from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.presets import ENC_ID, PAD_ID, SEP_ID

# Large enough to never win an argmax, finite so compilers that saturate -inf stay exact.
_BLOCKED = -1e9
_MASKED = -1e4


def padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 mask -> [B, 1, 1, L] additive float mask.

    Prepared 4D masks pass through transformers untouched; its own mask builder emits
    boolean And/Where chains that TPU-MLIR cannot lower. exp(-1e4) is 0 in float32.
    """
    return (1.0 - mask[:, None, None, :].to(torch.float32)) * _MASKED


def causal_mask(length: int) -> torch.Tensor:
    # Built in numpy so the tracer records a constant, not a Trilu op (which needs opset 14).
    return torch.from_numpy(np.triu(np.full((length, length), _MASKED, dtype=np.float32), 1)[None, None])


def _embeds_with_enc_token(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """Word embeddings of ids with [CLS] replaced by [ENC], as BLIP does when the text encoder
    attends to the image. Replaced on the embeddings, not on the ids: TPU-MLIR 1.30.2 turns ids
    that pass through a Concat into F16/BF16/INT8 values, and its Gather then reads out of bounds
    (blip_itm crashed at those precisions)."""
    words = text_encoder.embeddings.word_embeddings
    enc = words.weight[ENC_ID].expand(ids.shape[0], 1, -1)
    return torch.cat([enc, words(ids[:, 1:])], dim=1)


class TextEmbed(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.text_encoder, self.text_proj = m.text_encoder, m.text_proj

    def forward(self, text_ids, text_atten_mask):
        h = self.text_encoder(input_ids=text_ids, attention_mask=padding_mask(text_atten_mask), return_dict=False)[0]
        return F.normalize(self.text_proj(h[:, 0, :]), dim=-1)


class ImageEmbed(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.vision_model, self.vision_proj = m.vision_model, m.vision_proj

    def forward(self, pixel_values):
        h = self.vision_model(pixel_values=pixel_values, return_dict=False)[0]
        return F.normalize(self.vision_proj(h[:, 0, :]), dim=-1)


class ImageFeat(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.vision_model = m.vision_model

    def forward(self, pixel_values):
        return self.vision_model(pixel_values=pixel_values, return_dict=False)[0]


class ItmLogits(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.text_encoder, self.itm_head = m.text_encoder, m.itm_head

    def forward(self, image_feat, text_ids, text_atten_mask):
        # Every image token is valid: no encoder mask at all (transformers then attends to all).
        h = self.text_encoder(inputs_embeds=_embeds_with_enc_token(self.text_encoder, text_ids),
                              attention_mask=padding_mask(text_atten_mask), encoder_hidden_states=image_feat,
                              return_dict=False)[0]
        return self.itm_head(h[:, 0, :])


class ItmScore(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.image, self.itm = ImageFeat(m), ItmLogits(m)

    def forward(self, pixel_values, input_ids, attention_mask):
        logits = self.itm(self.image(pixel_values), input_ids, attention_mask)
        return torch.softmax(logits, dim=-1)[:, 1]


class _MatMulLinear(nn.Module):
    """x @ W^T with W^T stored once. An nn.Linear exports as MatMul(x, Transpose(W)), and the exporter
    folds that Transpose once per use: an unrolled decoder then held one weight copy per decoding
    step (reached through Identity nodes), which multiplied the export's memory and, after
    onnxsim, the graph's size (base blip_cap: 24 GB at export, OOM at simplify)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class _MaskedCrossAttention(nn.Module):
    """transformers 5.23's BLIP text cross-attention drops its mask: BlipTextSelfAttention takes it
    from an `encoder_attention_mask` argument that BlipTextAttention never passes, so the decoder
    attends to every encoder state. The original BLIP (med.py) applies it. This hands it on."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, past_key_values=None, **_):
        return self.inner(hidden_states, encoder_hidden_states=encoder_hidden_states,
                          encoder_attention_mask=attention_mask, past_key_values=past_key_values)


def decoder_for_export(decoder: nn.Module, shared_matmuls: bool = True) -> nn.Module:
    """A copy of `decoder` sharing every tensor with it, whose cross-attention applies its mask, and
    (shared_matmuls) whose Linear layers are _MatMulLinear, for unrolled graphs."""
    keep = {id(t): t for t in itertools.chain(decoder.parameters(), decoder.buffers())}
    clone = copy.deepcopy(decoder, keep)
    for parent in list(clone.modules()):
        if hasattr(parent, "crossattention"):
            parent.crossattention.self = _MaskedCrossAttention(parent.crossattention.self)
        for name, child in list(parent.named_children()):
            if shared_matmuls and isinstance(child, nn.Linear):
                setattr(parent, name, _MatMulLinear(child))
    return clone


def greedy_decode(decoder, prefix: torch.Tensor, encoder_states: torch.Tensor, max_length: int,
                  min_length: int, encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' greedy search, unrolled: EOS blocked below min_length, PAD after EOS."""
    ids = prefix
    done = torch.zeros_like(prefix[:, 0])
    eos_block = torch.zeros(decoder.config.vocab_size)
    eos_block[SEP_ID] = _BLOCKED
    for _ in range(max_length - prefix.shape[1]):
        # No padding inside the generated prefix, so the causal mask is the whole self-attention mask.
        logits = decoder(input_ids=ids, attention_mask=causal_mask(ids.shape[1]), encoder_hidden_states=encoder_states,
                         encoder_attention_mask=encoder_mask, use_cache=False, logits_to_keep=1,
                         return_dict=False)[0][:, -1, :]
        if ids.shape[1] < min_length:
            logits = logits + eos_block
        token = torch.argmax(logits, dim=-1)
        token = token * (1 - done) + PAD_ID * done
        done = torch.maximum(done, (token == SEP_ID).long())
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids


class Caption(nn.Module):
    def __init__(self, m, dims):
        super().__init__()
        self.vision_model, self.text_decoder = m.vision_model, decoder_for_export(m.text_decoder)
        cap = dims["caption"]
        self.register_buffer("prompt", torch.tensor([cap["prompt_ids"]], dtype=torch.long), persistent=False)
        self.max_length, self.min_length = cap["max_length"], cap["min_length"]

    def forward(self, pixel_values):
        states = self.vision_model(pixel_values=pixel_values, return_dict=False)[0]
        prefix = self.prompt.expand(pixel_values.shape[0], -1)
        return greedy_decode(self.text_decoder, prefix, states, self.max_length, self.min_length)


class VqaQuestion(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.text_encoder = m.text_encoder

    def forward(self, image_embeds, input_ids, attention_mask):
        return self.text_encoder(inputs_embeds=_embeds_with_enc_token(self.text_encoder, input_ids),
                                 attention_mask=padding_mask(attention_mask), encoder_hidden_states=image_embeds,
                                 return_dict=False)[0]


class VqaAnswer(nn.Module):
    """Unrolled answer decoder. It takes the question's attention mask: BLIP encodes one question
    unpadded, so its decoder never attends to padding; states padded to L without the mask gave
    other answers."""

    def __init__(self, m, dims):
        super().__init__()
        self.text_decoder = decoder_for_export(m.text_decoder)
        self.prompt = dims["vqa_answer"]["prompt_ids"]
        self.max_length, self.min_length = dims["vqa_answer"]["max_length"], dims["vqa_answer"]["min_length"]

    def forward(self, question_states, question_mask):
        prefix = torch.tensor([self.prompt], dtype=torch.long).expand(question_states.shape[0], -1)
        return greedy_decode(self.text_decoder, prefix, question_states, self.max_length, self.min_length,
                             padding_mask(question_mask))


class DecoderStep(nn.Module):
    """One greedy step at every position at once: next_ids[:, t] is the token that follows
    input_ids[:, :t+1] (causal attention makes later positions irrelevant to it). A runtime calls it
    once per generated token (export/decoding.py), so each weight is stored once, whatever the
    number of steps. EOS is blocked where the sequence would still be shorter than min_length."""

    def __init__(self, m, decoding: dict, with_mask: bool):
        super().__init__()
        self.text_decoder, self.with_mask = decoder_for_export(m.text_decoder, shared_matmuls=False), with_mask
        length, vocab = decoding["max_length"], m.text_decoder.config.vocab_size
        penalty = np.zeros((length, vocab), dtype=np.float32)
        penalty[: max(decoding["min_length"] - 1, 0), SEP_ID] = _BLOCKED  # position t holds length t+1
        self.register_buffer("eos_penalty", torch.from_numpy(penalty) if penalty.any() else None, persistent=False)

    def forward(self, encoder_states, *rest):
        mask, ids = (padding_mask(rest[0]), rest[1]) if self.with_mask else (None, rest[0])
        logits = self.text_decoder(input_ids=ids, attention_mask=causal_mask(ids.shape[1]),
                                   encoder_hidden_states=encoder_states, encoder_attention_mask=mask,
                                   use_cache=False, return_dict=False)[0]
        if self.eos_penalty is not None:
            logits = logits + self.eos_penalty
        return torch.argmax(logits, dim=-1)


def reference_generate(model, spec, feeds: dict, dims: dict) -> np.ndarray:
    """transformers' own greedy generate() for a step decoder's inputs, padded to max_length (its
    cross-attention given the mask, see _MaskedCrossAttention)."""
    decoding = dims[spec.decoding]
    states = torch.from_numpy(feeds[spec.inputs[0].name])
    prefix = torch.tensor([decoding["prompt_ids"]] * states.shape[0], dtype=torch.long)
    mask = {"encoder_attention_mask": torch.from_numpy(feeds["question_mask"])} if "question_mask" in feeds else {}
    with torch.no_grad():
        out = decoder_for_export(model.text_decoder, shared_matmuls=False).generate(input_ids=prefix, encoder_hidden_states=states, eos_token_id=SEP_ID,
                                          pad_token_id=PAD_ID, max_length=decoding["max_length"],
                                          min_length=decoding["min_length"], num_beams=1, do_sample=False,
                                          **mask).numpy()
    return np.pad(out, ((0, 0), (0, decoding["max_length"] - out.shape[1])), constant_values=PAD_ID)


BUILDERS = {
    "text_embed": lambda m, d: TextEmbed(m),
    "image_embed": lambda m, d: ImageEmbed(m),
    "image_feat": lambda m, d: ImageFeat(m),
    "itm_logits": lambda m, d: ItmLogits(m),
    "itm_score": lambda m, d: ItmScore(m),
    "caption": Caption,
    "vqa_vision": lambda m, d: ImageFeat(m),
    "vqa_question": lambda m, d: VqaQuestion(m),
    "vqa_answer": VqaAnswer,
    "caption_step": lambda m, d: DecoderStep(m, d["caption"], with_mask=False),
    "vqa_answer_step": lambda m, d: DecoderStep(m, d["vqa_answer"], with_mask=True),
}


def build(spec, model, dims) -> nn.Module:
    return BUILDERS[spec.builder](model, dims).eval()
