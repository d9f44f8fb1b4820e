"""Which Hugging Face models the engine runs, and models given by path.

Specification: seven more families (beyond test_hf_integration's Llama, Mistral,
Gemma-2, Qwen2) generate through LLM(hf_model), with prefix caching and chunked prefill,
exactly the tokens of transformers' own eager greedy decoding; a model whose attention
cannot be routed through the pagedkv kernels is refused by LLM(...) with an error naming
its class and why, before anything runs; LLM("checkpoint/dir") loads a saved causal LM
(and its tokenizer) from local files only, and a bad path is refused naming the path.
Models are tiny random configs built locally; nothing is downloaded.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch a hub

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch_pagedkv.engine import LLM, SamplingParams  # noqa: E402
from torch_pagedkv.engine.checkpoint import CheckpointNotFoundError  # noqa: E402
from torch_pagedkv.integrations.hf import UnsupportedModelError  # noqa: E402

T = transformers
VOCAB = 384
NEW_TOKENS = 24
_COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
               initializer_range=0.3, pad_token_id=0, bos_token_id=None, eos_token_id=None)

# Families checked token for token, each with what it brings that Llama does not.
FAMILIES = {
    "qwen3": lambda: T.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=32),  # q/k norm
    "gemma3": lambda: T.Gemma3TextConfig(  # alternating sliding/global layers, own scaling
        **_COMMON, num_key_value_heads=2, head_dim=32, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False),
    "phi3": lambda: T.Phi3Config(**_COMMON, num_key_value_heads=2),  # fused qkv projection
    "olmo2": lambda: T.Olmo2Config(**_COMMON, num_key_value_heads=2),  # norms after attention
    "starcoder2": lambda: T.Starcoder2Config(**_COMMON, num_key_value_heads=2,
                                             sliding_window=8),  # biases, window
    "granite": lambda: T.GraniteConfig(**_COMMON, num_key_value_heads=2,
                                       attention_multiplier=0.2, embedding_multiplier=2.0,
                                       residual_multiplier=0.5, logits_scaling=2.0),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_COMMON, rotary_pct=0.5),  # partial rotary, MHA
}


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # some families zero their biases at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def eager_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    a, b, c = (torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (11, 26, 30))
    return [c, c[:16] + b[16:], a]  # the second shares two 8-token blocks with the first


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_eager_through_the_engine(family):
    model = build(FAMILIES[family]())
    c, shared, a = prompts()
    want = [eager_greedy(model, p) for p in (c, shared, a)]
    assert all(len(set(w)) >= 8 for w in want), "degenerate reference: it would prove little"
    try:
        llm = LLM(model, num_blocks=64, block_size=8, max_num_batched_tokens=16,
                  compile=False)  # prompts prefill in chunks
        params = SamplingParams(max_tokens=NEW_TOKENS)
        got = llm.generate([c], params, use_tqdm=False)
        got += llm.generate([shared, a], params, use_tqdm=False)
    finally:
        model.set_attn_implementation("eager")
    assert llm.stats.prefix_hits == 16
    assert [o.token_ids for o in got] == want


# ---------------------------------------------------------------- refused models
_SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)
REFUSED = {  # name -> (config, what the error must say)
    "falcon": (lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4), "AttentionInterface"),
    "falcon-alibi": (lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            alibi=True), "ALiBi"),
    "gpt-oss": (lambda: T.GptOssConfig(**_SMALL, num_key_value_heads=2, head_dim=16,
                                       num_local_experts=4, num_experts_per_tok=2), "sinks"),
    "qwen3-next": (lambda: T.Qwen3NextConfig(**_SMALL, num_key_value_heads=2, head_dim=16),
                   "linear_attention"),
    "deepseek-v3": (lambda: T.DeepseekV3Config(
        **_SMALL, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_routed_experts=4,
        num_experts_per_tok=2, first_k_dense_replace=2), "latent attention"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_models_the_kernels_cannot_run_are_refused_up_front(name):
    config, reason = REFUSED[name]
    model = T.AutoModelForCausalLM.from_config(config())
    attn_before = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=reason) as err:
        LLM(model, num_blocks=8, compile=False)
    assert type(model).__name__ in str(err.value)
    assert model.config._attn_implementation == attn_before  # nothing was switched


# ---------------------------------------------------------------- models by path
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama and a byte-level BPE tokenizer trained here, saved as a checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the engine loads a checkpoint from a local directory",
                             "paged attention reads the cache block by block"],
                            trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = build(T.LlamaConfig(**_COMMON, num_key_value_heads=2, head_dim=32))
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    T.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path, model, tok


def test_llm_loads_a_checkpoint_directory_and_its_tokenizer(checkpoint):
    path, model, tok = checkpoint
    llm = LLM(str(path), num_blocks=32, block_size=8, compile=False)
    text = "the engine reads blocks"
    out = llm.generate([text], SamplingParams(max_tokens=16), use_tqdm=False)[0]
    ids = tok.encode(text).ids
    assert out.prompt_token_ids == ids
    assert out.token_ids == eager_greedy(model, ids, 16)
    assert out.text == tok.decode(out.token_ids)
    other = LLM(path, num_blocks=32, block_size=8, compile=False, tokenizer=tok)  # a PathLike
    assert other.generate([ids], SamplingParams(max_tokens=16),
                          use_tqdm=False)[0].token_ids == out.token_ids


def test_bad_checkpoint_paths_are_refused_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointNotFoundError, match="no-such-model"):
        LLM(str(missing), compile=False)
    with pytest.raises(FileNotFoundError, match="config.json"):  # also a ValueError
        LLM(str(tmp_path), compile=False)
    base = tmp_path / "base-model"
    T.LlamaModel(T.LlamaConfig(**_SMALL)).save_pretrained(base)  # no language-model head
    with pytest.raises(ValueError, match="base-model.*LlamaModel.*not a causal language model"):
        LLM(str(base), compile=False)
    encoder = tmp_path / "encoder"
    T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=1,
                                         n_heads=2)).save_pretrained(encoder)
    with pytest.raises(ValueError, match="encoder.*not a causal language model"):
        LLM(str(encoder), compile=False)
