"""`vllm serve` with the PagedKVTierConnector, restarted on its disk directory.

Specification: a server started with `--kv-transfer-config` naming our connector answers
the openai client; stopped and started again on the same directory, it answers the same
greedy completion with the prompt's full blocks counted as cached
(usage.prompt_tokens_details.cached_tokens, `--enable-prompt-tokens-details`) and loaded
from disk (the connector's `vllm:pagedkv_tier_disk_loaded_blocks` on /metrics).
"""
import json
import re
import urllib.request

from test_vllm_serve import GREEDY, running_server

PROMPT = " ".join(["The paged KV cache stores keys and values in fixed-size blocks."] * 8)


def metric(client, name: str) -> float:
    url = str(client.base_url).removesuffix("/v1/").removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    values = [float(m.group(1)) for m in re.finditer(
        rf"^{re.escape(name)}(?:_total)?{{[^}}]*}} ([0-9.e+]+)$", text, re.M)]
    return sum(values)


def test_a_restarted_server_serves_the_prompt_from_disk(checkpoints, tmp_path):
    config = json.dumps({"kv_connector": "PagedKVTierConnector",
                         "kv_connector_module_path": "torch_pagedkv.vllm.connector",
                         "kv_role": "kv_both",
                         "kv_connector_extra_config": {"disk_cache_dir": str(tmp_path / "kv"),
                                                       "host_cache_bytes": "16MiB"}})
    args = ("--kv-transfer-config", config, "--enable-prompt-tokens-details")
    answers = []
    for run in ("cold", "warm"):
        with running_server(checkpoints["llama"], tmp_path / f"{run}.log", *args) as client:
            out = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY)
            details = out.usage.prompt_tokens_details
            answers.append((out.choices[0].text, details.cached_tokens if details else 0,
                            out.usage.prompt_tokens,
                            metric(client, "vllm:pagedkv_tier_disk_loaded_blocks")))
    (cold_text, cold_cached, n, cold_loaded), (warm_text, warm_cached, _, warm_loaded) = answers
    assert n > 64 and cold_cached == 0 and cold_loaded == 0
    assert warm_text == cold_text
    assert warm_cached == (n - 1) // 32 * 32
    assert warm_loaded == warm_cached // 32
