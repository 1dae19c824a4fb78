"""Real clients against a local cluster: the official OpenAI Python SDK (completions and chat,
streaming and not, usage, errors) and the Prometheus text parser on /metrics.

Usage: openai_client.py BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8000/v1)
Exits non-zero with a message on the first mismatch.
"""

import sys
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")


def main():
    base, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base, api_key="not-needed", max_retries=0)

    models = [m.id for m in client.models.list()]
    check(model in models, f"{model} in /v1/models {models}")

    prompt = "Golf: a long walk spoiled, said someone, but the river kept running to the sea."
    c = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    check(c.object == "text_completion", "completion object")
    check(c.choices[0].finish_reason in ("stop", "length"), "finish reason")
    check(c.usage.prompt_tokens == len(prompt) + 1, f"prompt tokens {c.usage}")
    check(1 <= c.usage.completion_tokens <= 10, f"completion tokens {c.usage}")

    parts, usage = [], None
    for chunk in client.completions.create(
        model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    check("".join(parts) == c.choices[0].text, "streamed text equals the non-streamed text")
    check(usage is not None and usage.completion_tokens == c.usage.completion_tokens, f"usage {usage}")

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    check(r.choices[0].message.role == "assistant", "chat role")
    text = r.choices[0].message.content
    streamed, roles = [], []
    with client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True
    ) as stream:
        for chunk in stream:
            if chunk.choices:
                d = chunk.choices[0].delta
                if d.role:
                    roles.append(d.role)
                if d.content:
                    streamed.append(d.content)
    check(roles[:1] == ["assistant"], f"first delta has the role {roles}")
    check("".join(streamed) == text, "streamed chat equals the non-streamed chat")

    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        check(False, "unknown model refused")
    except openai.NotFoundError as e:
        check(e.body.get("code") == "model_not_found", f"error code {e.body}")
    try:
        client.completions.create(model=model, prompt="x", max_tokens=1, temperature=9)
        check(False, "bad temperature refused")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "temperature", f"error param {e.body}")

    metrics = urllib.request.urlopen(base.removesuffix("/v1") + "/metrics").read().decode()
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    for name, kind in [
        ("pdagent_requests", "counter"),
        ("pdagent_time_to_first_token_seconds", "histogram"),
        ("pdagent_time_per_output_token_seconds", "histogram"),
        ("pdagent_kv_bytes_sent", "counter"),
        ("pdagent_routing_decisions", "counter"),
        ("pdagent_requests_inflight", "gauge"),
    ]:
        check(name in families and families[name].type == kind, f"metric {name} ({kind}) in {sorted(families)}")
    print("ok")


if __name__ == "__main__":
    main()
