"""The vLLM tests' setup (run in the vLLM environment: `make test-vllm`).

Tiny random-weight checkpoints are built here and saved with save_pretrained into a
session temporary directory: nothing is downloaded. vLLM runs offline on 2 cores: these
environment settings come from ../shared/VLLM.md (measured on this machine).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")     # GiB: the default asks for too much
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")  # 'auto' leaves the worker 1 thread
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 512
_COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
               max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs():
    from transformers import BloomConfig, LlamaConfig, MistralConfig
    return {
        # GQA: 4 query heads over 2 KV heads, head size 32
        "llama": LlamaConfig(**_COMMON, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=32),
        # sliding window of 48 tokens on every layer, MQA, head size 64
        "mistral": MistralConfig(**_COMMON, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=64, sliding_window=48),
        # ALiBi positions (no rotary), MHA, head size 32
        "bloom": BloomConfig(vocab_size=VOCAB, hidden_size=128, n_layer=2, n_head=4,
                             initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0),
    }


def save_tokenizer(path: str) -> None:
    """A small byte-level BPE tokenizer with a chat template (for `vllm serve`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The paged KV cache stores keys and values in fixed-size blocks.",
            "Hello! How are you today? Tell me a story about attention kernels.",
            "user assistant system: prefix caching, chunked prefill, decode."] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> directory of a tiny random checkpoint (fp32 weights, tokenizer beside)."""
    from transformers import AutoModelForCausalLM
    root = tmp_path_factory.mktemp("checkpoints")
    dirs = {}
    for i, (name, config) in enumerate(_configs().items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        path = str(root / name)
        model.save_pretrained(path)
        save_tokenizer(path)
        dirs[name] = path
    return dirs
