"""Small Hugging Face models for tests that build them from configs (nothing is downloaded)."""

from __future__ import annotations


def tiny_hf_model(name: str):
    """The class and config of a small Hugging Face model ``name`` (llama, bert, gpt2, swin), dropout 0."""
    import transformers as T

    if name == "llama":
        return T.LlamaForCausalLM, T.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            max_position_embeddings=32,
        )
    if name == "gpt2":
        return T.GPT2LMHeadModel, T.GPT2Config(
            vocab_size=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    if name == "bert":
        return T.BertForMaskedLM, T.BertConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    return T.SwinForImageClassification, T.SwinConfig(
        image_size=32,
        patch_size=2,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
