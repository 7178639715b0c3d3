"""The chunked causal-LM loss: the same losses and gradients as the full logits (tied GPT-2, untied Llama,
LoRA, padding, chunks that do not divide the length), never a batch x length x vocabulary tensor kept for
backward, the plain path for models whose logits are post-processed, and evaluation under inference_mode."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tunesmith.speed import lm_loss
from tunesmith.speed.lm_loss import causal_lm_losses

VOCAB = 97


def _gpt2(vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _llama(vocab: int = VOCAB, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _batch(vocab: int = VOCAB, batch: int = 3, length: int = 23, seed: int = 1) -> tuple[dict, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length - 7:] = 0  # right padding
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[-1, :9] = -100  # a prompt that is not trained
    return {"input_ids": ids, "attention_mask": mask}, labels


def _plain(model, inputs, labels, **kwargs):
    return lm_loss._plain_losses(model, inputs, labels, kwargs.get("label_smoothing", 0.0), True)


def _losses_and_grads(compute, model, inputs, labels, **kwargs):
    model.zero_grad()
    losses, accuracy = compute(model, inputs, labels, **kwargs)
    (losses.sums.sum() / 7).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, accuracy, grads


def _assert_same(model, inputs, labels, **kwargs):
    plain, plain_accuracy, plain_grads = _losses_and_grads(_plain, model, inputs, labels, **kwargs)
    chunked, accuracy, grads = _losses_and_grads(
        lambda *a, **k: causal_lm_losses(*a, with_accuracy=True, **k), model, inputs, labels, **kwargs)
    torch.testing.assert_close(chunked.sums, plain.sums, atol=1e-5, rtol=1e-5)
    assert torch.equal(chunked.units, plain.units)
    assert torch.equal(accuracy, plain_accuracy)
    assert plain_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    return chunked


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2-tied", "llama-untied"])
@pytest.mark.parametrize("chunk_tokens", [5, 1024])
def test_losses_and_gradients_equal_the_full_logits(build, chunk_tokens):
    model = build()
    inputs, labels = _batch()
    assert lm_loss._chunkable_head(model) is not None  # the chunked path runs, not the fallback
    losses = _assert_same(model, inputs, labels, chunk_tokens=chunk_tokens)
    # the shift is inside: 22 predicted positions, less the padding and the untrained prompt
    assert losses.units.tolist() == [22, 15, 14]
    assert isinstance(model.lm_head, torch.nn.Linear)  # the identity is gone again


def test_label_smoothing_matches():
    _assert_same(_llama(), *_batch(), chunk_tokens=7, label_smoothing=0.1)


def test_lora_through_peft():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    assert model.get_output_embeddings() is model.base_model.model.lm_head
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    losses = _assert_same(model, *_batch(), chunk_tokens=6)
    assert losses.units.sum() > 0


def test_lora_on_the_head_falls_back_to_the_plain_loss():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"], lora_dropout=0.0))
    assert lm_loss._chunkable_head(model) is None
    _assert_same(model, *_batch(), chunk_tokens=6)


def test_post_processed_logits_fall_back_and_give_the_same_losses():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0)
    model = Gemma2ForCausalLM(config)
    assert lm_loss._chunkable_head(model) is None  # tanh softcapping after lm_head: not the head's output
    inputs, labels = _batch()
    chunked, _ = causal_lm_losses(model, inputs, labels, chunk_tokens=4)
    reference = torch.nn.functional.cross_entropy(model(**inputs).logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                  reduction="none").sum(-1)
    torch.testing.assert_close(chunked.sums, reference)


def test_no_saved_tensor_is_as_big_as_the_logits():
    vocab, batch, length = 4096, 2, 64
    model = _llama(vocab=vocab, hidden=16, layers=1)
    inputs, labels = _batch(vocab, batch, length)
    labels[:] = inputs["input_ids"]  # every position trained
    full = batch * (length - 1) * vocab

    def largest_saved(compute) -> int:
        sizes = [0]

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses, _ = compute(model, inputs, labels)
        losses.sums.sum().backward()
        return max(sizes)

    assert largest_saved(lambda *a: _plain(*a)) >= full
    chunked = largest_saved(lambda *a: causal_lm_losses(*a, chunk_tokens=32))
    assert chunked < full / 3
    assert chunked <= max(vocab * 16, 32 * vocab)  # the weight, or one chunk's logits at most


def test_evaluation_under_inference_mode_and_autocast():
    model = _gpt2().eval()
    inputs, labels = _batch()
    with torch.inference_mode():
        plain, plain_accuracy = _plain(model, inputs, labels)
        chunked, accuracy = causal_lm_losses(model, inputs, labels, chunk_tokens=8, with_accuracy=True)
    torch.testing.assert_close(chunked.sums, plain.sums, atol=1e-5, rtol=1e-5)
    assert torch.equal(accuracy, plain_accuracy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = causal_lm_losses(model.train(), inputs, labels, chunk_tokens=8)
        reference, _ = _plain(model, inputs, labels)
    assert losses.sums.dtype == torch.float32
    torch.testing.assert_close(losses.sums, reference.sums, atol=0.05, rtol=0.02)
    losses.sums.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_a_batch_without_labels_still_reaches_every_parameter():
    model = _llama()
    inputs, labels = _batch()
    labels[:] = -100
    losses, accuracy = causal_lm_losses(model, inputs, labels, with_accuracy=True)
    assert losses.units.tolist() == [0, 0, 0] and accuracy.tolist() == [0, 0, 0]
    losses.sums.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_ddp_wrapper_is_called_and_unwrapped():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    try:
        model = _llama()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        calls = []
        wrapped.register_forward_pre_hook(lambda module, args: calls.append(1))
        assert lm_loss._chunkable_head(wrapped) is not None
        _assert_same(wrapped, *_batch(), chunk_tokens=5)
        assert len(calls) == 2  # the plain and the chunked pass both went through DDP's forward
    finally:
        dist.destroy_process_group()
