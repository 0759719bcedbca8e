"""Does an inference server's `prompt_logprobs` (the vLLM OpenAI-compatible protocol) give the
teacher's own log-probabilities? The groundwork of a served teacher (issue 28).

    python bench/vllm_prompt_logprobs.py --url http://127.0.0.1:8811 --model-dir ./tiny-gpt2 \
        --ids 10,20,30,40,50,60 --topk 3 --json bench/results/vllm-cpu-trial.json

Asks `/v1/completions` for the prompt's top-`topk` log-probabilities (token ids in, one new
token, greedy), computes the same model's log-softmax with transformers on this side in
float32, and reports the largest difference over every returned (position, token). Position
p of the response is the distribution that predicted token p (from the prefix before it), so it
is compared with row p − 1 of the logits; position 0 has none.
"""

from __future__ import annotations

import argparse
import json
import platform
import urllib.request
from pathlib import Path

import torch


def served(url: str, model: str, ids: list[int], topk: int) -> list:
    body = {"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": topk,
            "temperature": 0}  # fmt: skip
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)["choices"][0]["prompt_logprobs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--model-name", help="the server's model id (default: --model-dir)")
    parser.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    ids = [int(i) for i in args.ids.split(",")]
    rows = served(args.url, args.model_name or args.model_dir, ids, args.topk)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).float().eval()
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits.float(), -1)[0]
    worst, compared = 0.0, 0
    for position in range(1, len(ids)):
        for token, entry in rows[position].items():
            worst = max(worst, abs(log_probs[position - 1, int(token)].item() - entry["logprob"]))
            compared += 1
    result = {
        "command": "python bench/vllm_prompt_logprobs.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v and k != "json"
        ),
        "machine": platform.processor() or platform.machine(),
        "compared": compared,
        "max_abs_logprob_difference": worst,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
