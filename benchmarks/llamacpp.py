"""peftlab's GGUF files in llama.cpp itself: a trained SmolLM2 adapter exported as the merged model
(f32, f16, q8_0) and as a llama.cpp LoRA on the base's GGUF, each generating greedily in
llama-cpp-python; the tokens are compared with transformers generating from the merged model.

    pip install llama-cpp-python          # builds llama.cpp from source: about 15 minutes on 2 cores
    python benchmarks/llamacpp.py --run RUN --test TEST.jsonl

RUN is a peftlab causal-LM run on SmolLM2 (benchmarks/dpo.py leaves one in benchmarks/.cache/dpo/).
Results go to benchmarks/llamacpp.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

NEW_TOKENS = 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a peftlab causal-LM run directory")
    parser.add_argument("--test", required=True, help="held-out conversations (.jsonl of messages rows)")
    parser.add_argument("--prompts", type=int, default=5)
    args = parser.parse_args()
    import torch
    from llama_cpp import Llama

    import peftlab
    from peftlab.gguf_export import write_gguf, write_gguf_lora
    from peftlab.run import load_trained, merged_trained

    work = Path(tempfile.mkdtemp())
    rows = [json.loads(line) for line in Path(args.test).read_text().splitlines() if line.strip()]
    prompts = [r["messages"][0]["content"] for r in rows[: args.prompts]]
    _, model, tokenizer = load_trained(args.run)
    write_gguf_lora(model, work / "adapter.gguf")
    write_gguf(peftlab.unwrap(model), tokenizer, work / "base-f32.gguf", "f32")
    merged, tokenizer, _ = merged_trained(args.run)
    for outtype in ("f32", "f16", "q8_0"):
        write_gguf(merged, tokenizer, work / f"merged-{outtype}.gguf", outtype)

    def rendered(prompt: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([rendered(prompt)])
            out = merged.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            expected.append(new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new)
    results = {}
    files = {f"merged {t}": dict(model_path=str(work / f"merged-{t}.gguf")) for t in ("f32", "f16", "q8_0")}
    files["base f32 + LoRA"] = dict(model_path=str(work / "base-f32.gguf"), lora_path=str(work / "adapter.gguf"))
    for name, paths in files.items():
        llm = Llama(**paths, n_ctx=1024, n_threads=2, verbose=False, seed=0)
        same, tokens = 0, 0
        for prompt, want in zip(prompts, expected):
            got = []
            for token in llm.generate(rendered(prompt), temp=0.0, top_k=1, reset=True):
                if token == llm.token_eos() or len(got) == NEW_TOKENS:
                    break
                got.append(token)
            same += got == want
            tokens += sum(a == b for a, b in zip(got, want)) / max(len(want), len(got), 1)
        results[name] = {"prompts_identical": f"{same}/{len(prompts)}", "token_agreement": tokens / len(prompts)}
        print(f"{name}: {results[name]}", flush=True)
    Path(__file__).with_name("llamacpp.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
