"""Tiny randomly initialised models of every supported family, with an input and an output."""

from __future__ import annotations

import torch

FAMILIES = ["timm_vit", "hf_bert", "hf_dinov2", "hf_llama_gqa", "hf_gpt2"]
#: further families of DESIGN.md §4, covered by a few contract cases each (not the full matrix)
EXTRA_FAMILIES = ["hf_qwen2", "hf_qwen3", "hf_mistral", "hf_roberta", "hf_vit"]
#: decoders whose k/v have fewer heads than q (grouped-query attention)
GQA_FAMILIES = {"hf_llama_gqa", "hf_qwen2", "hf_qwen3", "hf_mistral"}


def make(family: str, seed: int = 0):
    """``(model, inputs dict, function output -> tensor)``, in eval mode, float32."""
    torch.manual_seed(seed)
    if family == "timm_vit":
        from conftest import tiny_vit

        model = tiny_vit(dim=32, heads=4)
        return model.eval(), {"x": torch.randn(2, 3, 16, 16)}, lambda o: o
    import transformers as tf

    tf.logging.set_verbosity_error()
    ids = {"input_ids": torch.randint(0, 100, (2, 7))}
    if family == "hf_bert":
        cfg = tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=100,
            num_labels=3,
        )
        return tf.BertForSequenceClassification(cfg).eval(), ids, lambda o: o.logits
    if family == "hf_dinov2":
        cfg = tf.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
        )
        pix = {"pixel_values": torch.randn(2, 3, 28, 28)}
        return tf.Dinov2Model(cfg).eval(), pix, lambda o: o.last_hidden_state
    if family == "hf_llama_gqa":
        cfg = tf.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=100,
        )
        return tf.LlamaForCausalLM(cfg).eval(), ids, lambda o: o.logits
    if family in ("hf_qwen2", "hf_qwen3", "hf_mistral"):
        common = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=100,
        )
        if family == "hf_qwen2":  # q/k/v carry biases, o does not
            model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
        elif family == "hf_qwen3":  # head_dim 16 != hidden / heads; q/k RMS norms per head
            model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, **common))
        else:
            model = tf.MistralForCausalLM(tf.MistralConfig(**common))
        return model.eval(), ids, lambda o: o.logits
    if family == "hf_roberta":
        cfg = tf.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=100,
            max_position_embeddings=16,
            num_labels=3,
        )
        return tf.RobertaForSequenceClassification(cfg).eval(), ids, lambda o: o.logits
    if family == "hf_vit":  # transformers 5 names: attention.q_proj|k_proj|v_proj|o_proj
        cfg = tf.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=28,
            patch_size=14,
            num_labels=3,
        )
        pix = {"pixel_values": torch.randn(2, 3, 28, 28)}
        return tf.ViTForImageClassification(cfg).eval(), pix, lambda o: o.logits
    if family == "hf_gpt2":
        cfg = tf.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0, eos_token_id=0
        )
        return tf.GPT2Model(cfg).eval(), ids, lambda o: o.last_hidden_state
    raise ValueError(family)


#: what a LLaMA (gated MLP, grouped-query k/v) user writes: the MLP named by its alias, and only
#: the d×d projections q and o stacked in one tensor (docs/methods.md, "On LLaMA-class models")
LLAMA_OVERRIDES: dict[str, dict] = {
    "cara": {"targets": ["q", "o", "mlp"]},
    "fact_tk": {"targets": ["q", "o", "mlp"]},
    "fact_tt": {"targets": ["q", "o", "mlp"]},
    "lora": {},
    "lorta": {"targets": ["q", "o"]},
    "lotr": {"targets": ["q", "o"]},
    "metatt": {"targets": ["q", "o"]},
    "serial_lora": {},
    "tenslora": {"targets": ["q", "o"]},
}


def preset_overrides(family: str, preset: str) -> dict:
    """The overrides a user of ``family`` writes for ``preset`` (none off LLaMA)."""
    return LLAMA_OVERRIDES.get(preset, {}) if family == "hf_llama_gqa" else {}
